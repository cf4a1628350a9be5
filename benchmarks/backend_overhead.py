"""How many requests/s one emulated backend process answers, vs a bare aiohttp server, side by side.

    .venv/bin/python benchmarks/backend_overhead.py [--duration 5] [--rounds 3] [--out FILE.md]

Why: the backends must never be the bottleneck of a proxy benchmark (ANCHORS.md: the proxy does
~8k req/s). This measures what the emulation (FIFO worker pool, seeded service-time draw, four
headers, Prometheus counters) costs per request on top of plain aiohttp+uvloop.

Configurations, each a fresh server process, wrk with 64 connections on loopback:
  bare aiohttp           one handler returning a 40-byte body (uvloop, access log off)
  backend, 0 ms          python -m backends --workers 256 --distribution constant --light-ms 0.001
  backend, 1 ms          the same with 1 ms constant service (what benchmarks/dqn_proxy.py uses)
Pinning: the server on CPU 0, wrk on CPU 1 (when `taskset` exists). Rounds interleave the
configurations so drift on a shared machine hits all of them alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from common import CONNECTIONS, TASKSET, machine, pinned, run_wrk  # noqa: E402
from support import LOOPBACK, Proc, free_port, wait_http_ok  # noqa: E402

BARE_SERVER = """
import sys, uvloop
from aiohttp import web
async def h(request):
    return web.Response(text='{"backend": "bare", "class": "light"}\\n')
app = web.Application()
app.router.add_route('*', '/{tail:.*}', h)
uvloop.install()
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), access_log=None, print=None)
"""


def start(kind: str) -> Proc:
    port = free_port()
    if kind == "bare":
        args = [sys.executable, "-c", BARE_SERVER, str(port)]
        health = "/"
    else:
        service_ms = "0.001" if kind == "backend0" else "1"
        args = [sys.executable, "-m", "backends", "--host", LOOPBACK, "--port", str(port), "--workers", "256"]
        args += ["--distribution", "constant", "--light-ms", service_ms]
        health = "/health"
    p = subprocess.Popen(pinned(0, args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    proc = Proc(p, port)
    wait_http_ok(proc.url + health, proc=p)
    return proc


def wrk(url: str, duration_s: int) -> tuple[float, str]:
    run = run_wrk(url, duration_s)
    return run.rps, f"{run.p99_ms:.2f}ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "backend_overhead.md")
    args = ap.parse_args()
    kinds = {"bare": "bare aiohttp", "backend0": "backend, 0 ms service", "backend1": "backend, 1 ms service"}
    results: dict[str, list[tuple[float, str]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            proc = start(kind)
            try:
                wrk(proc.url + "/api/light", 1)  # warm-up
                results[kind].append(wrk(proc.url + "/api/light", args.duration))
            finally:
                proc.stop()
            print(f"round {r + 1} {kind}: {results[kind][-1][0]:.0f} req/s p99 {results[kind][-1][1]}", flush=True)
    bare = statistics.median(x[0] for x in results["bare"])
    rows = []
    for kind, label in kinds.items():
        med = statistics.median(x[0] for x in results[kind])
        p99s = ", ".join(x[1] for x in results[kind])
        rows.append(f"| {label} | {med:.0f} | {med / bare:.2f} | {1e6 / med:.0f} | {p99s} |")
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Emulated backend vs bare aiohttp (requests/s, one process)",
            "",
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine()}",
            f"- command: `.venv/bin/python benchmarks/backend_overhead.py --duration {args.duration} "
            f"--rounds {args.rounds}`",
            f"- wrk -t1 -c{CONNECTIONS}, server pinned to CPU 0 and wrk to CPU 1 "
            f"({'taskset' if TASKSET else 'no taskset: unpinned'}); medians of {args.rounds} interleaved rounds",
            f"- load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} — the machine was shared with "
            "other work (other engineers' tests), so absolute numbers are low and noisy; compare the ratios",
            "",
            "| server | req/s (median) | vs bare | µs per request | p99 per round |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"took {time.monotonic() - started:.0f} s")
    sys.exit(code)
