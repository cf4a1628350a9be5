"""What the soak and the reliability benchmarks share: four emulated backends that can be SIGKILLed
and restarted on the same port or given faults over their admin endpoint, lbproxy as a child process
with its output in a file, the proxy process sampled from /proc and its /metrics, phased open-loop
schedules, open-loop load run beside a thread that drives the faults, and figures per time window.

Imported as `fault_harness` by benchmarks/soak.py, benchmarks/reliability.py and their tests (which
put benchmarks/ on sys.path). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from dqn_proxy import cpu_s  # noqa: E402
from support import LOOPBACK, Proc, free_port, spawn, wait_http_ok  # noqa: E402

from lbproxy.cluster import ServerSpec, ServiceSpec  # noqa: E402
from loadgen.open_loop import (  # noqa: E402
    START_LEAD_S,
    RunResult,
    Schedule,
    is_failure,
    poisson_schedule,
    raise_nofile_limit,
    run_open_loop,
)

BACKENDS = 4
WORKERS = 2
SPEED = 0.5
"""Four backends of 2 workers at half the cluster model's speed (light 20 / heavy 100 / static 4 ms):
189 req/s at the default mix. The proxy, its learner, the generator and four backends share 2 vCPU
here; a faster cluster would measure CPU contention, not faults."""
BACKEND_BOOT_S = 30.0
PROXY_BOOT_S = 90.0
"""Longest wait for /readyz (the dqn policy imports torch and loads a model first)."""
PORT_REBIND_S = 5.0
"""A restarted backend retries its port this long (the killed process's socket may linger briefly)."""
HTTP_TIMEOUT_S = 5.0


# --- backends ----------------------------------------------------------------------------------------
@dataclass
class EmulatedCluster:
    """`python -m backends` processes on fixed loopback ports; each can be killed and restarted."""

    n: int = BACKENDS
    workers: int = WORKERS
    speed: float = SPEED
    ports: list[int] = field(default_factory=list)
    procs: list[Proc | None] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    """How many times each backend was started (its seed changes with every restart)."""

    @property
    def urls(self) -> list[str]:
        return [f"http://{LOOPBACK}:{p}" for p in self.ports]

    def capacity_rps(self, mix: Sequence[float]) -> float:
        """Requests/s the cluster completes at full utilisation under `mix` (lbproxy/cluster.py's model)."""
        one = ServerSpec("b", 0, workers=self.workers, speed=self.speed)
        return self.n * one.capacity_rps(ServiceSpec(), (mix[0], mix[1], mix[2]))

    def _spawn(self, i: int) -> Proc:
        self.starts[i] += 1
        args = ["-m", "backends", "--host", LOOPBACK, "--port", str(self.ports[i]), "--name", f"b{i}"]
        args += ["--workers", str(self.workers), "--speed", str(self.speed), "--seed", str(1000 * self.starts[i] + i)]
        return Proc(spawn(args), self.ports[i])

    def _wait(self, i: int, proc: Proc) -> Proc:
        try:
            wait_http_ok(f"{proc.url}/health", timeout_s=BACKEND_BOOT_S, proc=proc.popen)
        except Exception:
            proc.stop()
            raise
        return proc

    def start(self) -> None:
        self.ports = [free_port() for _ in range(self.n)]
        self.starts = [0] * self.n
        self.procs = []
        for i in range(self.n):  # all spawned first: the boots overlap
            self.procs.append(self._spawn(i))
        for i, proc in enumerate(self.procs):
            assert proc is not None
            self._wait(i, proc)

    def kill(self, *indices: int) -> None:
        """SIGKILL the given backends (no drain; every signal sent before the first is reaped, so they
        die together) and reap them."""
        procs = [(i, p) for i in indices if (p := self.procs[i]) is not None]
        for _, proc in procs:
            proc.popen.send_signal(signal.SIGKILL)
        for i, proc in procs:
            proc.popen.wait()
            proc.stop()  # closes the output pipe
            self.procs[i] = None

    def restart(self, *indices: int) -> None:
        """Start the given backends again on their ports (boots overlap); returns once each /health answers."""
        spawned = {i: self._spawn(i) for i in indices}
        deadline = time.monotonic() + PORT_REBIND_S
        for i, proc in spawned.items():
            while True:
                try:
                    self.procs[i] = self._wait(i, proc)
                    break
                except RuntimeError:  # exited at once: the port is still held; try again shortly
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                    proc = self._spawn(i)

    def admin(self, i: int, path: str, spec: dict[str, object]) -> None:
        req = urllib.request.Request(
            f"{self.urls[i]}{path}",
            data=json.dumps(spec).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            resp.read()

    def fault(self, i: int, **spec: object) -> None:
        """POST /admin/fault (backends/faults.py: error_rate, pause, slowdown)."""
        self.admin(i, "/admin/fault", spec)

    def reset(self, i: int) -> None:
        self.admin(i, "/admin/reset", {})

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                proc.stop()


@contextlib.contextmanager
def emulated_cluster(n: int = BACKENDS, workers: int = WORKERS, speed: float = SPEED):  # type: ignore[no-untyped-def]
    cluster = EmulatedCluster(n, workers, speed)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- the proxy -----------------------------------------------------------------------------------------
def start_lbproxies(runs: Sequence[tuple[Sequence[str], Sequence[str], Path]], mode: str = "serve") -> list[Proc]:
    """`python -m lbproxy --mode MODE --backends B ARGS` for each (backends, args, log) on free loopback
    ports, output to the log (a pipe could fill over a long run and stall the proxy); the boots
    overlap; ready when each admin /readyz answers."""
    procs: list[Proc] = []
    try:
        for backends, args, log in runs:
            port, admin = free_port(), free_port()
            argv = [sys.executable, "-m", "lbproxy", "--mode", mode, "--host", LOOPBACK, "--port", str(port)]
            argv += ["--admin-port", str(admin), "--backends", ",".join(backends), *args]
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    argv, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT
                )
            procs.append(Proc(popen, port, admin))
        for proc, (_, _, log) in zip(procs, runs, strict=True):
            try:
                wait_http_ok(f"{proc.admin_url}/readyz", timeout_s=PROXY_BOOT_S, proc=proc.popen)
            except Exception as exc:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"lbproxy did not start: {exc}\n{tail}") from None
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def start_lbproxy(backends: Sequence[str], args: Sequence[str], log: Path, mode: str = "serve") -> Proc:
    """One proxy (see start_lbproxies)."""
    return start_lbproxies([(backends, args, log)], mode)[0]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def scrape(admin_url: str) -> dict[str, float]:
    """The proxy's /metrics as {"name{labels}": value} (Prometheus text format, comments dropped)."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=HTTP_TIMEOUT_S) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def family(samples: dict[str, float], name: str) -> float | None:
    """Sum of every series of metric `name` (all label values); None when the proxy has no such metric."""
    values = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def backend_ok(samples: dict[str, float], backend: str) -> float:
    """2xx responses the proxy relayed from `backend` (lbproxy_requests_total{backend, code})."""
    return sum(
        v
        for k, v in samples.items()
        if k.startswith("lbproxy_requests_total{") and f'backend="{backend}"' in k and 'code="2' in k
    )


def counters(admin_url: str) -> str:
    """The proxy's retries, ejections, fallbacks and upstream errors by kind, on one line (what explains
    a lost request); "unavailable" if the scrape fails."""
    try:
        m = scrape(admin_url)
    except (OSError, urllib.error.URLError, ValueError):
        return "unavailable"
    kinds: dict[str, float] = {}
    for key, v in m.items():
        if key.startswith("lbproxy_upstream_errors_total{"):
            kind = key.split('kind="', 1)[1].split('"', 1)[0]
            kinds[kind] = kinds.get(kind, 0.0) + v
    parts = [
        f"{name} {family(m, metric) or 0:g}"
        for name, metric in (
            ("retries", "lbproxy_retries_total"),
            ("ejections", "lbproxy_ejections_total"),
            ("fallback decisions", "lbproxy_decision_fallbacks_total"),
        )
    ]
    errors = ", ".join(f"{k} {v:g}" for k, v in sorted(kinds.items())) or "none"
    return "; ".join(parts) + f"; upstream errors: {errors}"


def backend_names(admin_url: str) -> list[str]:
    """The proxy's name for each backend, in --backends order."""
    data = get_json(admin_url + "/admin/backends")
    assert isinstance(data, dict)
    return [str(b["name"]) for b in sorted(data["backends"], key=lambda b: b["index"])]


