"""A bounded soak: lbproxy learning live in front of four emulated backends, under phased open-loop load,
with one backend SIGKILLed and restarted on its port every `--kill-every-s`; the proxy process is sampled
throughout (RSS, open fds, threads, asyncio tasks, replay size) and judged flat or not.

    .venv/bin/python benchmarks/soak.py [--duration-s 600] [--mode train|online] [--write]
    .venv/bin/python benchmarks/soak.py --duration-s 30          # the CI version (tests/test_soak.py)

`--mode train` runs `lbproxy --mode train --backends ...` (ε schedule, episodes, checkpoints, CSV rows);
`--mode online` runs `lbproxy --mode serve --policy dqn --online` (the shipped model learning while it
serves). Either way the replay buffer is sized to fill within the first ~35 % of the run, so the second
half measures a proxy whose buffer, decision table and connection pools are all at their bound.

Load: Poisson arrivals (loadgen/open_loop.py) cycling through `--loads` (shares of the cluster's
capacity, default 0.3 -> 0.7 -> 0.5), each phase `--phase-s` long, so the first half holds at least
one whole cycle and the halves compare like with like. Kills rotate over the backends; each backend
comes back `--restart-after-s` later on the same port.

Verdict (each rule printed with its numbers; exit code 1 when one fails):
- RSS: the Theil-Sen slope over the second half is at most `--rss-slope-mb-per-min`, or the rise it
  projects over that half is at most `--rss-slack-mb` (on a 15 s half, allocator noise alone is a few MB);
- open fds: once the load has ended, the fds that no live connection explains (all but the pooled
  keep-alive connections to backends, which expire after 30 s; proxy_process.fd_census) are at most
  as many as before the load plus `--fd-slack`. Under load the count follows concurrency (client and
  upstream connections, peaks after a kill), so a comparison of fds under load measures the load;
- asyncio tasks (when the proxy exports them): at rest at most the count before the load plus a slack;
- threads: the second half's maximum at most the first half's plus a slack;
- in flight: zero once the load has ended;
- replay: the buffer filled and stayed at its capacity;
- lost requests: none failed except those in flight at a kill (within `KILL_TOLERANCE_S`).
"""

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine, quoted_command, revision, utc_now, write_result  # noqa: E402
from proxy_process import TASKS_METRIC, ProcSample  # noqa: E402
from soak_run import BUFFER_FILL_SHARE, SETTLE_S, SoakConfig, SoakRun, run_soak  # noqa: E402
from soak_verdict import Rule, headline, verdict  # noqa: E402

from loadgen.open_loop import DEFAULT_MIX  # noqa: E402


# --- the report ----------------------------------------------------------------------------------------
def _phase_at(run: SoakRun, t_s: float) -> str:
    t = 0.0
    for ph in run.phases:
        if t <= t_s < t + ph.duration_s:
            return f"{ph.rate_rps / run.capacity_rps:.1f}"
        t += ph.duration_s
    return "-"


