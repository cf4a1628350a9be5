"""Proxy throughput and CPU per request with `--workers N`, side by side in one run (wrk, 2 real backends).

    .venv/bin/python benchmarks/workers.py [--workers 1,2] [--duration 5] [--rounds 5] [--wrk-threads 1]
        [--out benchmarks/results/workers.md]

One proxy per worker count (round_robin), started once over the same two backends (256 workers, 1 ms
constant service: not the bottleneck); rounds interleave the counts so drift on a shared machine hits
all of them alike. Pinning as ANCHORS.md, widened for N workers: the proxy (supervisor and workers) on
CPUs 0..N-1, wrk and the backends on the CPUs left over, or on the last CPU when none are (then they
share it with a worker, and the table says so). CPU per request = the whole proxy tree's utime+stime
over the run / requests completed. Also measured: the CPU the load side (wrk, backends) used, since on
a machine with few cores that, not the proxy, sets the ceiling.

The issue 12 targets this measures: throughput >= 0.9 x N x one worker's while the proxy is CPU-bound,
CPU per request within 10 % of one worker's.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import (  # noqa: E402
    CONNECTIONS,
    TASKSET,
    WRK,
    bootstrap_median_interval,
    command,
    cpu_s,
    machine,
    pinned,
    run_wrk,
    utc_now,
    write_result,
)
from dqn_proxy import start_backend  # noqa: E402
from support import Proc, lbproxy_argv, start_on_free_ports  # noqa: E402

from lbproxy.config_values import usable_cpus  # noqa: E402


def cpu_set(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def start_proxy(backends: list[str], workers: int, cpus: list[int]) -> Proc:
    tail = ["--backends", ",".join(backends), "--health-interval-s", "0", "--workers", str(workers)]

    def launch(port: int, admin: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            pinned(cpu_set(cpus), [sys.executable, *lbproxy_argv("serve", port, admin), *tail]),
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,  # N workers for minutes: a pipe nobody reads would fill and block them
            stderr=subprocess.STDOUT,
        )

    return start_on_free_ports(launch)


def machine_busy_s() -> float:
    """CPU seconds every process on the machine spent so far (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU of this process's reaped children: each wrk run, once it has exited."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Layout:
    """Which CPUs each proxy (by worker count) and the load side (wrk, backends) run on."""

    counts: list[int]
    cpus: list[int]

    @property
    def widest(self) -> int:
        return max(self.counts)

    @property
    def load_cpus(self) -> list[int]:
        return self.cpus[self.widest :] or self.cpus[-1:]

    @property
    def shared(self) -> bool:
        """No CPU left over for the load side: it shares the last one with a worker."""
        return not self.cpus[self.widest :]

    def proxy_cpus(self, n: int) -> list[int]:
        return self.cpus[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated; the first is the baseline")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=CONNECTIONS)
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (ANCHORS.md: 1; more for many workers)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/workers.md")
    ap.add_argument("--note", default="", help="free text for the results file")
    args = ap.parse_args(argv)
    if shutil.which(WRK) is None:
        print("workers: wrk not found; install Debian's `wrk` package", file=sys.stderr)
        return 2
    layout = Layout([int(x) for x in args.workers.split(",") if x.strip()], sorted(os.sched_getaffinity(0)))
    results = run_rounds(args, layout)
    lines = table_lines(results, layout)
    print("\n".join(lines))
    write_result(args.out, [t for t in report(args, argv, layout, results, lines) if t is not None])
    return 0


def run_rounds(args: argparse.Namespace, layout: Layout) -> dict[int, list[dict[str, float]]]:
    """One proxy per worker count, started once; `--rounds` interleaved rounds of one wrk run each."""
    load = cpu_set(layout.load_cpus)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in layout.counts}
    backends = [start_backend("b1"), start_backend("b2")]  # pinned to CPU 1 (dqn_proxy.start_backend) ...
    proxies: dict[int, Proc] = {}
    try:
        for b in backends:  # ... and to the load CPUs here
            if TASKSET is not None:
                subprocess.run([TASKSET, "-a", "-p", "-c", load, str(b.popen.pid)], capture_output=True)
        urls = [b.url for b in backends]
        for n in layout.counts:
            proxies[n] = start_proxy(urls, n, layout.proxy_cpus(n))
            run_wrk(proxies[n].url + "/api/light", 1, args.connections, load, args.wrk_threads)
        for rnd in range(args.rounds):
            for n, proxy in proxies.items():
                row = measure_round(args, proxy, backends, load)
                results[n].append(row)
                print(
                    f"round {rnd + 1} workers {n}: {row['rps']:.0f} req/s, {row['cpu_us_per_req']:.1f} µs CPU/req, "
                    f"proxy {row['proxy_cores']:.2f} cores, wrk+backends {row['load_cores']:.2f} cores, "
                    f"other processes {row['other_cores']:.2f} cores, "
                    f"errors {row['errors']:.0f}",
                    flush=True,
                )
    finally:
        for p in [*proxies.values(), *backends]:
            p.stop()
            if p.popen.stdout is not None:
                p.popen.stdout.close()
    return results


def measure_round(args: argparse.Namespace, proxy: Proc, backends: list[Proc], load_cpus: str) -> dict[str, float]:
    """One wrk run through `proxy`: wrk's figures, the proxy's CPU per request, and the cores busy on each side."""
    c0, b0, w0, m0, t0 = (
        cpu_s(proxy.popen.pid),
        sum(cpu_s(b.popen.pid) for b in backends),
        children_cpu_s(),
        machine_busy_s(),
        time.monotonic(),
    )
    r = run_wrk(proxy.url + "/api/light", args.duration, args.connections, load_cpus, args.wrk_threads)
    wall = time.monotonic() - t0
    row = r.as_dict()
    row["cpu_us_per_req"] = (cpu_s(proxy.popen.pid) - c0) * 1e6 / max(1, r.requests)
    row["proxy_cores"] = (cpu_s(proxy.popen.pid) - c0) / wall
    row["load_cores"] = (sum(cpu_s(b.popen.pid) for b in backends) - b0 + children_cpu_s() - w0) / wall
    row["other_cores"] = max(0.0, (machine_busy_s() - m0) / wall - row["proxy_cores"] - row["load_cores"])
    return row


def median_of(results: dict[int, list[dict[str, float]]], n: int, key: str) -> float:
    """The median over rounds of one figure of the proxy with n workers."""
    return statistics.median(r[key] for r in results[n])


def table_lines(results: dict[int, list[dict[str, float]]], layout: Layout) -> list[str]:
    """Medians per worker count against the first, and the per-round ratios with their intervals."""
    counts = layout.counts
    base = counts[0]

    med = functools.partial(median_of, results)

    lines = [
        f"| workers | proxy CPUs | req/s (median) | vs {base} | CPU µs/req | vs {base} | proxy cores busy "
        "| wrk + backends cores busy | other processes' cores | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        lines.append(
            f"| {n} | {cpu_set(layout.proxy_cpus(n))} | {med(n, 'rps'):.0f} | {med(n, 'rps') / med(base, 'rps'):.3f} "
            f"| {med(n, 'cpu_us_per_req'):.1f} | {med(n, 'cpu_us_per_req') / med(base, 'cpu_us_per_req'):.3f} "
            f"| {med(n, 'proxy_cores'):.2f} | {med(n, 'load_cores'):.2f} | {med(n, 'other_cores'):.2f} "
            f"| {med(n, 'p50_ms'):.2f} "
            f"| {med(n, 'p99_ms'):.2f} | {sum(r['errors'] for r in results[n]):.0f} |"
        )
    lines.append("")
    for n in counts[1:]:
        rps = [a["rps"] / b["rps"] for a, b in zip(results[n], results[base], strict=True)]
        cpu = [a["cpu_us_per_req"] / b["cpu_us_per_req"] for a, b in zip(results[n], results[base], strict=True)]
        for what, xs, target in (
            ("throughput", rps, f"target >= {0.9 * n / base:.1f} while CPU-bound"),
            ("CPU per request", cpu, "target <= 1.10"),
        ):
            lo, hi = bootstrap_median_interval(xs)
            lines.append(
                f"- {what} {n} / {base} workers per round: {', '.join(f'{x:.3f}' for x in xs)} (median "
                f"{statistics.median(xs):.3f}, 90 % bootstrap interval of the median {lo:.3f}-{hi:.3f}; {target})"
            )
    return lines


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    layout: Layout,
    results: dict[int, list[dict[str, float]]],
    lines: list[str],
) -> list[str | None]:
    counts, widest, load_cpus, shared = layout.counts, layout.widest, layout.load_cpus, layout.shared

    med = functools.partial(median_of, results)

    total = len(layout.cpus)
    busy = {n: (med(n, "proxy_cores"), med(n, "load_cores"), med(n, "other_cores")) for n in counts}
    measured = " ".join(
        f"With {n} worker(s) the machine was busy {sum(busy[n]):.2f} of {total} cores (proxy {busy[n][0]:.2f}, "
        f"wrk + backends {busy[n][1]:.2f}, other processes {busy[n][2]:.2f})."
        for n in counts
    )
    limit = (
        f"This machine has {total} CPUs: with {widest} workers the proxy, wrk and both backends share them "
        f"(the load side on CPU {cpu_set(load_cpus)}, which a worker also runs on). The sum of the busy-cores "
        f"columns shows how close to {total} the whole machine ran: when it is near {total}, the figure measures "
        "the machine, not the proxy, and throughput cannot scale with workers; CPU per request still says what "
        "each request costs the proxy."
        if shared
        else f"The load side (wrk with {args.wrk_threads} thread(s), both backends) had CPUs {cpu_set(load_cpus)} "
        "to itself; a busy-cores figure near its CPU count (or wrk's threads) means the load, not the proxy, "
        "was the limit."
    )
    return [
        "# Proxy workers: --workers N side by side (same run)",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}; CPUs this process may use: {usable_cpus()}",
        f"- command: `{command(argv)}`",
        f"- load: wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s --latency on /api/light, "
        f"{args.rounds} interleaved rounds over proxies (round_robin) started once; 2 backends (256 workers, 1 ms "
        "constant service); "
        + (
            f"proxy tree on CPUs 0..N-1, wrk + backends on CPU(s) {cpu_set(load_cpus)}"
            if TASKSET
            else "no taskset: unpinned"
        ),
        "- CPU µs/req: utime+stime of the supervisor and its workers over the run / requests completed; "
        "cores busy: CPU seconds / wall seconds of the run (wrk's from its rusage, the backends' from /proc; "
        "other processes': the machine's busy time from /proc/stat less those, i.e. work that is not this run's)",
        f"- note: {args.note}" if args.note else None,
        "",
        *lines,
        "",
        "## What limits the figure",
        "",
        limit,
        "",
        measured,
    ]


if __name__ == "__main__":
    sys.exit(main())