# --- sampling the proxy process ------------------------------------------------------------------------
TASKS_METRIC = "lbproxy_event_loop_tasks"
"""asyncio tasks alive in the proxy's event loop, if the proxy exports it (None in samples otherwise)."""


@dataclass(frozen=True, slots=True)
class ProcSample:
    t_s: float
    """Seconds from the load's zero."""
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float
    tasks: float | None
    replay: float | None
    in_flight: float | None


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def sample_process(proc: Proc, t_s: float) -> ProcSample:
    """RSS (VmRSS), open fds, threads and CPU from /proc; tasks, replay size and in-flight from /metrics."""
    pid = proc.popen.pid
    status = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    try:
        m = scrape(proc.admin_url)
    except (OSError, urllib.error.URLError, ValueError):
        m = {}
    return ProcSample(
        t_s=t_s,
        rss_mb=int(status["VmRSS"].split()[0]) / 1024,
        fds=fds,
        threads=int(status["Threads"]),
        cpu_s=cpu_s(pid),
        tasks=family(m, TASKS_METRIC),
        replay=family(m, "lbproxy_replay_size"),
        in_flight=family(m, "lbproxy_backend_in_flight"),
    )


TCP_STATES = {"01": "established", "08": "close_wait", "0A": "listen"}
"""/proc/net/tcp state codes (include/net/tcp_states.h) the fd census names; others count as "other"."""


