"""The soak's run (benchmarks/soak.py describes it): the emulated cluster, lbproxy learning live in front
of it under phased open-loop load, one backend SIGKILLed and restarted every kill interval, and the
proxy process sampled throughout.

Used by benchmarks/soak.py and tests/test_soak.py (which put benchmarks/ on sys.path).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from emulated_backends import emulated_cluster  # noqa: E402
from fault_harness import Clock, LoadPhase, counters, phased_schedule, run_with_driver, start_lbproxy  # noqa: E402
from proxy_process import FdCensus, ProcSample, Sampler, fd_census, sample_process  # noqa: E402
from request_windows import in_flight_at  # noqa: E402

from loadgen.open_loop import DEFAULT_MIX, RunResult, is_failure  # noqa: E402

KILL_TOLERANCE_S = 0.05
"""A failed request counts as "in flight at a kill" when its send-to-answer span comes this close to
the kill (the driver thread's clock and the generator's agree within a millisecond; the kill itself,
SIGKILL plus reaping, takes a few)."""
BUFFER_FILL_SHARE = 0.35
"""The replay buffer holds this share of the run's expected requests: full well before the second half."""
SETTLE_S = 1.5
"""After the load, the proxy's in-flight gauges (refreshed once a second) are read after this pause."""
RESTART_BOOT_S = 2.0
"""Allowance for a restarted backend's boot (0.4-1.5 s on a busy 2-vCPU machine)."""
PROXY_STOP_S = 60.0
"""Train mode writes a checkpoint and the final model on SIGTERM."""


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    mode: str = "train"
    loads: tuple[float, ...] = (0.3, 0.7, 0.5)
    phase_s: float | None = None
    """Default: min(40, duration / 6): five cycles in 10 min, two in 30 s."""
    kill_every_s: float | None = None
    """Default: half a load cycle (1.5 phases, capped at 60 s): kills then alternate between two
    phases of the cycle, and each half of the run gets kills in the same phases (60 s in 10 min,
    7.5 s in 30 s)."""
    restart_after_s: float = 1.0
    sample_every_s: float | None = None
    """Default: duration / 120 within [1, 5] s."""
    eject_base_s: float | None = None
    """Default: kill interval / 6, at least restart_after_s + RESTART_BOOT_S. The proxy's default
    (30 s, Envoy's) exceeds the CI version's 7.5 s kill interval, and each ejection of a backend lasts
    base x its ejection count (10, 20, 30 s for the third kill of one backend in 10 min): shorter than
    the interval, at most one backend is out at a time and the load stays below the three survivors'
    capacity. Longer than the restart, a killed backend is not re-admitted while it is still down
    (that is the reliability benchmark's subject, not the soak's)."""
    buffer_size: int | None = None
    seed: int = 1
    grace_s: float = 10.0
    rss_slope_mb_per_min: float = 1.0
    rss_slack_mb: float = 8.0
    fd_slack: int = 4
    thread_slack: int = 2
    task_slack: int = 8

    def resolved(self) -> SoakConfig:
        d = self.duration_s
        phase = self.phase_s or min(40.0, d / 6)
        kill = self.kill_every_s or min(60.0, 1.5 * phase)
        return SoakConfig(
            **{
                **self.__dict__,
                "phase_s": phase,
                "kill_every_s": kill,
                "sample_every_s": self.sample_every_s or min(5.0, max(1.0, d / 120)),
                "eject_base_s": self.eject_base_s or max(kill / 6, self.restart_after_s + RESTART_BOOT_S),
            }
        )


