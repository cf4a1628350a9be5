"""Live DQN training from scratch on foreign backends under open-loop load, against the fallback heuristic.

    .venv/bin/python benchmarks/live_train_foreign.py [--workers 1,2,4,8] [--load 0.8] [--train-s 300]
        [--eval-s 30] [--rounds 3] [--init-model PATH] [--proxy-workers N]

(`--workers` is the backends' sync workers; `--proxy-workers` the trainer's own `--workers`.)

The acceptance target it measures: live training from scratch on foreign backends at 80 % load keeps
the client p99 during training within 1.5x the fallback heuristic's on the same load, no request
fails, and the model it ends with (after 5 minutes) has a p99 no higher than the best heuristic's.

Three phases, in front of one cluster of gunicorn backends (benchmarks/foreign_cluster.py, sync workers
1/2/4/8, speed 0.5, as benchmarks/live_foreign.py):

1. train: one open-loop Poisson schedule (`--seed`, `--train-s` long) through
   `lbproxy --mode train --env live`, from a randomly initialised network (or `--init-model`). Episodes
   are set so that training never stops by itself before the load ends, and --eps-fraction so that ε
   reaches its floor (lbproxy's eps_end, 0.02) after `--eps-floor-at` (0.4) of the schedule's requests:
   every request is one routed decision, so that is 0.4 x rate x train-s decisions. The trainer's
   /metrics is read every few seconds (ε and the guardrail per minute) and once more when the load
   ends; then it gets SIGTERM, drains, and writes RUN_DIR/dqn_final.pth.
2. fallback: the same schedule through `lbproxy --mode serve --policy peak_ewma` (the heuristic that
   the trainer explores with, that its guardrail falls back to, and that the target compares with),
   cold as the trainer was: no warm-up.
3. evaluation: the trained model served greedily (`--policy dqn --model RUN_DIR/dqn_final.pth`) and
   every production heuristic, `--rounds` rounds of `--eval-s` on one schedule per round (seed + 1 +
   round), policy order shuffled per round: benchmarks/live_foreign.py's measurement.

Between runs the backends are settled (a backend still holding a queue is restarted), as live_foreign
does. Pinning as ANCHORS.md: every proxy, the trainer included, on CPU 0; the generator and the
backends on CPU 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import LOAD_CPU, PROXY_CPU, TASKSET, machine, quoted_command, revision, utc_now, write_result  # noqa: E402
from foreign_cluster import ForeignCluster  # noqa: E402
from live_compare import (  # noqa: E402
    ClusterRun,
    Comparison,
    Measurement,
    PolicyConfig,
    add_cluster_args,
    compare,
    live_cluster,
    measure,
    policy_configs,
)
from live_tables import SHAPED, per_run_table, send_lag, table  # noqa: E402
from live_train_tables import TO_FALLBACK, failure_kinds, metrics_lines, per_slice_table, phase_table, series, verdict  # noqa: E402
from live_training import EPS_FLOOR_AT, FALLBACK, SAMPLE_EVERY_S, TRAIN_EPISODES, TrainRun, train  # noqa: E402

from lbproxy.config import Settings  # noqa: E402
from loadgen.open_loop import poisson_schedule  # noqa: E402

DEFAULT_HEURISTICS = ("least_conn", "p2c", "peak_ewma", "sed", "prequal", "c3")
"""Production heuristics; round_robin and random are left out by default: told only the URLs they give
the 1-worker backend a quarter of the traffic and their queue grows for the whole run (live_foreign.md)."""
EVAL_SEED_OFFSET = 1
"""Evaluation round r uses seed + this + r: a schedule other than the training one (same seed and a
shorter duration would be the training schedule's first seconds)."""
P99_TRAIN_OVER_FALLBACK_MAX = 1.5
FINAL_OVER_BEST_MAX = 1.0
TARGET_TRAIN_S = 300.0
"""The target's training time ("the model it ends with after 5 minutes")."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(ap)
    ap.add_argument("--train-s", type=float, default=TARGET_TRAIN_S, help="seconds of training load (and fallback)")
    ap.add_argument("--slice-s", type=float, default=60.0, help="slice length of the per-slice table")
    ap.add_argument("--eps-floor-at", type=float, default=EPS_FLOOR_AT, help="share of the training requests")
    ap.add_argument("--episode-decisions", type=int, default=256)
    ap.add_argument(
        "--proxy-workers", type=int, default=1, help="the trainer's --workers (N workers feeding one learner)"
    )
    ap.add_argument("--init-model", type=Path, default=None, help="start training from this model, not scratch")
    ap.add_argument("--run-dir", type=Path, default=None, help="trainer's run dir (default runs/live_train_foreign-*)")
    ap.add_argument("--eval-s", type=float, default=30.0, help="seconds of measured arrivals per evaluation run")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured arrivals before each evaluation run")
    ap.add_argument("--grace-s", type=float, default=10.0, help="wait for answers past the last send")
    ap.add_argument("--rounds", type=int, default=3, help="evaluation rounds")
    ap.add_argument("--seed", type=int, default=1, help="training schedule seed (evaluation round r: seed + 1 + r)")
    ap.add_argument("--policies", default=",".join(DEFAULT_HEURISTICS), help="heuristics of the evaluation")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/live_train_foreign.md")
    ap.add_argument("--note", default="", help="free text for the results file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or REPO / "runs" / f"live_train_foreign-{stamp}"
    heuristics, notes = policy_configs([p.strip() for p in args.policies.split(",") if p.strip()], None)
    heuristics = [p for p in heuristics if not p.is_dqn]
    for note in notes:
        print(note, flush=True)
    with live_cluster(args) as (cluster, facts):
        schedule = poisson_schedule(facts.rate_rps, args.train_s, args.seed, facts.mix)
        print(f"train: {len(schedule)} requests over {args.train_s:g} s, run dir {run_dir}", flush=True)
        tr = train(
            cluster,
            schedule,
            run_dir,
            args.grace_s,
            args.init_model,
            args.eps_floor_at,
            args.episode_decisions,
            workers=args.proxy_workers,
        )
        facts.loads["train"] = os.getloadavg()[0]
        print(f"train        {tr.measurement.summary.line()}; trainer exit {tr.exit_code}", flush=True)
        fb = measure(cluster, FALLBACK, schedule, warmup_s=0.0, grace_s=args.grace_s)
        facts.loads["fallback"] = os.getloadavg()[0]
        print(f"peak_ewma    {fb.summary.line()}", flush=True)
        cmp = evaluate(cluster, args, facts, tr, heuristics, notes)
        facts.loads["evaluation"] = os.getloadavg()[0]
    write_result(args.out, report(args, argv, facts, run_dir, tr, fb, cmp, notes))
    return 0


def evaluate(
    cluster: ForeignCluster,
    args: argparse.Namespace,
    facts: ClusterRun,
    tr: TrainRun,
    heuristics: list[PolicyConfig],
    notes: list[str],
) -> Comparison:
    """The trained model (and the initial one, if any) against the heuristics, on evaluation schedules."""
    configs = list(heuristics)
    if tr.model is not None:
        configs.insert(0, PolicyConfig("dqn_trained", ("--policy", "dqn", "--model", str(tr.model))))
    else:
        notes.append(f"the trainer wrote no model (exit {tr.exit_code}): nothing to evaluate")
    if args.init_model is not None:
        configs.insert(1, PolicyConfig("dqn_init", ("--policy", "dqn", "--model", str(args.init_model))))
    return compare(
        cluster,
        configs,
        facts.rate_rps,
        facts.mix,
        args.eval_s,
        args.warmup_s,
        args.grace_s,
        args.rounds,
        args.seed + EVAL_SEED_OFFSET,
        notes,
    )


def final_target(args: argparse.Namespace, cmp: Comparison) -> tuple[str, bool]:
    """The third target's measured cell (the trained model's median p99 over the best heuristic's) and
    whether it is met."""
    best = cmp.best_heuristic()
    trained = "dqn_trained" if cmp.runs.get("dqn_trained") else None
    if trained and best:
        final_ratio = cmp.med(trained, "p99_ms") / cmp.med(best, "p99_ms")
        final = (
            f"dqn_trained median p99 {cmp.med(trained, 'p99_ms'):.1f} ms / {best} {cmp.med(best, 'p99_ms'):.1f} ms "
            f"= {final_ratio:.2f} (medians over {args.rounds} rounds of {args.eval_s:g} s)"
        )
        final_ok = final_ratio <= FINAL_OVER_BEST_MAX
    else:
        final, final_ok = "no trained model was evaluated", False
    if args.train_s < TARGET_TRAIN_S:
        final += f"; trained {args.train_s:g} s, not the target's {TARGET_TRAIN_S:g} s"
    return final, final_ok


def setup_lines(
    args: argparse.Namespace, argv: list[str] | None, facts: ClusterRun, run_dir: Path, tr: TrainRun, notes: list[str]
) -> list[str]:
    """The results file's title and what was run: machine, command, backends, load, the three phases."""
    t = tr.measurement.summary
    floor_s = tr.eps_floor_decisions / facts.rate_rps
    start_flag = (
        " --init-model " + str(args.init_model) if args.init_model else " (no --init-model: random initial network)"
    )
    loads = facts.loads
    return [
        "# Live DQN training from scratch on foreign backends (gunicorn, unequal capacities), open-loop load",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{quoted_command(argv)}`",
        f"- code: {revision()}",
        f"- backends: {len(facts.workers)} gunicorn {facts.gunicorn} processes, sync workers {facts.workers}, serving "
        f"backends/foreign_app.py at speed {args.speed:g} (as benchmarks/live_foreign.py: no keep-alive, no "
        "service-time headers, no /health)",
        f"- load: open loop, Poisson {facts.rate_rps:.0f} req/s = {args.load:g} x capacity {facts.capacity_rps:.0f} "
        f"req/s, mix light/heavy/static {'/'.join(f'{w:g}' for w in facts.mix)}, {args.grace_s:g} s grace (then "
        "unanswered = failed timeout)",
        f"- train: `lbproxy --mode train --env live --health-interval-s 0 --episodes {TRAIN_EPISODES} "
        f"--episode-decisions {args.episode_decisions} --eps-fraction {tr.eps_fraction:.6g} "
        f"--workers {args.proxy_workers}`{start_flag}, "
        "other settings at their defaults; "
        f"{t.count} requests (schedule seed {args.seed}, {args.train_s:g} s), no warm-up; ε decays linearly from "
        f"{Settings.model_fields['eps_start'].default:g} to {Settings.model_fields['eps_end'].default:g} over "
        f"{tr.eps_floor_decisions} decisions ({args.eps_floor_at:g} of the schedule's requests, ~{floor_s:.0f} s); "
        f"exploration routes by peak_ewma; guardrail control arm 5 % (peak_ewma). SIGTERM after the load: "
        f"exit {tr.exit_code} after {tr.stop_s:.1f} s, "
        + (f"model `{tr.model}`" if tr.model else "**no dqn_final.pth**")
        + f"; log and metrics CSV in `{run_dir}`",
        "- fallback: `lbproxy --mode serve --policy peak_ewma --health-interval-s 0`, the same schedule, no warm-up",
        f"- evaluation: every policy on one schedule per round (seed {args.seed + EVAL_SEED_OFFSET} + round), "
        f"{args.eval_s:g} s measured after a {args.warmup_s:g} s warm-up, {args.rounds} rounds, policy order "
        "shuffled per round; dqn_trained = `--policy dqn --model dqn_final.pth` (greedy, guardrail at its default)",
        "- pinning: "
        + (
            f"every proxy (trainer included) on CPU {PROXY_CPU}, generator and backends on CPU {LOAD_CPU}"
            if TASKSET
            else "none"
        ),
        f"- run time: {facts.elapsed_s / 60:.1f} min; 1-minute load average {loads['start']:.2f} at the start, "
        f"{loads['train']:.2f} after training, {loads['fallback']:.2f} after the fallback run, "
        f"{loads['evaluation']:.2f} after the evaluation (2 vCPU shared with other work)",
        *([f"- note: {args.note}"] if args.note else []),
        *(f"- {n}" for n in notes),
    ]


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    facts: ClusterRun,
    run_dir: Path,
    tr: TrainRun,
    fb: Measurement,
    cmp: Comparison,
    notes: list[str],
) -> list[str]:
    """The results file: the setup, the targets, training against the fallback, the evaluation."""
    return [
        *setup_lines(args, argv, facts, run_dir, tr, notes),
        "",
        *target_lines(args, tr, fb, cmp),
        "",
        *training_lines(args, facts, tr, fb),
        "",
        *evaluation_lines(facts, tr, fb, cmp),
    ]