def sample_table(run: SoakRun, every_s: float) -> list[str]:
    lines = [
        "| t s | load | RSS MB | fds | threads | tasks | replay | in flight | proxy CPU % | events |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(run.samples) + ([run.idle] if run.idle is not None else [])
    shown: list[tuple[ProcSample, ProcSample | None]] = []
    next_t = -1.0
    last_shown: ProcSample | None = None
    for i, s in enumerate(rows):
        if s.t_s >= next_t or i == len(rows) - 1:
            shown.append((s, last_shown))
            last_shown = s
            next_t = s.t_s + every_s - 1e-6
    for s, before in shown:
        cpu = (
            f"{100 * (s.cpu_s - before.cpu_s) / (s.t_s - before.t_s):.0f}"
            if before is not None and s.t_s > before.t_s
            else "-"
        )
        lo = before.t_s if before is not None else -1.0
        events = [f"kill b{i}" for t, i in run.kills if lo < t <= s.t_s]
        events += [f"b{i} back" for t, i in run.restarts if lo < t <= s.t_s]
        is_idle = s is run.idle
        lines.append(
            f"| {s.t_s:.0f} | {'idle' if is_idle else _phase_at(run, s.t_s)} | {s.rss_mb:.1f} | {s.fds} | "
            f"{s.threads} | {_opt(s.tasks)} | {_opt(s.replay)} | {_opt(s.in_flight)} | {cpu} | "
            f"{', '.join(events)} |"
        )
    return lines


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def report(run: SoakRun, rules: list[Rule], argv: Sequence[str], table_every_s: float) -> list[str]:
    cfg = run.config
    assert run.result is not None
    s = run.result.summary
    at_kill, other = run.lost()
    loads = " -> ".join(f"{x:g}" for x in cfg.loads)
    return [
        "# Soak: live learning under phased load with periodic backend kills",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{quoted_command(argv)}`",
        f"- code: {revision()}",
        f"- proxy: `lbproxy {' '.join(run.proxy_args)} --backends <4 URLs>` (replay buffer {run.buffer_size} "
        f"transitions: full within the first ~{100 * BUFFER_FILL_SHARE:.0f} % of the requests)",
        "- backends: 4 x `python -m backends --workers 2 --speed 0.5` (emulated_backends.py), capacity "
        f"{run.capacity_rps:.0f} req/s at the mix light/heavy/static {'/'.join(f'{w:g}' for w in DEFAULT_MIX)}",
        f"- load: open loop, Poisson, {cfg.duration_s:g} s cycling {loads} x capacity in {cfg.phase_s:g} s "
        f"phases; {s.count} requests",
        f"- faults: SIGKILL of one backend every {cfg.kill_every_s:g} s (rotating), restarted on its port "
        f"{cfg.restart_after_s:g} s later: {len(run.kills)} kills",
        f"- sampling: every {cfg.sample_every_s:g} s, RSS = VmRSS and fds = /proc/PID/fd of the proxy process, "
        f"tasks = {TASKS_METRIC} when exported",
        f"- run time: {run.elapsed_s / 60:.1f} min",
        "",
        f"## Verdict: {headline(rules)}",
        "",
        *(f"- {'ok' if r.ok else 'FAIL'} {r.name}: {r.detail}" for r in rules),
        "",
        f"Requests: {s.line()}. Failed: {at_kill} in flight at a kill, {other} otherwise.",
        "",
        f"Proxy counters after the load: {run.counters}.",
        "",
        "## Samples",
        "",
        *sample_table(run, table_every_s),
        "",
        "load = offered share of capacity in the phase at the sample; the last row (idle) is taken "
        f"{SETTLE_S:g} s after the last answer.",
    ]


def print_verdict(rules: list[Rule]) -> None:
    print(f"soak verdict: {headline(rules)}", flush=True)
    for r in rules:
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=600.0, help="seconds of load (30 for the CI version)")
    ap.add_argument("--mode", choices=("train", "online"), default="train", help="live training or serve --online")
    ap.add_argument("--loads", default="0.3,0.7,0.5", help="phase loads, shares of capacity, cycled")
    ap.add_argument("--phase-s", type=float, default=None, help="seconds per phase (default min(40, duration/6))")
    ap.add_argument("--kill-every-s", type=float, default=None, help="default 1.5 phases, at most 60 s")
    ap.add_argument("--restart-after-s", type=float, default=1.0)
    ap.add_argument("--sample-every-s", type=float, default=None, help="default duration/120 within [1, 5]")
    ap.add_argument("--eject-base-s", type=float, default=None, help="default kill interval/6, >= restart + 2 s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write --out")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.md")
    ap.add_argument("--table-every-s", type=float, default=None, help="rows of the samples table (default 30 s)")
    args = ap.parse_args(argv)
    cfg = SoakConfig(
        duration_s=args.duration_s,
        mode=args.mode,
        loads=tuple(float(x) for x in args.loads.split(",")),
        phase_s=args.phase_s,
        kill_every_s=args.kill_every_s,
        restart_after_s=args.restart_after_s,
        sample_every_s=args.sample_every_s,
        eject_base_s=args.eject_base_s,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="lbproxy-soak-") as tmp:
        run = run_soak(cfg, Path(tmp))
    rules = verdict(run)
    assert run.result is not None
    print(run.result.summary.line(), flush=True)
    rss = [s.rss_mb for s in run.samples]
    if rss:
        print(f"RSS MB: min {min(rss):.1f}, median {statistics.median(rss):.1f}, max {max(rss):.1f}", flush=True)
    print_verdict(rules)
    if args.write:
        every = args.table_every_s or (30.0 if cfg.duration_s >= 300 else run.config.resolved().sample_every_s or 1)
        write_result(args.out, report(run, rules, sys.argv[1:] if argv is None else argv, every))
    return 0 if all(r.ok for r in rules) else 1


if __name__ == "__main__":
    sys.exit(main())
