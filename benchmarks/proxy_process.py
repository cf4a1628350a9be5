"""The proxy process as the soak samples it: RSS, open fds, threads and CPU from /proc, asyncio tasks,
replay size and in-flight requests from its /metrics, and a census of what its open fds are.

Used by benchmarks/soak_run.py and tests/test_soak.py (which put benchmarks/ on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import MetricsPage, cpu_s, scrape_metrics  # noqa: E402
from support import Proc  # noqa: E402

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
        m = scrape_metrics(proc.admin_url)
    except (OSError, ValueError):
        m = MetricsPage()
    return ProcSample(
        t_s=t_s,
        rss_mb=int(status["VmRSS"].split()[0]) / 1024,
        fds=fds,
        threads=int(status["Threads"]),
        cpu_s=cpu_s(pid),
        tasks=m.total(TASKS_METRIC),
        replay=m.total("lbproxy_replay_size"),
        in_flight=m.total("lbproxy_backend_in_flight"),
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
