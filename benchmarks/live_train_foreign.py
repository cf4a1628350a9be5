"""Live DQN training from scratch on foreign backends under open-loop load, against the fallback heuristic.

    .venv/bin/python benchmarks/live_train_foreign.py [--workers 1,2,4,8] [--load 0.8] [--train-s 300]
        [--eval-s 30] [--rounds 3] [--init-model PATH]

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
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import LOAD_CPU, TASKSET, command, machine, pinned, write_result  # noqa: E402
from foreign_cluster import ForeignCluster, start_foreign_cluster  # noqa: E402
from live_foreign import (  # noqa: E402
    DEFAULT_SPEED,
    DRAIN_TIMEOUT_S,
    LAG_TRUSTED_P99_MS,
    PROXY_BOOT_S,
    PROXY_CPU,
    RESTART_AFTER_S,
    SHAPED,
    Comparison,
    Measurement,
    PolicyConfig,
    compare,
    measure,
    measure_running,
    per_run_table,
    pinned_self,
    policy_configs,
    proxy_metrics,
    revision,
    table,
)
from support import LOOPBACK, Proc, free_port, wait_http_ok  # noqa: E402

from lbproxy.config import Settings  # noqa: E402
from lbproxy.rl.schedule import EpsilonSchedule  # noqa: E402
from loadgen.open_loop import RunResult, Schedule, Summary, parse_mix, poisson_schedule, summarize  # noqa: E402

FALLBACK = PolicyConfig("peak_ewma", ("--policy", "peak_ewma"))
"""The fallback heuristic: lbproxy.policies.dqn.FALLBACK_POLICY (not imported: that module imports torch)."""
DEFAULT_HEURISTICS = ("least_conn", "p2c", "peak_ewma", "sed", "prequal", "c3")
"""Production heuristics; round_robin and random are left out by default: told only the URLs they give
the 1-worker backend a quarter of the traffic and their queue grows for the whole run (live_foreign.md)."""
TRAIN_EPISODES = 100_000
"""Never reached (25.6 M decisions at 256 per episode, a day at 283 req/s): the trainer stops at SIGTERM."""
EPS_FLOOR_AT = 0.4
"""Share of the training schedule's requests after which ε is at its floor."""
EVAL_SEED_OFFSET = 1
"""Evaluation round r uses seed + this + r: a schedule other than the training one (same seed and a
shorter duration would be the training schedule's first seconds)."""
SAMPLE_EVERY_S = 2.0
"""How often the trainer's /metrics is read during the training load (ε and guardrail per minute)."""
TRAINER_STOP_S = 120.0
"""Longest wait for the trainer to drain (lbproxy.live_train.DRAIN_TIMEOUT_S, 10 s), checkpoint and write
dqn_final.pth after SIGTERM; then it is killed."""
P99_TRAIN_OVER_FALLBACK_MAX = 1.5
FINAL_OVER_BEST_MAX = 1.0
TARGET_TRAIN_S = 300.0
"""The target's training time ("the model it ends with after 5 minutes")."""


# --- the trainer -------------------------------------------------------------------------------------
def eps_fraction_for(decisions: int, episode_decisions: int, floor_at: float = EPS_FLOOR_AT) -> float:
    """--eps-fraction that puts ε at its floor after `floor_at` x `decisions` decisions of a run of
    TRAIN_EPISODES x `episode_decisions` (lbproxy decays ε over eps_fraction x that total)."""
    return floor_at * decisions / (TRAIN_EPISODES * episode_decisions)