def target_lines(args: argparse.Namespace, tr: TrainRun, fb: Measurement, cmp: Comparison) -> list[str]:
    t, f = tr.measurement.summary, fb.summary
    p99_ratio = t.p99_ms / f.p99_ms
    final, final_ok = final_target(args, cmp)
    return [
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| client p99 during training <= {P99_TRAIN_OVER_FALLBACK_MAX:g}x the fallback's on the same load | "
        f"train p99 {t.p99_ms:.1f} ms / peak_ewma {f.p99_ms:.1f} ms = {p99_ratio:.2f} | "
        f"{verdict(p99_ratio <= P99_TRAIN_OVER_FALLBACK_MAX)} |",
        f"| no request failed during training | {t.errors} of {t.count} failed (5xx / no answer / timeout: "
        f"{failure_kinds(tr.measurement)}) | {verdict(t.errors == 0)} |",
        f"| final model p99 <= {FINAL_OVER_BEST_MAX:g}x the best heuristic's | {final} | {verdict(final_ok)} |",
    ]


def training_lines(args: argparse.Namespace, facts: ClusterRun, tr: TrainRun, fb: Measurement) -> list[str]:
    return [
        "## Training and fallback, the same schedule",
        "",
        *phase_table([("train (dqn learning)", tr.measurement), ("fallback (peak_ewma)", fb)], facts.workers),
        "",
        "The trainer's proxy CPU includes its learner (gradient updates in a thread of the same process, on the "
        "same pinned CPU as the event loop).",
        "",
        f"Per {args.slice_s:g} s slice of the schedule (requests by scheduled send time). ε, guardrail and "
        f"updates are read from the trainer's /metrics every {SAMPLE_EVERY_S:g} s during the load: the "
        "tripped column is the share of those readings with lbproxy_guardrail_tripped = 1.",
        "",
        *per_slice_table(tr, fb, args.slice_s),
        "",
        "The trainer's /metrics when the load had ended (before SIGTERM):",
        "",
        *metrics_lines(tr.measurement.metrics),
    ]


