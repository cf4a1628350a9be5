"""Live training as live_train_foreign measures it: `lbproxy --mode train --env live` started from
scratch (or an initial model) in front of a foreign cluster, its /metrics read during the load, then
SIGTERM and the model it wrote.

Used by benchmarks/live_train_foreign.py and tests/test_live_train_foreign.py (which put benchmarks/
on sys.path).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import MetricsPage, scrape_metrics  # noqa: E402
from foreign_cluster import ForeignCluster  # noqa: E402
from live_compare import DRAIN_TIMEOUT_S, RESTART_AFTER_S, Measurement, PolicyConfig, measure_running, start_lbproxy  # noqa: E402
from support import Proc  # noqa: E402

from lbproxy.config import Settings  # noqa: E402
from lbproxy.rl.schedule import EpsilonSchedule  # noqa: E402
from loadgen.open_loop import Schedule  # noqa: E402

FALLBACK = PolicyConfig("peak_ewma", ("--policy", "peak_ewma"))
"""The fallback heuristic: lbproxy.policies.dqn.FALLBACK_POLICY (not imported: that module imports torch)."""
TRAIN_EPISODES = 100_000
"""Never reached (25.6 M decisions at 256 per episode, a day at 283 req/s): the trainer stops at SIGTERM."""
EPS_FLOOR_AT = 0.4
"""Share of the training schedule's requests after which ε is at its floor."""
SAMPLE_EVERY_S = 2.0
"""How often the trainer's /metrics is read during the training load (ε and guardrail per minute)."""
TRAINER_STOP_S = 120.0
"""Longest wait for the trainer to drain (lbproxy.live_train.DRAIN_TIMEOUT_S, 10 s), checkpoint and write
dqn_final.pth after SIGTERM; then it is killed."""


def eps_fraction_for(decisions: int, episode_decisions: int, floor_at: float = EPS_FLOOR_AT) -> float:
    """--eps-fraction that puts ε at its floor after `floor_at` x `decisions` decisions of a run of
    TRAIN_EPISODES x `episode_decisions` (lbproxy decays ε over eps_fraction x that total)."""
    return floor_at * decisions / (TRAIN_EPISODES * episode_decisions)


def start_trainer(
    backends: str,
    run_dir: Path,
    eps_fraction: float,
    seed: int,
    episode_decisions: int,
    init_model: Path | None = None,
    workers: int = 1,
) -> Proc:
    """`lbproxy --mode train --env live [--workers N]` (live_compare.start_lbproxy), its output in
    RUN_DIR/trainer.log (a pipe nobody reads for minutes could fill and stall it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["--run-dir", str(run_dir), "--episodes", str(TRAIN_EPISODES), "--episode-decisions", str(episode_decisions)]
    args += ["--eps-fraction", repr(eps_fraction), "--seed", str(seed), "--workers", str(workers)]
    if init_model is not None:
        args += ["--init-model", str(init_model)]
    try:
        return start_lbproxy(("--mode", "train", "--env", "live"), backends, args, log=run_dir / "trainer.log")
    except Exception as exc:
        raise RuntimeError(f"the trainer did not start: {exc}\n{trainer_log(run_dir)[-3000:]}") from None


def trainer_log(run_dir: Path) -> str:
    try:
        return (run_dir / "trainer.log").read_text(errors="replace")
    except OSError:
        return ""


def stop_trainer(proc: Proc, timeout_s: float = TRAINER_STOP_S) -> int:
    """SIGTERM (drain, checkpoint, dqn_final.pth) and its exit status; killed after `timeout_s`."""
    proc.popen.send_signal(signal.SIGTERM)
    try:
        return proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()
        return proc.popen.returncode


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float
    """Seconds since the training load started (to within the generator's start-up lead)."""
    metrics: MetricsPage


class MetricsSampler(threading.Thread):
    """Reads a proxy's /metrics every `every_s` until stopped; a failed read is skipped."""

    def __init__(self, admin_url: str, every_s: float = SAMPLE_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.every_s = every_s
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self.samples.append(Sample(time.monotonic() - self.t0, scrape_metrics(self.admin_url)))
            except (OSError, ValueError):
                continue

    def stop(self) -> list[Sample]:
        self._done.set()
        self.join(10.0)
        return self.samples


@dataclass
class TrainRun:
    """The training phase: the client's view, the trainer's metrics during and at the end of the load,
    and how the trainer stopped."""

    measurement: Measurement
    """The client's view; its `metrics` are the trainer's /metrics when the load had ended."""
    samples: list[Sample]
    exit_code: int
    model: Path | None
    """RUN_DIR/dqn_final.pth when the trainer wrote it."""
    log: str
    eps_fraction: float
    eps_floor_decisions: int
    """Decisions after which ε is at its floor (lbproxy.rl.schedule.EpsilonSchedule)."""
    stop_s: float
    """SIGTERM to exit: drain, checkpoint and final model."""


def train(
    cluster: ForeignCluster,
    schedule: Schedule,
    run_dir: Path,
    grace_s: float,
    init_model: Path | None = None,
    eps_floor_at: float = EPS_FLOOR_AT,
    episode_decisions: int = 256,
    sample_every_s: float = SAMPLE_EVERY_S,
    workers: int = 1,
) -> TrainRun:
    """`schedule` through a live trainer started from scratch (or `init_model`) in front of `cluster`,
    then SIGTERM and the trainer's final model."""
    cluster.settle(DRAIN_TIMEOUT_S, restart_after_s=RESTART_AFTER_S)
    eps_fraction = eps_fraction_for(len(schedule), episode_decisions, eps_floor_at)
    defaults = Settings.model_fields
    eps = EpsilonSchedule.for_training(
        defaults["eps_start"].default, defaults["eps_end"].default, eps_fraction, TRAIN_EPISODES * episode_decisions
    )
    proc = start_trainer(
        cluster.backends_arg(), run_dir, eps_fraction, schedule.seed, episode_decisions, init_model, workers
    )
    try:
        sampler = MetricsSampler(proc.admin_url, sample_every_s)
        sampler.start()
        try:
            m = measure_running(proc, "train", schedule, grace_s)
        finally:
            samples = sampler.stop()
    finally:
        t0 = time.monotonic()
        code = stop_trainer(proc)
        stop_s = time.monotonic() - t0
    final = run_dir / "dqn_final.pth"
    return TrainRun(
        measurement=m,
        samples=samples,
        exit_code=code,
        model=final if final.is_file() else None,
        log=trainer_log(run_dir),
        eps_fraction=eps_fraction,
        eps_floor_decisions=eps.decay_decisions,
        stop_s=stop_s,
    )