def start_trainer(
    backends: str,
    run_dir: Path,
    eps_fraction: float,
    seed: int,
    episode_decisions: int,
    init_model: Path | None = None,
) -> Proc:
    """`lbproxy --mode train --env live` on free loopback ports, pinned to PROXY_CPU, its output in
    RUN_DIR/trainer.log (a pipe nobody reads for minutes could fill and stall it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "lbproxy", "--mode", "train", "--env", "live", "--host", LOOPBACK]
    argv += ["--port", str(port), "--admin-port", str(admin), "--backends", backends, "--health-interval-s", "0"]
    argv += [
        "--run-dir",
        str(run_dir),
        "--episodes",
        str(TRAIN_EPISODES),
        "--episode-decisions",
        str(episode_decisions),
    ]
    argv += ["--eps-fraction", repr(eps_fraction), "--seed", str(seed)]
    if init_model is not None:
        argv += ["--init-model", str(init_model)]
    with (run_dir / "trainer.log").open("wb") as log:
        popen = subprocess.Popen(
            pinned(PROXY_CPU, argv),
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc = Proc(popen, port, admin)
    try:
        wait_http_ok(f"{proc.admin_url}/readyz", timeout_s=PROXY_BOOT_S, proc=popen)
    except Exception as exc:
        proc.stop()
        raise RuntimeError(f"the trainer did not start: {exc}\n{trainer_log(run_dir)[-3000:]}") from None
    return proc


def trainer_log(run_dir: Path) -> str:
    try:
        return (run_dir / "trainer.log").read_text(errors="replace")
    except OSError:
        return ""


def stop_trainer(proc: Proc, timeout_s: float = TRAINER_STOP_S) -> int:
    """SIGTERM (drain, checkpoint, dqn_final.pth) and its exit status; killed after `timeout_s`."""
    proc.popen.send_signal(signal.SIGTERM)
    try:
        return proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()
        return proc.popen.returncode


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float
    """Seconds since the training load started (to within the generator's start-up lead)."""
    metrics: dict[str, float]


class MetricsSampler(threading.Thread):
    """Reads a proxy's /metrics every `every_s` until stopped; a failed read is skipped."""

    def __init__(self, admin_url: str, every_s: float = SAMPLE_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.every_s = every_s
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self.samples.append(Sample(time.monotonic() - self.t0, proxy_metrics(self.admin_url)))
            except OSError:
                continue

    def stop(self) -> list[Sample]:
        self._done.set()
        self.join(10.0)
        return self.samples


def series(metrics: dict[str, float], name: str, label: str = "") -> float:
    """Sum of `name`'s samples whose labels contain `label` (e.g. 'to="fallback"'); NaN if none."""
    xs = [v for k, v in metrics.items() if k.partition("{")[0] == name and label in k]
    return sum(xs) if xs else math.nan


@dataclass
class TrainRun:
    """The training phase: the client's view, the trainer's metrics during and at the end of the load,
    and how the trainer stopped."""

    measurement: Measurement
    """The client's view; its `metrics` are the trainer's /metrics when the load had ended."""
    samples: list[Sample]
    exit_code: int
    model: Path | None
    """RUN_DIR/dqn_final.pth when the trainer wrote it."""
    log: str
    eps_fraction: float
    eps_floor_decisions: int
    """Decisions after which ε is at its floor (lbproxy.rl.schedule.EpsilonSchedule)."""
    stop_s: float
    """SIGTERM to exit: drain, checkpoint and final model."""


def train(
    cluster: ForeignCluster,
    schedule: Schedule,
    run_dir: Path,
    grace_s: float,
    init_model: Path | None = None,
    eps_floor_at: float = EPS_FLOOR_AT,
    episode_decisions: int = 256,
    sample_every_s: float = SAMPLE_EVERY_S,
) -> TrainRun:
    """`schedule` through a live trainer started from scratch (or `init_model`) in front of `cluster`,
    then SIGTERM and the trainer's final model."""
    cluster.settle(DRAIN_TIMEOUT_S, restart_after_s=RESTART_AFTER_S)
    eps_fraction = eps_fraction_for(len(schedule), episode_decisions, eps_floor_at)
    defaults = Settings.model_fields
    eps = EpsilonSchedule.for_training(
        defaults["eps_start"].default, defaults["eps_end"].default, eps_fraction, TRAIN_EPISODES * episode_decisions
    )
    proc = start_trainer(cluster.backends_arg(), run_dir, eps_fraction, schedule.seed, episode_decisions, init_model)
    try:
        sampler = MetricsSampler(proc.admin_url, sample_every_s)
        sampler.start()
        try:
            m = measure_running(proc, "train", schedule, grace_s)
        finally:
            samples = sampler.stop()
    finally:
        t0 = time.monotonic()
        code = stop_trainer(proc)
        stop_s = time.monotonic() - t0
    final = run_dir / "dqn_final.pth"
    return TrainRun(
        measurement=m,
        samples=samples,
        exit_code=code,
        model=final if final.is_file() else None,
        log=trainer_log(run_dir),
        eps_fraction=eps_fraction,
        eps_floor_decisions=eps.decay_decisions,
        stop_s=stop_s,
    )


# --- per-slice figures --------------------------------------------------------------------------------
def slice_summary(result: RunResult, start_s: float, end_s: float) -> Summary:
    """The requests scheduled in [start_s, end_s), summarised as open_loop summarises a run (times
    counted from start_s)."""
    s = result.schedule
    sel = (s.times_s >= start_s) & (s.times_s < end_s)
    sub = replace(s, duration_s=end_s - start_s, times_s=s.times_s[sel] - start_s, classes=s.classes[sel])
    errors = [e for e, keep in zip(result.errors, sel, strict=True) if keep]
    return summarize("", sub, result.sent_s[sel] - start_s, result.latency_s[sel], result.status[sel], errors)


def slice_bounds(duration_s: float, slice_s: float) -> list[tuple[float, float]]:
    n = max(1, math.ceil(duration_s / slice_s - 1e-9))
    return [(k * slice_s, min(duration_s, (k + 1) * slice_s)) for k in range(n)]


def _at_end(samples: list[Sample], end_s: float) -> Sample | None:
    before = [x for x in samples if x.t_s < end_s]
    return before[-1] if before else None


def per_slice_table(tr: TrainRun, fallback: Measurement, slice_s: float) -> list[str]:
    lines = [
        "| slice s | requests | train p50 ms | train p99 ms | train mean ms | train failed | peak_ewma p99 ms "
        "| train / peak_ewma p99 | ε at end | guardrail tripped (share of samples) | switches to fallback "
        "| learner updates at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    assert tr.measurement.result is not None and fallback.result is not None
    prev: Sample | None = None
    for a, b in slice_bounds(tr.measurement.result.schedule.duration_s, slice_s):
        t, f = slice_summary(tr.measurement.result, a, b), slice_summary(fallback.result, a, b)
        inside = [x for x in tr.samples if a <= x.t_s < b]
        end = _at_end(tr.samples, b)
        if inside and end is not None:
            tripped = statistics.fmean(series(x.metrics, "lbproxy_guardrail_tripped") for x in inside)
            sw = series(end.metrics, "lbproxy_guardrail_switches_total", 'to="fallback"')
            sw_before = series(prev.metrics, "lbproxy_guardrail_switches_total", 'to="fallback"') if prev else 0.0
            state = (
                f"{series(end.metrics, 'lbproxy_epsilon'):.3f} | {tripped:.2f} | {sw - sw_before:.0f} | "
                f"{series(end.metrics, 'lbproxy_learner_updates_total'):.0f}"
            )
            prev = end
        else:
            state = "- | - | - | -"
        lines.append(
            f"| {a:.0f}-{b:.0f} | {t.count} | {t.p50_ms:.1f} | {t.p99_ms:.1f} | {t.mean_ms:.1f} | {t.errors} | "
            f"{f.p99_ms:.1f} | {t.p99_ms / f.p99_ms:.2f} | {state} |"
        )
    return lines


def phase_table(rows: list[tuple[str, Measurement]], workers: list[int]) -> list[str]:
    share_head = "/".join(f"w{w}" for w in workers)
    lines = [
        f"| phase | requests | p50 ms | p99 ms | p99.9 ms | max ms | mean ms | failed (5xx / no answer / timeout) "
        f"| send lag p99 / max ms | proxy CPU % | share {share_head} % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        s = m.summary
        lines.append(
            f"| {name} | {s.count} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.p999_ms:.1f} | {s.max_ms:.1f} | "
            f"{s.mean_ms:.1f} | {s.errors} ({failure_kinds(m)}) | {s.send_lag_p99_ms:.2f} / {s.send_lag_max_ms:.1f} | "
            f"{m.proxy_cpu_pct:.0f} | {'/'.join(f'{100 * x:.0f}' for x in m.shares)} |"
        )
    return lines


def failure_kinds(m: Measurement) -> str:
    """Failed requests split as 5xx responses / connection errors / timeouts."""
    r = m.result
    if r is None:
        return "-"
    server = int((r.status >= 500).sum())
    timeouts = m.summary.timeouts
    return f"{server} / {m.summary.errors - server - timeouts} / {timeouts}"


TRAINER_SERIES = (
    ("lbproxy_guardrail_tripped", ""),
    ("lbproxy_guardrail_switches_total", 'to="fallback"'),
    ("lbproxy_guardrail_switches_total", 'to="dqn"'),
    ("lbproxy_decision_fallbacks_total", 'reason="deadline"'),
    ("lbproxy_decision_fallbacks_total", 'reason="no_model"'),
    ("lbproxy_decision_fallbacks_total", 'reason="unavailable"'),
    ("lbproxy_learner_updates_total", ""),
    ("lbproxy_epsilon", ""),
    ("lbproxy_episode", ""),
)


def metrics_lines(metrics: dict[str, float]) -> list[str]:
    out = []
    for name, label in TRAINER_SERIES:
        value = series(metrics, name, label)
        out.append(f"- `{name}{'{' + label + '}' if label else ''}`: {'absent' if math.isnan(value) else f'{value:g}'}")
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8", help="gunicorn sync workers per backend")
    ap.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="service-time divisor of every backend")
    ap.add_argument("--load", type=float, default=0.8, help="offered load, share of the cluster's capacity")
    ap.add_argument("--mix", default="light=0.6,heavy=0.3,static=0.1", help="request classes (loadgen.open_loop)")
    ap.add_argument("--train-s", type=float, default=TARGET_TRAIN_S, help="seconds of training load (and fallback)")
    ap.add_argument("--slice-s", type=float, default=60.0, help="slice length of the per-slice table")
    ap.add_argument("--eps-floor-at", type=float, default=EPS_FLOOR_AT, help="share of the training requests")
    ap.add_argument("--episode-decisions", type=int, default=256)
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
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    mix = parse_mix(args.mix)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or REPO / "runs" / f"live_train_foreign-{stamp}"
    heuristics, notes = policy_configs([p.strip() for p in args.policies.split(",") if p.strip()], None)
    heuristics = [p for p in heuristics if not p.is_dqn]
    for note in notes:
        print(note, flush=True)
    started = time.monotonic()
    loads = {"start": os.getloadavg()[0]}
    with start_foreign_cluster(workers, args.speed, cpu=LOAD_CPU) as cluster, pinned_self(LOAD_CPU):
        capacity = cluster.capacity_rps(mix)
        rate = args.load * capacity
        schedule = poisson_schedule(rate, args.train_s, args.seed, mix)
        print(f"cluster workers {workers}: capacity {capacity:.0f} req/s, offered {rate:.0f} req/s", flush=True)
        print(f"train: {len(schedule)} requests over {args.train_s:g} s, run dir {run_dir}", flush=True)
        tr = train(cluster, schedule, run_dir, args.grace_s, args.init_model, args.eps_floor_at, args.episode_decisions)
        loads["train"] = os.getloadavg()[0]
        print(f"train        {tr.measurement.summary.line()}; trainer exit {tr.exit_code}", flush=True)
        fb = measure(cluster, FALLBACK, schedule, warmup_s=0.0, grace_s=args.grace_s)
        loads["fallback"] = os.getloadavg()[0]
        print(f"peak_ewma    {fb.summary.line()}", flush=True)
        configs = list(heuristics)
        if tr.model is not None:
            configs.insert(0, PolicyConfig("dqn_trained", ("--policy", "dqn", "--model", str(tr.model))))
        else:
            notes.append(f"the trainer wrote no model (exit {tr.exit_code}): nothing to evaluate")
        if args.init_model is not None:
            configs.insert(1, PolicyConfig("dqn_init", ("--policy", "dqn", "--model", str(args.init_model))))
        cmp = compare(
            cluster,
            configs,
            rate,
            mix,
            args.eval_s,
            args.warmup_s,
            args.grace_s,
            args.rounds,
            args.seed + EVAL_SEED_OFFSET,
            notes,
        )
        loads["evaluation"] = os.getloadavg()[0]
        gunicorn = version("gunicorn")
    elapsed_s = time.monotonic() - started
    text = report(args, argv, workers, mix, capacity, rate, run_dir, tr, fb, cmp, notes, gunicorn, elapsed_s, loads)
    write_result(args.out, text)
    return 0


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    workers: list[int],
    mix: tuple[float, float, float],
    capacity: float,
    rate: float,
    run_dir: Path,
    tr: TrainRun,
    fb: Measurement,
    cmp: Comparison,
    notes: list[str],
    gunicorn: str,
    elapsed_s: float,
    loads: dict[str, float],
) -> list[str]:
    t, f = tr.measurement.summary, fb.summary
    best = cmp.best_heuristic()
    p99_ratio = t.p99_ms / f.p99_ms
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
    runs = [tr.measurement, fb, *(m for ms in cmp.runs.values() for m in ms)]
    lag_p99 = max(m.summary.send_lag_p99_ms for m in runs)
    lag_max = max(m.summary.send_lag_max_ms for m in runs)
    trusted = (
        "the generator kept to its schedule"
        if lag_p99 < LAG_TRUSTED_P99_MS
        else f"**over {LAG_TRUSTED_P99_MS:g} ms: the client machine stalled; treat the tails with care**"
    )
    floor_s = tr.eps_floor_decisions / rate
    to_fallback = 'to="fallback"'
    eval_switches = [
        f"{m.policy} round {m.round + 1}: {series(m.metrics, 'lbproxy_guardrail_switches_total', to_fallback):g}"
        for name in ("dqn_trained", "dqn_init")
        for m in cmp.runs.get(name, [])
    ]
    start_flag = (
        " --init-model " + str(args.init_model) if args.init_model else " (no --init-model: random initial network)"
    )
    return [
        "# Live DQN training from scratch on foreign backends (gunicorn, unequal capacities), open-loop load",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command([shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])}`",
        f"- code: {revision()}",
        f"- backends: {len(workers)} gunicorn {gunicorn} processes, sync workers {workers}, serving "
        f"backends/foreign_app.py at speed {args.speed:g} (as benchmarks/live_foreign.py: no keep-alive, no "
        "service-time headers, no /health)",
        f"- load: open loop, Poisson {rate:.0f} req/s = {args.load:g} x capacity {capacity:.0f} req/s, mix "
        f"light/heavy/static {'/'.join(f'{w:g}' for w in mix)}, {args.grace_s:g} s grace (then unanswered = "
        f"failed timeout)",
        f"- train: `lbproxy --mode train --env live --health-interval-s 0 --episodes {TRAIN_EPISODES} "
        f"--episode-decisions {args.episode_decisions} --eps-fraction {tr.eps_fraction:.6g}`{start_flag}, "
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
        f"- run time: {elapsed_s / 60:.1f} min; 1-minute load average {loads['start']:.2f} at the start, "
        f"{loads['train']:.2f} after training, {loads['fallback']:.2f} after the fallback run, "
        f"{loads['evaluation']:.2f} after the evaluation (2 vCPU shared with other work)",
        *([f"- note: {args.note}"] if args.note else []),
        *(f"- {n}" for n in notes),
        "",
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
        "",
        "## Training and fallback, the same schedule",
        "",
        *phase_table([("train (dqn learning)", tr.measurement), ("fallback (peak_ewma)", fb)], workers),
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
        "",
        "## Evaluation: the trained model against the heuristics",
        "",
        *table(cmp, workers),
        "",
        f"Best heuristic (lowest median p99): {best or '-'}. Medians over rounds. Guardrail switches to the "
        "fallback while a model was served: " + ("; ".join(eval_switches) if eval_switches else "-") + ".",
        "",
        f"Generator send lag (actual minus scheduled send): worst p99 {lag_p99:.2f} ms, worst max {lag_max:.1f} ms "
        f"over all runs ({trusted}); training {t.send_lag_p99_ms:.2f} / {t.send_lag_max_ms:.1f} ms, fallback "
        f"{f.send_lag_p99_ms:.2f} / {f.send_lag_max_ms:.1f} ms (p99 / max).",
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