def evaluation_lines(facts: ClusterRun, tr: TrainRun, fb: Measurement, cmp: Comparison) -> list[str]:
    t, f = tr.measurement.summary, fb.summary
    lag = send_lag([tr.measurement, fb, *(m for ms in cmp.runs.values() for m in ms)])
    eval_switches = [
        f"{m.policy} round {m.round + 1}: {series(m.metrics, 'lbproxy_guardrail_switches_total', TO_FALLBACK):g}"
        for name in ("dqn_trained", "dqn_init")
        for m in cmp.runs.get(name, [])
    ]
    return [
        "## Evaluation: the trained model against the heuristics",
        "",
        *table(cmp, facts.workers),
        "",
        f"Best heuristic (lowest median p99): {cmp.best_heuristic() or '-'}. Medians over rounds. Guardrail "
        "switches to the fallback while a model was served: "
        + ("; ".join(eval_switches) if eval_switches else "-")
        + ".",
        "",
        f"Generator send lag (actual minus scheduled send): worst p99 {lag.p99_ms:.2f} ms, worst max "
        f"{lag.max_ms:.1f} ms over all runs ({lag.trusted}); training {t.send_lag_p99_ms:.2f} / "
        f"{t.send_lag_max_ms:.1f} ms, fallback {f.send_lag_p99_ms:.2f} / {f.send_lag_max_ms:.1f} ms (p99 / max).",
        "",
        "Latency percentiles count every request (failed ones at their time to failure, timeouts at their age at "
        "the cut-off). Failed = status >= 500, connection errors and timeouts.",
        "",
        *SHAPED,
        "",
        "## Every evaluation run",
        "",
        *per_run_table(cmp),
    ]


if __name__ == "__main__":
    sys.exit(main())
