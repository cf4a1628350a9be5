"""Routing policies live, side by side, on foreign backends with unequal capacities under open-loop load.

    .venv/bin/python benchmarks/live_foreign.py [--workers 1,2,4,8] [--load 0.8] [--duration-s 30] [--rounds 3]
        [--policies round_robin,random,least_conn,p2c,peak_ewma,sed,prequal,c3,dqn,dqn_online]
        (a policy may carry proxy flags: dqn_online@lr=0.0001 runs it with --lr 0.0001)

The backends are gunicorn processes (sync workers) serving backends/foreign_app.py: a server this
project did not write, which sends none of the headers our own backends send (no service time, no
utilisation, no /health), with capacity set by worker count. The proxy is told only their URLs
(`--weights workers` gives it the worker counts as weights). The load is open loop
(loadgen/open_loop.py: Poisson arrivals drawn from a seed, never waiting for answers), so a policy
that queues cannot slow its own offered load down.

For each round, in an order shuffled per round with a fixed seed, each policy gets a fresh proxy in
front of the same cluster, a short warm-up, then the same schedule (seed + round: every policy of a
round sees identical arrival times and classes). No run starts behind another's queue: the warm-up's
is waited for, and after a run a backend still holding one is restarted. The table shows medians over
rounds with min-max, and each policy's p99 over the best heuristic's (lowest median p99 among non-dqn
policies) from the same run. Policies lbproxy does not know yet (prequal and c3 are being added) are
skipped with a note.

Pinning as ANCHORS.md: the proxy alone on CPU 0; this process (the generator) and the backends on CPU
1 (when taskset exists). The generator's own send lag is reported so the figures can be trusted.
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import LOAD_CPU, PROXY_CPU, TASKSET, machine, quoted_command, revision, utc_now, write_result  # noqa: E402
from live_compare import ClusterRun, add_cluster_args, compare, live_cluster, policy_configs  # noqa: E402
from live_tables import SHAPED, per_run_table, send_lag, table  # noqa: E402

from lbproxy.cluster import ServiceSpec  # noqa: E402

DEFAULT_POLICIES = (
    "round_robin",
    "random",
    "least_conn",
    "p2c",
    "peak_ewma",
    "sed",
    "prequal",
    "c3",
    "dqn",
    "dqn_online",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(ap)
    ap.add_argument("--duration-s", type=float, default=30.0, help="seconds of measured arrivals per run")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="seconds of unmeasured arrivals first")
    ap.add_argument("--grace-s", type=float, default=10.0, help="wait for answers past the last send")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="schedule seed of round 1 (round r: seed + r - 1)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated, in table order")
    ap.add_argument("--weights", choices=("none", "workers"), default="none", help="what the proxy is told")
    ap.add_argument("--model", type=Path, default=None, help="model for the dqn policies (default: shipped)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/live_foreign.md")
    ap.add_argument("--note", default="", help="free text for the results file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs, notes = policy_configs([p.strip() for p in args.policies.split(",") if p.strip()], args.model)
    for note in notes:
        print(note, flush=True)
    with live_cluster(args) as (cluster, facts):
        cmp = compare(
            cluster,
            configs,
            facts.rate_rps,
            facts.mix,
            args.duration_s,
            args.warmup_s,
            args.grace_s,
            args.rounds,
            args.seed,
            notes,
            args.weights == "workers",
        )
        facts.loads["end"] = os.getloadavg()[0]
    lines = table(cmp, facts.workers)
    print("\n".join(lines))
    all_runs = [m for ms in cmp.runs.values() for m in ms]
    lag = send_lag(all_runs)
    failed = sum(m.summary.errors for m in all_runs)
    total = sum(m.summary.count for m in all_runs)
    print(f"generator send lag: worst p99 {lag.p99_ms:.2f} ms, max {lag.max_ms:.1f} ms; {failed} of {total} failed")
    print(f"took {facts.elapsed_s / 60:.1f} min")
    text = [
        *setup_lines(args, argv, facts, notes),
        "",
        *lines,
        "",
        f"Best heuristic (lowest median p99): {cmp.best_heuristic() or '-'}. Figures are medians over rounds; "
        "latency percentiles count every request (failed ones at their time to failure, timeouts at their age at "
        "the cut-off). Failed = status >= 500, connection errors and timeouts. Share = the proxy's requests to "
        "each backend.",
        "",
        f"Generator send lag (actual minus scheduled send): worst p99 {lag.p99_ms:.2f} ms, worst max "
        f"{lag.max_ms:.1f} ms over all runs ({lag.trusted}). Failed requests: {failed} of {total}.",
        "",
        *SHAPED,
        "",
        "## Every run",
        "",
        *per_run_table(cmp),
    ]
    write_result(args.out, text)
    return 0


def setup_lines(args: argparse.Namespace, argv: list[str] | None, facts: ClusterRun, notes: list[str]) -> list[str]:
    """The results file's title and what was run: machine, command, backends, proxy, load, run time."""
    workers, mix = facts.workers, facts.mix
    cap_share = "/".join(f"{100 * w / sum(workers):.0f}" for w in workers)
    means_ms = " / ".join(
        f"{c} {1e3 * m / args.speed:g}" for c, m in zip(("light", "heavy", "static"), ServiceSpec().mean_s, strict=True)
    )
    return [
        "# Routing policies live on foreign backends (gunicorn, unequal capacities), open-loop load",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{quoted_command(argv)}`",
        f"- code: {revision()}",
        f"- backends: {len(workers)} gunicorn {facts.gunicorn} processes, sync workers {workers} (capacity share "
        f"{cap_share} %), serving backends/foreign_app.py at speed {args.speed:g}: exponential service times, "
        f"means {means_ms} ms; no keep-alive (sync workers close every connection), no service-time headers, "
        "no /health",
        "- proxy: `lbproxy --mode serve --health-interval-s 0`, backends "
        + ("weighted by workers" if args.weights == "workers" else "unweighted (URLs only)")
        + (f"; pinned to CPU {PROXY_CPU}, generator and backends to CPU {LOAD_CPU}" if TASKSET else "; unpinned"),
        f"- load: open loop (loadgen/open_loop.py), Poisson {facts.rate_rps:.0f} req/s = {args.load:g} x capacity "
        f"{facts.capacity_rps:.0f} req/s (sum of workers / mean service time under the mix), mix light/heavy/static "
        f"{'/'.join(f'{w:g}' for w in mix)}; {args.duration_s:g} s measured after a {args.warmup_s:g} s warm-up, "
        f"{args.grace_s:g} s grace (then unanswered = failed timeout); schedule seed {args.seed} + round, the same "
        f"for every policy of a round; {args.rounds} rounds, policy order shuffled per round",
        f"- run time: {facts.elapsed_s / 60:.1f} min; 1-minute load average {facts.loads['start']:.2f} at the start, "
        f"{facts.loads['end']:.2f} at the end (2 vCPU shared with other work)",
        *([f"- note: {args.note}"] if args.note else []),
        *(f"- {n}" for n in notes),
    ]


if __name__ == "__main__":
    sys.exit(main())
