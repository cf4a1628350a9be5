"""What the soak and the reliability benchmarks share beside the emulated backends
(benchmarks/emulated_backends.py): lbproxy as a child process with its output in a file, its counters
and backend names read from the admin port, phased open-loop schedules, and open-loop load run beside
a thread that drives the faults.

Imported as `fault_harness` by benchmarks/soak_run.py, benchmarks/reliability_run.py and their tests
(which put benchmarks/ on sys.path). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import MetricsPage, admin_backends, scrape_metrics  # noqa: E402
from support import LOOPBACK, READY, Proc, free_port, wait_http_ok  # noqa: E402

from loadgen.open_loop import (  # noqa: E402
    START_LEAD_S,
    RunResult,
    Schedule,
    poisson_schedule,
    raise_nofile_limit,
    run_open_loop,
)

PROXY_BOOT_S = 90.0
"""Longest wait for /readyz (the dqn policy imports torch and loads a model first)."""


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
                wait_http_ok(f"{proc.admin_url}/readyz", timeout_s=PROXY_BOOT_S, proc=proc.popen, body_prefix=READY)
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


def backend_ok(page: MetricsPage, backend: str) -> float:
    """2xx responses the proxy relayed from `backend` (lbproxy_requests_total{backend, code})."""
    codes = page.by_label("lbproxy_requests_total", "code", {"backend": backend})
    return sum(v for code, v in codes.items() if code.startswith("2"))


def counters(admin_url: str) -> str:
    """The proxy's retries, ejections, fallbacks and upstream errors by kind, on one line (what explains
    a lost request); "unavailable" if the scrape fails."""
    try:
        m = scrape_metrics(admin_url)
    except (OSError, ValueError):
        return "unavailable"
    kinds = m.by_label("lbproxy_upstream_errors_total", "kind")
    parts = [
        f"{name} {m.total(metric) or 0:g}"
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
    return [str(b["name"]) for b in admin_backends(admin_url)]


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