@dataclass(frozen=True, slots=True)
class FdCensus:
    """What a process's open fds are: a leak shows as fds that none of the live categories explain."""

    total: int
    upstream_idle: int
    """TCP connections to a backend port, established: pooled keep-alive connections (they expire)."""
    close_wait: int
    """TCP connections the peer closed and this process has not: a leak if they stay."""
    other_sockets: int
    files: int
    """Everything that is not a socket (files, pipes, eventfds, the epoll fd)."""


def _tcp_table() -> dict[int, tuple[str, int]]:
    """inode -> (state code, remote port) for every IPv4/IPv6 TCP socket on the machine."""
    out: dict[int, tuple[str, int]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                out[int(f[9])] = (f[3], int(f[2].rsplit(":", 1)[1], 16))
    return out


def fd_census(pid: int, backend_ports: Sequence[int]) -> FdCensus:
    inodes: list[int] = []
    files = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed between the listing and the readlink
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
            else:
                files += 1
    tcp = _tcp_table()
    ports = set(backend_ports)
    upstream = close_wait = other = 0
    for inode in inodes:
        state, remote_port = tcp.get(inode, ("", 0))
        if state == "01" and remote_port in ports:
            upstream += 1
        elif state == "08":
            close_wait += 1
        else:
            other += 1
    return FdCensus(len(inodes) + files, upstream, close_wait, other, files)


class Sampler(threading.Thread):
    """Samples `proc` every `interval_s` from `t0` (perf_counter) until `stop()`."""

    def __init__(self, proc: Proc, t0: float, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.t0, self.interval_s = proc, t0, interval_s
        self.samples: list[ProcSample] = []
        self._stop_event = threading.Event()

    def sample(self) -> ProcSample:
        s = sample_process(self.proc, time.perf_counter() - self.t0)
        self.samples.append(s)
        return s

    def run(self) -> None:
        k = 0
        while not self._stop_event.is_set() and self.proc.popen.poll() is None:
            k += 1
            if self._stop_event.wait(max(0.0, self.t0 + k * self.interval_s - time.perf_counter())):
                return
            with contextlib.suppress(OSError, KeyError):  # the process ended between the checks
                self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


# --- load ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadPhase:
    duration_s: float
    rate_rps: float
    mix: tuple[float, float, float]


def phased_schedule(phases: Sequence[LoadPhase], seed: int) -> Schedule:
    """Poisson arrivals phase after phase (phase k from seed + k), as one open-loop schedule."""
    times: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    offset = 0.0
    for k, ph in enumerate(phases):
        s = poisson_schedule(ph.rate_rps, ph.duration_s, seed + k, ph.mix)
        times.append(s.times_s + offset)
        classes.append(s.classes)
        offset += ph.duration_s
    all_times = np.concatenate(times)
    weights = np.array([ph.duration_s * ph.rate_rps for ph in phases])
    mix = tuple(float(x) for x in (weights[:, None] * np.array([ph.mix for ph in phases])).sum(0) / weights.sum())
    return Schedule(len(all_times) / offset, offset, seed, (mix[0], mix[1], mix[2]), all_times, np.concatenate(classes))


class Clock:
    """Times relative to the load's zero, for the thread that drives faults beside it."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def until(self, t_s: float) -> None:
        time.sleep(max(0.0, self.t0 + t_s - time.perf_counter()))


def run_with_driver(
    targets: Sequence[tuple[str, Schedule]],
    driver: Callable[[Clock], None],
    grace_s: float,
    timeout_s: float | None = None,
) -> list[RunResult]:
    """Send each schedule to its base URL (open loop, loadgen/open_loop.py), all at once, while `driver`
    runs in a thread on a Clock whose zero is the schedules' zero (within a millisecond: the generator
    takes its zero START_LEAD_S after it starts). An exception in the driver is raised here after the
    load ends."""
    raise_nofile_limit()
    failure: list[BaseException] = []

    def drive(clock: Clock) -> None:
        try:
            driver(clock)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    async def main() -> list[RunResult]:
        clock = Clock(time.perf_counter() + START_LEAD_S)
        thread = threading.Thread(target=drive, args=(clock,), daemon=True)
        thread.start()
        results = await asyncio.gather(*(run_open_loop(url, s, grace_s, timeout_s) for url, s in targets))
        await asyncio.to_thread(thread.join)
        return list(results)

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(main())
    if failure:
        raise failure[0]
    return results


# --- figures per window -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WindowStats:
    """Requests sent in [from_s, to_s) or still in flight at from_s: failed = no response or status >= 500."""

    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[int, int]

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def sent_between(result: RunResult, from_s: float, to_s: float) -> np.ndarray:
    s = result.sent_s
    return ~np.isnan(s) & (s >= from_s) & (s < to_s)


def held_at(result: RunResult, t_s: float) -> np.ndarray:
    """Requests sent before `t_s` and not answered by then."""
    s = result.sent_s
    return ~np.isnan(s) & (s < t_s) & (s + result.latency_s >= t_s)


def window_mask(result: RunResult, from_s: float, to_s: float) -> np.ndarray:
    """Requests sent in [from_s, to_s) or still in flight at from_s."""
    return sent_between(result, from_s, to_s) | held_at(result, from_s)


def window(result: RunResult, from_s: float, to_s: float) -> WindowStats:
    mask = window_mask(result, from_s, to_s)
    lat_ms = result.latency_s[mask] * 1e3
    codes, counts = np.unique(result.status[mask], return_counts=True)

    def pct(q: float) -> float:
        return float(np.percentile(lat_ms, q)) if len(lat_ms) else math.nan

    return WindowStats(
        requests=int(mask.sum()),
        failed=int(is_failure(result.status[mask]).sum()),
        p50_ms=pct(50),
        p99_ms=pct(99),
        max_ms=float(lat_ms.max()) if len(lat_ms) else math.nan,
        codes={int(c): int(n) for c, n in zip(codes, counts, strict=True)},
    )


def in_flight_at(result: RunResult, instants_s: Sequence[float], tolerance_s: float) -> np.ndarray:
    """Requests in flight (sent, not yet answered) within `tolerance_s` of any of the instants."""
    start = result.sent_s
    end = start + result.latency_s
    mask = np.zeros(len(start), dtype=bool)
    for t in instants_s:
        mask |= (start - tolerance_s <= t) & (end + tolerance_s >= t)
    return mask & ~np.isnan(start)


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Median of the pairwise slopes (Theil-Sen): a trend that one spike or one step cannot set."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx > 0
    return float(np.median((y[j] - y[i])[ok] / dx[ok])) if ok.any() else 0.0
