"""A cluster of foreign backends: one gunicorn process (sync workers) per backend, serving
backends/foreign_app.py on a free loopback port, started together and always stopped.

    with start_foreign_cluster(workers=(1, 2, 4, 8), speed=1.0) as cluster:
        cluster.urls, cluster.capacity_rps((0.6, 0.3, 0.1))

Used by benchmarks/live_foreign.py and the tests (which put benchmarks/ on sys.path). Capacities
differ by worker count: a sync worker serves one request at a time, so W workers are a concurrency
of W, and what waits beyond that waits in the kernel's accept queue (gunicorn `--backlog`), where
neither gunicorn nor the proxy can see it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import pinned  # noqa: E402
from support import LOOPBACK, Proc, free_port, wait_http_ok  # noqa: E402

from backends.foreign_app import ENV_CV, ENV_DISTRIBUTION, ENV_SPEED  # noqa: E402
from lbproxy.cluster import ClusterSpec, ServerSpec, ServiceSpec  # noqa: E402

APP = "backends.foreign_app:app"
BOOT_TIMEOUT_S = 60.0
"""Longest wait for a gunicorn master and its workers to answer (2 shared cores, 15 processes)."""
GRACEFUL_TIMEOUT_S = 1
"""gunicorn's `--graceful-timeout` (default 30 s): on SIGTERM a worker finishes its request, which is
milliseconds here; the default would only make a stop after an overload wait for nothing."""
IDLE_PROBE_S = 0.25
"""A probe of `/` answered faster than this means no queue is left in front of the workers: an idle
worker serves it in ~10 ms / speed (a draw above 250 ms has probability e^-25 at speed 1, e^-12.5 at
0.5; a slow probe is only asked again)."""
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try: ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError): pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])"
)
"""Run before exec'ing gunicorn (same pid): Linux SIGTERMs it when the process that started it dies, so
a killed benchmark leaves no gunicorn serving; the context manager covers every other way out. A
wrapper rather than `preexec_fn`, which is unsafe in a process with threads."""


@dataclass
class ForeignCluster:
    """Running gunicorn backends, how to start each again, and what the cluster model says about them."""

    workers: tuple[int, ...]
    speeds: tuple[float, ...]
    env: dict[str, str]
    """FOREIGN_* settings shared by every backend (the speed is set per backend)."""
    cpu: int | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    @property
    def spec(self) -> ClusterSpec:
        """The same servers in lbproxy.cluster's model, which defines capacity once for every user."""
        servers = tuple(
            ServerSpec(name=f"w{w}", port=p.port, workers=w, speed=s)
            for p, w, s in zip(self.procs, self.workers, self.speeds, strict=True)
        )
        return ClusterSpec(servers=servers, service=ServiceSpec())

    def capacity_rps(self, mix: tuple[float, float, float]) -> float:
        """Requests/s the cluster completes at full utilisation under `mix` (sum of workers x speed /
        mean service time), before gunicorn's own per-request cost."""
        return self.spec.capacity_rps(mix)

    def backends_arg(self, weighted: bool = False) -> str:
        """lbproxy's `--backends` value; weighted gives each backend workers x speed as its weight,
        what an operator who knows the instance sizes would configure."""
        if not weighted:
            return ",".join(self.urls)
        return ",".join(f"{u}={w * s:g}" for u, w, s in zip(self.urls, self.workers, self.speeds, strict=True))

    def start(self) -> None:
        """Start every backend, then wait for each: the boots overlap."""
        for i in range(len(self.workers)):
            self.procs.append(self._spawn(i, free_port()))  # one by one: a failed spawn leaves the rest stoppable
        for p in self.procs:
            wait_http_ok(p.url + "/", timeout_s=BOOT_TIMEOUT_S, proc=p.popen)

    def restart(self, i: int) -> None:
        """Stop backend `i` and start it again on the same port, which drops its accept queue."""
        old = self.procs[i]
        old.stop()
        self.procs[i] = self._spawn(i, old.port)
        wait_http_ok(self.procs[i].url + "/", timeout_s=BOOT_TIMEOUT_S, proc=self.procs[i].popen)

    def settle(self, timeout_s: float = 120.0, restart_after_s: float | None = None) -> list[int]:
        """Block until every backend answers `/` within IDLE_PROBE_S; returns the backends restarted.

        After an overload the accept queues still hold connections whose clients are gone, and gunicorn
        serves each of them anyway, so the next run would start behind that queue. A probe is served
        after that queue, so its latency is the time the queue still needs. With `restart_after_s`, a
        backend whose probe takes longer is restarted instead of waited for (a 1-worker backend can
        take minutes to serve 512 dead connections); without it a queue that outlasts `timeout_s`
        raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        restarted: list[int] = []
        for i in range(len(self.procs)):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.procs[i].url} still has a queue after {timeout_s:.0f} s")
                patience = left if restart_after_s is None else min(left, restart_after_s)
                start = time.monotonic()
                try:
                    with urllib.request.urlopen(self.procs[i].url + "/", timeout=patience) as resp:
                        resp.read()
                except OSError as exc:
                    if not isinstance(exc, TimeoutError) and not isinstance(getattr(exc, "reason", None), TimeoutError):
                        time.sleep(0.05)  # refused or reset (e.g. the backlog overflowed): ask again shortly
                        continue
                    if restart_after_s is None:
                        continue
                    self.restart(i)
                    restarted.append(i)
                    break
                if time.monotonic() - start < IDLE_PROBE_S:
                    break
        return restarted

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def _spawn(self, i: int, port: int) -> Proc:
        """`python -m gunicorn -w W -b 127.0.0.1:PORT backends.foreign_app:app`, gunicorn's defaults kept
        (sync workers, backlog 2048, no keep-alive) except the log level and the graceful timeout."""
        argv = [sys.executable, "-c", DIE_WITH_PARENT, sys.executable, "-m", "gunicorn"]
        argv += ["-w", str(self.workers[i]), "-b", f"{LOOPBACK}:{port}"]
        # warning: gunicorn logs each worker boot at info; the pipe is read only when the process stops.
        argv += ["--graceful-timeout", str(GRACEFUL_TIMEOUT_S), "--log-level", "warning", APP]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, ENV_SPEED: repr(self.speeds[i])}
        popen = subprocess.Popen(
            argv if self.cpu is None else pinned(self.cpu, argv),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return Proc(popen, port)


@contextlib.contextmanager
def start_foreign_cluster(
    workers: Sequence[int] = (1, 2, 4, 8),
    speed: float | Sequence[float] = 1.0,
    distribution: str = "exponential",
    cv: float = 1.0,
    cpu: int | None = None,
) -> Iterator[ForeignCluster]:
    """One gunicorn per entry of `workers` (with that many sync workers), each at `speed` (one factor
    for all or one per backend), pinned to `cpu` when given; yields once every backend answers `/`,
    and stops them all on the way out, exceptions and Ctrl-C included."""
    speeds = tuple(float(speed) for _ in workers) if isinstance(speed, int | float) else tuple(map(float, speed))
    if len(speeds) != len(workers):
        raise ValueError(f"{len(workers)} backends but {len(speeds)} speeds")
    if not workers or any(w < 1 for w in workers):
        raise ValueError(f"workers must be positive integers, got {list(workers)}")
    cluster = ForeignCluster(tuple(workers), speeds, {ENV_DISTRIBUTION: distribution, ENV_CV: repr(float(cv))}, cpu)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
