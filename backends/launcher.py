"""Start a whole emulated cluster natively: one `python -m backends` child process per `[[server]]` of a
cluster TOML (schema: lbproxy/cluster.py), wait until every one answers /health, and stop them all.

Used two ways: `python -m backends --cluster FILE` (runs until SIGINT/SIGTERM) and the `Cluster`
context manager for the demo and tests (synchronous code; the servers are subprocesses, so the caller
needs no event loop). Children watch their parent and exit when it disappears, so even a launcher
killed with SIGKILL leaves no servers behind.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from backends.faults import FaultError, Schedule, load_schedule
from lbproxy.cluster import CLASS_NAMES, ClusterSpec, ClusterSpecError, ServerSpec, load_cluster

READY_TIMEOUT_S = 20.0
"""How long every server gets to answer /health: a cold Python start with aiohttp and numpy takes ~1 s,
several at once on a busy 2-core machine several seconds."""
STOP_TIMEOUT_S = 5.0
"""SIGTERM grace period before SIGKILL; a server drains in well under a second."""
SUPERVISE_INTERVAL_S = 0.2
"""How often a crashed child is noticed (and restarted, with restart_after_s)."""
POLL_INTERVAL_S = 0.05


class ClusterError(Exception):
    """The cluster could not be started; the message is one line naming the server and the fix."""


@dataclass
class _Child:
    spec: ServerSpec
    index: int
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    schedule: Schedule
    exited_at: float | None = None
    """time.time() when the launcher noticed the exit (on the schedule's wall clock)."""
    restarts: int = 0

    def last_output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else f"exited with code {self.popen.poll()}"


def server_args(spec: ClusterSpec, server: ServerSpec, index: int, seed: int) -> list[str]:
    """The `python -m backends` command line that starts `server` as described in the cluster file."""
    svc = spec.service
    class_speed = ",".join(f"{c}={v}" for c, v in zip(CLASS_NAMES, server.class_speed, strict=True))
    return [
        "-m",
        "backends",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--name",
        server.name,
        "--workers",
        str(server.workers),
        "--speed",
        str(server.speed),
        "--class-speed",
        class_speed,
        "--light-ms",
        str(svc.mean_s[0] * 1000),
        "--heavy-ms",
        str(svc.mean_s[1] * 1000),
        "--static-ms",
        str(svc.mean_s[2] * 1000),
        "--distribution",
        svc.distribution,
        "--cv",
        str(svc.cv),
        "--error-rate",
        str(server.error_rate),
        "--seed",
        str(seed + index),
        "--server-index",
        str(index),
        "--exit-with-parent",
        str(os.getpid()),
    ]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option the server sets, so a port in TIME_WAIT is not reported as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ClusterError(
                f"cannot bind {host}:{port}: {exc.strerror}; check the host in the cluster file"
            ) from None
    return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
            return 200 <= int(resp.status) < 300
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the open socket (e.g. a paused server's 503); never leave that to the GC
        return False
    except (urllib.error.URLError, OSError):
        return False


class Cluster:
    """The servers of one cluster file as child processes. `start()` returns once all answer /health."""

    def __init__(
        self,
        spec: ClusterSpec,
        seed: int = 0,
        *,
        fault_schedule: Path | None = None,
        restart_after_s: float | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.spec = spec
        self.seed = seed
        self.fault_schedule = fault_schedule
        self.restart_after_s = restart_after_s
        self.ready_timeout_s = ready_timeout_s
        self._children: list[_Child] = []
        self._schedules: list[Schedule] = [Schedule() for _ in spec.servers]
        self.epoch = 0.0
        """time.time() at start(): zero of the fault schedule's clock, shared by every server."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.spec.servers]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spec.servers]

    def pids(self) -> list[int]:
        with self._lock:
            return [c.popen.pid for c in self._children if c.popen.poll() is None]

    def _check_spec(self) -> None:
        seen: dict[tuple[str, int], str] = {}
        for s in self.spec.servers:
            other = seen.get((s.host, s.port))
            if other is not None:
                raise ClusterError(f"servers {other!r} and {s.name!r} both use port {s.port}; give each its own port")
            seen[(s.host, s.port)] = s.name
            if port_in_use(s.host, s.port):
                raise ClusterError(
                    f"server {s.name!r}: port {s.port} on {s.host} is already in use; "
                    "stop what holds it or change the port in the cluster file"
                )
        if self.fault_schedule is not None:
            try:
                self._schedules = [
                    load_schedule(self.fault_schedule, s.name, i) for i, s in enumerate(self.spec.servers)
                ]
            except FaultError as exc:
                raise ClusterError(str(exc)) from None

    def _spawn(self, server: ServerSpec, index: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
        args = server_args(self.spec, server, index, self.seed)
        if self.fault_schedule is not None:
            args += ["--fault-schedule", str(self.fault_schedule), "--schedule-epoch", repr(self.epoch)]
        log.seek(0)
        log.truncate()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def start(self, supervise: bool = True) -> Cluster:
        """Spawn every server and wait for all of them; on any failure stop the others and raise.
        With `restart_after_s` and `supervise`, a background thread restarts crashed servers."""
        if self._children:
            raise ClusterError("cluster already started")
        self._check_spec()
        self._stopping.clear()
        self.epoch = time.time()
        try:
            for i, server in enumerate(self.spec.servers):
                # A file, not a pipe: nobody has to keep reading it, and the last line explains a failure.
                log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
                try:
                    popen = self._spawn(server, i, log)
                except BaseException:
                    log.close()
                    raise
                self._children.append(_Child(server, i, popen, log, self._schedules[i]))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        recovers = any(f.recover for sch in self._schedules for f in sch.faults)
        if supervise and (self.restart_after_s is not None or recovers):
            self._supervisor = threading.Thread(target=self._supervise_loop, name="cluster-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(self._children)
        while pending:
            for child in list(pending):
                if child.popen.poll() is not None:
                    raise ClusterError(f"server {child.spec.name!r} ({child.spec.url}) failed: {child.last_output()}")
                if _healthy(child.spec.url):
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(repr(c.spec.name) for c in pending)
                raise ClusterError(f"server(s) {names} not healthy after {self.ready_timeout_s:.0f} s; see their logs")
            if pending:
                time.sleep(POLL_INTERVAL_S)

    def supervise_once(self) -> list[str]:
        """Notice children that exited (crash faults); restart one after `restart_after_s` if set, or when
        the fault schedule has a `recover` for it. Returns one message per event, for the launcher to print."""
        events: list[str] = []
        now = time.time()
        with self._lock:
            if self._stopping.is_set():
                return events
            for child in self._children:
                code = child.popen.poll()
                if code is None:
                    continue
                if child.exited_at is None:
                    child.exited_at = now
                    events.append(f"{child.spec.name} {child.spec.url} exited with code {code}")
                due = self.restart_after_s is not None and now - child.exited_at >= self.restart_after_s
                if due or child.schedule.recovers_between(child.exited_at - self.epoch, now - self.epoch):
                    if port_in_use(child.spec.host, child.spec.port):
                        continue  # the old socket is not released yet; try again next round
                    child.popen = self._spawn(child.spec, child.index, child.log)
                    child.exited_at = None
                    child.restarts += 1
                    events.append(f"{child.spec.name} {child.spec.url} restarted")
        return events

    def _supervise_loop(self) -> None:
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            self.supervise_once()

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL any that outlive the grace period, reap all. Idempotent."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
            self._supervisor = None
        with self._lock:
            for child in self._children:
                if child.popen.poll() is None:
                    child.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for child in self._children:
                try:
                    child.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.popen.kill()
                    child.popen.wait()
                child.log.close()
            self._children.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_cluster(path: Path, fault_schedule: Path | None, restart_after_s: float | None, seed: int = 0) -> int:
    """`python -m backends --cluster FILE`: start, print one line per server, run until SIGINT/SIGTERM."""
    try:
        spec = load_cluster(path)
    except ClusterSpecError as exc:
        raise ClusterError(str(exc)) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(spec, seed, fault_schedule=fault_schedule, restart_after_s=restart_after_s)
    try:
        cluster.start(supervise=False)  # this loop supervises and prints what happens
        for server in spec.servers:
            print(f"{server.name} {server.url}", flush=True)
        while not stop.wait(SUPERVISE_INTERVAL_S):
            for event in cluster.supervise_once():
                print(event, flush=True)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
