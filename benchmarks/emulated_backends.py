"""Emulated backends the fault benchmarks break: `python -m backends` processes on fixed loopback
ports, each of which can be SIGKILLed and restarted on the same port or given faults over its admin
endpoint (backends/faults.py).

Used by benchmarks/soak_run.py and benchmarks/reliability_run.py. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import contextlib
import json
import signal
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

from common import ADMIN_TIMEOUT_S  # noqa: E402
from support import LOOPBACK, Proc, free_port, spawn, wait_http_ok  # noqa: E402

from lbproxy.cluster import ServerSpec, ServiceSpec  # noqa: E402

BACKENDS = 4
WORKERS = 2
SPEED = 0.5
"""Four backends of 2 workers at half the cluster model's speed (light 20 / heavy 100 / static 4 ms):
189 req/s at the default mix. The proxy, its learner, the generator and four backends share 2 vCPU
here; a faster cluster would measure CPU contention, not faults."""
BACKEND_BOOT_S = 30.0
PORT_REBIND_S = 5.0
"""A restarted backend retries its port this long (the killed process's socket may linger briefly)."""


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
        with urllib.request.urlopen(req, timeout=ADMIN_TIMEOUT_S) as resp:
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
def emulated_cluster(n: int = BACKENDS, workers: int = WORKERS, speed: float = SPEED) -> Iterator[EmulatedCluster]:
    cluster = EmulatedCluster(n, workers, speed)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
