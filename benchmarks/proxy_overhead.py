"""Proxy overhead, side by side in one run: wrk against the same two backends directly, through
lbproxy (round_robin, p2c), through nginx (1 worker, keepalive 64) and through a minimal aiohttp
streaming proxy (benchmarks/minimal_proxy.py, the ANCHORS.md baseline).

    .venv/bin/python benchmarks/proxy_overhead.py [--duration-s 5] [--rounds 2] [--connections 64]

Pinning (ANCHORS.md): the proxy under test alone on CPU 0; wrk and the backends on CPU 1. CPU per
request = the proxy process's CPU time (utime + stime from /proc/PID/stat, children included for
nginx) over the run, divided by the requests wrk completed. Writes benchmarks/results/proxy_overhead.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from common import LOAD_CPU, PROXY_CPU, cpu_s, machine, pinned, run_wrk, utc_now  # noqa: E402
from support import free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "proxy_overhead.md"
BODY_BYTES = 100  # ANCHORS.md: "aiohttp+uvloop backend, direct, 100-byte body"


# --- the backend: the ANCHORS one (aiohttp + uvloop, 100-byte body) ---------------------------------
def serve_backend(port: int) -> None:
    import uvloop
    from aiohttp import web

    body = b"x" * BODY_BYTES

    async def handle(request: web.Request) -> web.Response:
        if request.body_exists:
            await request.read()
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


# --- helpers ------------------------------------------------------------------------------------------
def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as r:
            if r.status < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(url)


@contextlib.contextmanager
def started(argv: list[str], ready_url: str, cwd: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ready_url, p)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@dataclass
class Run:
    rps: float
    requests: int
    p50_s: float
    p99_s: float
    cpu_s: float
    errors: int

    @property
    def cpu_per_req_us(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6


def wrk(url: str, duration_s: float, connections: int, cpu_pid: int | None) -> Run:
    """One wrk run, with the CPU time `cpu_pid` (and its children: nginx's worker) spent meanwhile."""
    cpu0 = cpu_s(cpu_pid) if cpu_pid else 0.0
    w = run_wrk(url, duration_s, connections)
    cpu = (cpu_s(cpu_pid) - cpu0) if cpu_pid else 0.0
    return Run(w.rps, w.requests, w.p50_ms / 1e3, w.p99_ms / 1e3, cpu, w.errors)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream backends {{ {servers} keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


NOTES = """## What makes lbproxy's data plane cheap

- **Lean upstream client for body-less requests** (`lbproxy/proxy/upstream_client.py`): the request
  head is serialized once into bytes and written on a pooled keep-alive connection driven by
  aiohttp's own `ResponseHandler` (C response parser, StreamReader flow control, sock_read timeout).
  This skips `ClientSession.request` (ClientRequest/ClientResponse objects, header merging, cookie,
  redirect and trace machinery), which was most of the minimal proxy's CPU. Requests with a body
  keep using the ClientSession (streamed uploads, chunked encoding, Expect: 100-continue).
- **Low-level server**: `aiohttp.web.Server` with one handler (no Application, router or
  middlewares on the data port), access log off, `auto_decompress=False`.
- **Header rules in one pass** over a precomputed frozenset of hop-by-hop names; the upstream head
  is built straight from that pass, no intermediate CIMultiDict on the fast path.
- **Small bodies in one write**: responses with a Content-Length up to 64 KiB are read whole and
  sent with one `write` (header and body coalesced); larger or chunked ones stream chunk by chunk.
- **Batched metrics**: per-request counters and histograms count into local lists (`bisect`, no
  lock) and are flushed to the Prometheus children once a second (and before each scrape).
- **Cached upstream URLs** (aiohttp path), pre-resolved label children, `gc.freeze()` after start-up
  and a gen-0 GC threshold of 50 000 (fewer young collections; torch's heap out of reach).
"""

SHARED_NOTE = (
    "The machine (2 vCPU) was shared with other work while this ran; absolute numbers move ±10–20 % "
    "run to run, the ratios measured side by side in one run are the meaningful part."
)


Setup = tuple[list[str], str, str]
"""(argv, URL wrk loads, URL that answers once it is ready)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--duration-s", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated subset of setups")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = ap.parse_args()
    if args.backend:
        serve_backend(args.backend)
        return 0
    if not shutil.which("wrk"):
        print("proxy_overhead: wrk not found; install Debian's `wrk` package", file=sys.stderr)
        return 2
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    b_ports = [free_port(), free_port()]
    results: dict[str, list[Run]] = {}
    with contextlib.ExitStack() as stack:
        for p in b_ports:
            stack.enter_context(
                started(pinned(LOAD_CPU, [sys.executable, __file__, "--backend", str(p)]), f"http://127.0.0.1:{p}/")
            )
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbproxy-nginx-")))
        setups = make_setups(b_ports, nginx, tmp)
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        names = [n for n in setups if not only or n in only]
        for rnd in range(args.rounds):
            for name in names:
                run = measure_setup(setups[name], b_ports[0], args)
                results.setdefault(name, []).append(run)
                print(
                    f"round {rnd + 1} {name:<22} {run.rps:>9.0f} req/s  p50 {run.p50_s * 1e3:6.2f} ms  "
                    f"p99 {run.p99_s * 1e3:6.2f} ms  cpu/req {run.cpu_per_req_us:6.1f} µs  errors {run.errors}",
                    flush=True,
                )
    table = summarise(results)
    print(table)
    if not args.no_write:
        write_results(table, args, nginx is not None)
    return 0


def make_setups(b_ports: list[int], nginx: str | None, tmp: Path) -> dict[str, Setup | None]:
    """Every setup in table order; None is `direct` (wrk against the first backend); nginx only if installed
    (its config written to `tmp`)."""
    py = sys.executable
    b_urls = [f"http://127.0.0.1:{p}" for p in b_ports]

    def lbproxy(policy: str) -> Setup:
        port, admin = free_port(), free_port()
        argv = [py, "-m", "lbproxy", "--mode", "serve", "--policy", policy, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--admin-port", str(admin), "--backends", ",".join(b_urls)]
        return argv, f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{admin}/readyz"

    mport = free_port()
    setups: dict[str, Setup | None] = {
        "direct": None,
        "lbproxy round_robin": lbproxy("round_robin"),
        "lbproxy p2c": lbproxy("p2c"),
        "minimal aiohttp proxy": (
            [py, str(REPO / "benchmarks" / "minimal_proxy.py"), str(mport), *b_urls],
            f"http://127.0.0.1:{mport}/",
            f"http://127.0.0.1:{mport}/",
        ),
    }
    if nginx:
        nport = free_port()
        servers = " ".join(f"server 127.0.0.1:{p};" for p in b_ports)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, servers=servers, port=nport))
        setups["nginx"] = (
            [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
            f"http://127.0.0.1:{nport}/",
            f"http://127.0.0.1:{nport}/",
        )
    return setups


def measure_setup(spec: Setup | None, direct_port: int, args: argparse.Namespace) -> Run:
    """One measured wrk run (after a 1 s warm-up) through a freshly started setup, or `direct`."""
    if spec is None:  # direct: wrk against one backend, CPU of that backend process
        url = f"http://127.0.0.1:{direct_port}/"
        wrk(url, 1.0, args.connections, None)
        return wrk(url, args.duration_s, args.connections, _pid_listening(direct_port))
    argv, url, ready = spec
    with started(pinned(PROXY_CPU, argv), ready) as proc:
        wrk(url, 1.0, args.connections, None)  # warm-up: connections, caches, JIT-free paths
        return wrk(url, args.duration_s, args.connections, proc.pid)


def _pid_listening(port: int) -> int | None:
    """PID of the backend process (the `taskset` exec keeps the pid; find it by command line)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if b"--backend" in cmd and str(port).encode() in cmd:
                    return int(d.name)
    return None


def _med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def summarise(results: dict[str, list[Run]]) -> str:
    lines = [
        "| setup | req/s | p50 | p99 | CPU per request | req/s per proxy core | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    per_core: dict[str, float] = {}
    cpu: dict[str, float] = {}
    rps: dict[str, float] = {}
    for name, runs in results.items():
        c = _med(runs, "cpu_per_req_us")
        cpu[name] = c
        rps[name] = _med(runs, "rps")
        per_core[name] = 1e6 / c if c > 0 else float("nan")
        lines.append(
            f"| {name} | {rps[name]:,.0f} | {_med(runs, 'p50_s') * 1e3:.2f} ms | {_med(runs, 'p99_s') * 1e3:.2f} ms "
            f"| {c:.1f} µs | {per_core[name]:,.0f} | {sum(r.errors for r in runs)} |"
        )
    lines.append("")
    base = "minimal aiohttp proxy"
    for lb in ("lbproxy round_robin", "lbproxy p2c"):
        if lb in results and base in results:
            lines.append(
                f"- {lb} / minimal: throughput {rps[lb] / rps[base]:.2f}x, "
                f"throughput per core (1/CPU per request) {per_core[lb] / per_core[base]:.2f}x"
            )
        if lb in results and "nginx" in results:
            lines.append(f"- {lb} CPU per request / nginx: {cpu[lb] / cpu['nginx']:.2f}x")
    return "\n".join(lines)


def write_results(table: str, args: argparse.Namespace, have_nginx: bool) -> None:
    wrk_ver = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    text = (
        "# Proxy overhead (wrk, loopback)\n\n"
        f"- date: {utc_now()}\n"
        f"- machine: {machine()}\n"
        f"- wrk: {' '.join(wrk_ver)}; nginx: {'yes' if have_nginx else 'not installed'}\n"
        f"- command: `.venv/bin/python benchmarks/proxy_overhead.py --duration-s {args.duration_s:g} "
        f"--rounds {args.rounds} --connections {args.connections}`\n"
        f"- pinning: proxy on CPU {PROXY_CPU}; wrk (1 thread, {args.connections} connections) and both backends "
        f"on CPU {LOAD_CPU}; backends return a {BODY_BYTES}-byte body; medians of {args.rounds} runs of "
        f"{args.duration_s:g} s after a 1 s warm-up\n"
        "- CPU per request: the proxy's own utime+stime over the run / requests completed (for `direct`, the "
        'backend\'s); "req/s per proxy core" = 1 / CPU per request\n\n'
        f"{table}\n"
    )
    text += "\n" + NOTES + f"\n{SHARED_NOTE}\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
