"""Backend faults under open-loop load, for each policy: a SIGKILLed backend, one answering 500s, one
hanging, then all four down, and what the clients saw in each window.

    .venv/bin/python benchmarks/reliability.py [--policies p2c,dqn] [--load 0.5] [--proxy-args "..."]

Each policy gets a fresh proxy (`lbproxy --mode serve --policy P`, defaults otherwise) in front of four
fresh emulated backends (benchmarks/emulated_backends.py) and Poisson load at `--load` x capacity
(loadgen/open_loop.py, every request a GET with a per-request client timeout), while these events
run in sequence, each in a window of fixed length (so every policy sees the same timeline):

1. kill:     SIGKILL b0, restart it on its port `restart_after_s` later;
2. errors:   b1 answers every request with a 500 (fault admin error_rate=1) for `error_s`, then resets;
3. hang:     b2 stops answering (fault admin pause) for `hang_s`, then resumes;
4. all down: SIGKILL all four, restart them `down_s` later; the proxy is never restarted.

Per window: requests sent in it, failed (no response, or status >= 500: for idempotent GETs, lost),
error rate, p99 and slowest answer; for events 1-3 the time from the backend's recovery until the
proxy relays a 2xx from it again ("back in rotation"; requests it held during a hang, answered at
resume, are not counted as new traffic); for event 4 whether every request while all were down got a
fast 502/503, and whether any request failed once they were back.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine, quoted_command, revision, utc_now, write_result  # noqa: E402
from live_compare import policy_configs  # noqa: E402
from reliability_run import AFTER_RESTORE_S, EventRow, Plan, ReliabilityRun, run_reliability  # noqa: E402

from loadgen.open_loop import DEFAULT_MIX  # noqa: E402

# --- the report ----------------------------------------------------------------------------------------
SHAPED = [
    "## What shaped these numbers",
    "",
    "- Back in rotation is bounded below by the outlier ejection: 5 consecutive failures eject a backend for "
    "30 s x the times it was ejected (Envoy's defaults, lbproxy/outlier.py), and with no active health check "
    "(the default unless `--health-path` is set) nothing re-admits it sooner, although an emulated backend "
    "answers again about a second after its restart. Envoy re-admits an ejected host on a passing active health "
    "check (`successful_active_health_check_uneject_host`, default true); lbproxy does not.",
    "- A hung backend costs the per-try timeout (5 s, lbproxy/retry.py): the requests it holds are abandoned "
    "then and retried on another backend, so the hang window's slowest answers are ~5 s; without a per-try "
    "timeout they would wait for the 30 s read timeout (the client's 10 s here: lost).",
    "- Every retry needs a slot in the retry budget (20 % of active requests, at least 3 at once: Envoy's "
    "defaults); a retry after a refused connect needs none. A kill cuts off every request in flight to the "
    "dead backend at once; when they outnumber the free slots, the rest wait up to 1 s for one "
    "(lbproxy/proxy/retry_sweep.py SLOT_WAIT_S; until 2026-12-02 they were answered 502 at once).",
    "- All down: the failures eject at most half of the backends (`max_ejection_percent` 50); after the restart "
    "those stay out for their ejection time while the others carry the whole load (the `available` note), "
    "which is what the recovery window's p99 shows.",
]


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(rows: Sequence[EventRow]) -> list[str]:
    lines = [
        "| policy | event | requests | lost (failed) | error % | p99 ms | slowest ms | back in rotation s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.stats
        notes = []
        if r.failed_in_flight_at_fault:
            notes.append(f"{r.failed_in_flight_at_fault} of them in flight at the fault")
        if r.fast_5xx is not None:
            notes.append(f"fast 502/503: {r.fast_5xx[0]} of {r.fast_5xx[1]}")
        if r.recovered_s is not None:
            notes.append(f"last failure {r.recovered_s:.2f} s after all four were up")
        if r.available is not None:
            notes.append(f"{r.available} of 4 available to the proxy then")
        codes = ", ".join(f"{c or 'none'}: {n}" for c, n in sorted(s.codes.items()) if c != 200)
        if codes:
            notes.append(f"non-200: {codes}")
        back = "-" if r.event in ("all_down", "recovery") else ("not back" if r.back_s is None else f"{r.back_s:.1f}")
        lines.append(
            f"| {r.policy} | {r.event} | {s.requests} | {s.failed} | {100 * s.error_rate:.2f} | {_f(s.p99_ms)} | "
            f"{_f(s.max_ms)} | {back} | {'; '.join(notes)} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="p2c,dqn", help="comma-separated; each runs alone on a fresh cluster")
    ap.add_argument("--load", type=float, default=0.5, help="offered load, share of the cluster's capacity")
    ap.add_argument("--proxy-args", default="", help="extra lbproxy flags, e.g. '--eject-base-s 5'")
    ap.add_argument("--return-wait-s", type=float, default=Plan.return_wait_s)
    ap.add_argument("--client-timeout-s", type=float, default=Plan.client_timeout_s)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/reliability.md")
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        load=args.load, return_wait_s=args.return_wait_s, client_timeout_s=args.client_timeout_s, seed=args.seed
    )
    configs, notes = policy_configs([p.strip() for p in args.policies.split(",") if p.strip()], None)
    for note in notes:
        print(note, flush=True)
    extra = shlex.split(args.proxy_args)
    runs: list[ReliabilityRun] = []
    with tempfile.TemporaryDirectory(prefix="lbproxy-reliability-") as tmp:
        for p in configs:
            run = run_reliability([p], plan, Path(tmp), extra)
            runs.append(run)
            print("\n".join(table([r for r in run.rows])), flush=True)
    lines = table([r for run in runs for r in run.rows])
    print("\n".join(lines))
    if not args.no_write and runs:
        write_result(args.out, report(runs, plan, extra, notes, lines, argv))
    return 0


def report(
    runs: Sequence[ReliabilityRun],
    plan: Plan,
    extra: Sequence[str],
    notes: Sequence[str],
    lines: Sequence[str],
    argv: list[str] | None,
) -> list[str]:
    """The results file: the setup and timeline, the table (`lines`), each proxy's counters."""
    first = runs[0]
    starts = plan.starts()
    return [
        "# Reliability: backend faults under open-loop load",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{quoted_command(argv)}`",
        f"- code: {revision()}",
        "- proxy: `lbproxy --mode serve --policy P --seed "
        f"{plan.seed}{' ' + ' '.join(extra) if extra else ''} --backends <4 URLs>`, one fresh proxy and cluster "
        "per policy, every other setting at its default",
        f"- backends: 4 x `python -m backends --workers 2 --speed 0.5`, capacity {first.capacity_rps:.0f} req/s",
        f"- load: open loop, Poisson {first.rate_rps:.0f} req/s = {plan.load:g} x capacity, all GETs, mix "
        f"light/heavy/static {'/'.join(f'{w:g}' for w in DEFAULT_MIX)}, client timeout {plan.client_timeout_s:g} s "
        f"per request, {plan.duration_s:.0f} s per policy",
        f"- timeline (s from the load's start): kill b0 at {starts['kill']:g}, restart after "
        f"{plan.restart_after_s:g} s; b1 500s at {starts['errors']:g} for {plan.error_s:g} s; b2 hangs at "
        f"{starts['hang']:g} for {plan.hang_s:g} s; all four killed at {starts['all_down']:g}, restarted after "
        f"{plan.down_s:g} s",
        f"- run time: {sum(r.elapsed_s for r in runs) / 60:.1f} min",
        *(f"- {n}" for n in notes),
        "",
        *lines,
        "",
        "Windows: kill = from the SIGKILL to the next event; errors and hang = from the fault until "
        f"{AFTER_RESTORE_S:g} s after the backend recovered; all_down = from the kill of all four until their "
        "restart begins; recovery = from all four answering /health again to the end. Lost = requests sent in "
        "the window (or in flight at its start) that got no response or a status >= 500 (client timeouts "
        "included). Back in rotation = from the backend's recovery until the proxy relays a new 2xx from it.",
        "",
        "Proxy counters at the end of each run:",
        "",
        *(f"- {name}: {c}" for run in runs for name, c in run.counters.items()),
        "",
        *SHAPED,
    ]


if __name__ == "__main__":
    sys.exit(main())