@dataclass
class SoakRun:
    config: SoakConfig
    capacity_rps: float
    phases: list[LoadPhase]
    buffer_size: int
    proxy_args: list[str]
    samples: list[ProcSample]
    idle: ProcSample | None
    census_start: FdCensus | None = None
    """The proxy's fds before the load (after its boot)."""
    census_rest: FdCensus | None = None
    """... and SETTLE_S after the last answer."""
    kills: list[tuple[float, int]] = field(default_factory=list)
    """(time from the load's zero, backend index) of each SIGKILL."""
    restarts: list[tuple[float, int]] = field(default_factory=list)
    result: RunResult | None = None
    counters: str = ""
    """The proxy's retry/ejection/error counters after the load (fault_harness.counters)."""
    elapsed_s: float = 0.0

    @property
    def half_s(self) -> float:
        return self.config.duration_s / 2

    def _failed(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.result is not None
        failed = is_failure(self.result.status)
        at_kill = in_flight_at(self.result, [t for t, _ in self.kills], KILL_TOLERANCE_S)
        return failed & at_kill, failed & ~at_kill

    def lost(self) -> tuple[int, int]:
        """(failed requests in flight at a kill, other failed requests)."""
        at_kill, other = self._failed()
        return int(at_kill.sum()), int(other.sum())

    def lost_outside_kills(self) -> list[str]:
        """Each failed request not in flight at a kill: when, how, and how long after the last kill."""
        assert self.result is not None
        r = self.result
        out = []
        for i in np.nonzero(self._failed()[1])[0]:
            t = float(r.sent_s[i])
            since = [t - k for k, _ in self.kills if k <= t]
            after = f", {min(since):.3f} s after a kill" if since else ""
            out.append(f"sent at {t:.3f} s: {r.status[i] or r.errors[i]} after {1e3 * r.latency_s[i]:.0f} ms{after}")
        return out


def soak_phases(cfg: SoakConfig, capacity_rps: float) -> list[LoadPhase]:
    assert cfg.phase_s is not None
    phases: list[LoadPhase] = []
    t, k = 0.0, 0
    while t < cfg.duration_s - 1e-9:
        length = min(cfg.phase_s, cfg.duration_s - t)
        phases.append(LoadPhase(length, cfg.loads[k % len(cfg.loads)] * capacity_rps, DEFAULT_MIX))
        t += length
        k += 1
    return phases


def proxy_args(cfg: SoakConfig, expected_requests: int, buffer_size: int, run_dir: Path) -> tuple[str, list[str]]:
    """(lbproxy --mode, flags) for the soak's proxy."""
    learning = ["--buffer-size", str(buffer_size), "--learning-starts", str(min(1000, buffer_size // 2))]
    common = ["--seed", str(cfg.seed), "--eject-base-s", f"{cfg.eject_base_s:g}", *learning]
    if cfg.mode == "online":
        return "serve", ["--policy", "dqn", "--online", *common]
    episode = 256
    # Enough episodes that the run never ends training early (retries are not decisions; 1.5x covers
    # a Poisson count far in its tail); ~5 checkpoints per run, so checkpoint writes are soaked too.
    episodes = max(10, math.ceil(1.5 * expected_requests / episode))
    every = max(1, expected_requests // episode // 5)
    flags = ["--episodes", str(episodes), "--episode-decisions", str(episode), "--checkpoint-every", str(every)]
    flags += ["--metrics-every", str(max(1, every // 2)), "--run-dir", str(run_dir)]
    return "train", [*flags, *common]


def run_soak(cfg: SoakConfig, work_dir: Path) -> SoakRun:
    cfg = cfg.resolved()
    assert cfg.kill_every_s is not None and cfg.sample_every_s is not None
    started = time.monotonic()
    with emulated_cluster() as cluster:
        capacity = cluster.capacity_rps(DEFAULT_MIX)
        phases = soak_phases(cfg, capacity)
        schedule = phased_schedule(phases, cfg.seed)
        buffer_size = cfg.buffer_size or max(500, int(BUFFER_FILL_SHARE * len(schedule)))
        mode, args = proxy_args(cfg, len(schedule), buffer_size, work_dir / "run")
        proxy = start_lbproxy(cluster.urls, args, work_dir / "proxy.log", mode=mode)
        run = SoakRun(cfg, capacity, phases, buffer_size, [f"--mode {mode}", *args], [], None)
        run.census_start = fd_census(proxy.popen.pid, cluster.ports)
        samplers: list[Sampler] = []
        try:

            def drive(clock: Clock) -> None:
                sampler = Sampler(proxy, clock.t0, cfg.sample_every_s or 5.0)
                samplers.append(sampler)
                sampler.sample()
                sampler.start()
                kill_every = cfg.kill_every_s or 60.0
                k = 1
                while k * kill_every < cfg.duration_s - cfg.restart_after_s:
                    victim = (k - 1) % cluster.n
                    clock.until(k * kill_every)
                    run.kills.append((clock.now(), victim))
                    cluster.kill(victim)
                    time.sleep(cfg.restart_after_s)
                    cluster.restart(victim)
                    run.restarts.append((clock.now(), victim))
                    k += 1

            (run.result,) = run_with_driver([(proxy.url, schedule)], drive, cfg.grace_s)
            for s in samplers:
                s.stop()
            t_end = time.perf_counter()
            time.sleep(SETTLE_S)
            if proxy.popen.poll() is None:
                t0 = samplers[0].t0 if samplers else t_end
                run.idle = sample_process(proxy, time.perf_counter() - t0)
                run.census_rest = fd_census(proxy.popen.pid, cluster.ports)
                run.counters = counters(proxy.admin_url)
            run.samples = samplers[0].samples if samplers else []
        finally:
            proxy.stop(PROXY_STOP_S)
        _check_stopped(proxy.popen.returncode, work_dir / "proxy.log")
    run.elapsed_s = time.monotonic() - started
    return run


def _check_stopped(code: int | None, log: Path) -> None:
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"lbproxy exited with {code} (expected 0 after SIGTERM):\n{tail}")
