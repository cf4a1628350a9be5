"""`lbproxy --mode train --env sim`: the simulator training workflow, resumable bit for bit.

Episodes. An episode is `episode_decisions` routed decisions in a *fresh* Simulator seeded from
(seed, episode) (:func:`train_sim_seed`), after a short warm-up in the same simulator run, routed by
the SED oracle and neither recorded nor learned from (lbproxy/sim/episode.py): it fills the backends'
queues and the view's latency estimates, so an episode does not start from an idle, unmeasured
cluster. Making every episode's traffic a pure function of (seed, episode) is what makes `--resume`
exact: only the agent, learner, replay buffer and RNG states must be saved, as state_dicts. The phase of episode `ep` is
`lbproxy.phases.phase_index_for_episode(ep, episodes)`: the run is a three-phase curriculum
(steady -> mixed -> peak, see lbproxy/phases.py) over equal thirds.

Outputs under RUN_DIR (train/run_dir.py, the same layout as live training): `metrics/training_metrics.csv`
(a row every `metrics_every` episodes), `checkpoints/dqn_episode_XXXX.pth` every `checkpoint_every`
episodes, `logs/training_errors.log` (warnings and errors) and `dqn_final.pth` (the online network)
at the end. Only the newest `keep_checkpoints` checkpoints are kept: each holds the replay buffer
(~70 MB by default).

Cost: the default run (6000 episodes x 256 decisions, 0.25 updates per decision at batch 128, one torch
thread) took 491 CPU-seconds (~8.5 min of one core) on a 2-vCPU EPYC guest (2026-11-24); measured with
`/usr/bin/time`, see lbproxy/models/dqn_default.json.

Stopping. Ctrl-C (SIGINT) and SIGTERM are handled between episodes: the first one finishes the
running episode (well under a second at the default size), saves a checkpoint of it and exits with
the command that resumes: 130 after SIGINT, 143 (128 + SIGTERM) after SIGTERM, the shell's codes
for "stopped by that signal", so a supervisor (Kubernetes, systemd, a batch queue) sees an
unfinished run, not a finished one. A second signal aborts at once. A SIGKILL at any moment loses
only the episodes after the last checkpoint: `--resume` continues from it (writes are atomic, a
temp file cut short is never taken for a checkpoint, and the CSV rows after it are dropped).

Rounds. :class:`SimTrainerBase` holds what every simulator trainer shares (fingerprint, resume, checkpoints,
CSV rows and progress, the stop latch, the final model) and runs the episodes in rounds that never
cross a checkpoint boundary; a stop is honoured, and a checkpoint written, only between rounds. This
module's :class:`SimTrainer` runs rounds of one episode in this process (`--actors 0`, the default);
train/ray_sim.py runs rounds of N episodes on N Ray actors (`--actors N`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import feature_dim
from lbproxy.rl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from lbproxy.telemetry import CsvMetricsWriter
from lbproxy.train.curriculum import fingerprint, resolve_training_set, run_training_episode
from lbproxy.train.report import MetricsWindow, Progress, format_eta, metrics_row
from lbproxy.train.run_dir import RunDir, capture_rng_state, restore_rng_state
from lbproxy.train.stop import stop_latch

if TYPE_CHECKING:
    pass

TRAIN_FORMAT = "lbproxy-train/2"
"""/2: the agent keeps its update pacer's debt and no global RNG state (the trainer's, saved once); /1 is refused."""
RAY_TRAIN_FORMAT = "lbproxy-train-ray/1"
"""Checkpoints of the Ray trainer (`--actors N`, train/ray_sim.py): its "agent" entry is its own."""


class SimTrainerBase(ABC):
    """What every `--env sim` trainer shares: the learner and its replay, the run directory, resume,
    checkpoints, CSV rows, the stop latch and the final model; and the loop over rounds of episodes.
    A subclass says how a round's episodes are simulated and learned from (:meth:`run_round`) and what
    of its own a checkpoint holds (:meth:`policy_state`). `run()` returns the exit code."""

    FORMAT: ClassVar[str]
    """The `format` of its checkpoints (rl/checkpoint.py): another trainer's are refused."""
    actors: int = 0
    """Ray rollout actors (`--actors`); 0 for the single-process trainer."""

    def __init__(self, settings: Settings) -> None:
        from lbproxy.rl.learner import DqnConfig, Learner, resolve_device
        from lbproxy.rl.replay import ReplayBuffer

        if settings.seed < 0:
            raise ConfigError(f"invalid setting --seed: must be >= 0 for simulator training, got {settings.seed}")
        self.settings = settings
        self.train_set = resolve_training_set(settings)
        self.episodes = settings.resolved_episodes()
        self.run_dir = RunDir(settings.run_dir)
        self.fp = fingerprint(settings, self.train_set, self.episodes)
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one core: the MLP is small and the default run is sized for one core
        self.cfg = DqnConfig.from_settings(settings)
        random.seed(settings.seed)
        np.random.seed(settings.seed % 2**32)
        torch.manual_seed(settings.seed)
        self.learner = Learner(self.cfg, device=self.device)
        self.replay = ReplayBuffer(
            self.cfg.buffer_size, feature_dim(self.train_set.width), self.train_set.width, seed=settings.seed
        )
        self.start_episode = 0
        self.window = MetricsWindow()
        self.wall_before = 0.0
        self.t0 = time.perf_counter()

    # --- what a subclass provides --------------------------------------------------------------------
    @property
    def round_size(self) -> int:
        """Episodes per round (a round may be cut shorter at a checkpoint boundary or the run's end)."""
        return 1

    @abstractmethod
    def run_round(self, episodes: range) -> Iterator[int]:
        """Simulate and learn from `episodes`, in order; after each one is learned from and added to
        `self.window`, yield its (0-based) phase."""

    @property
    @abstractmethod
    def epsilon(self) -> float:
        """Exploration rate of the next decision (the CSV's epsilon)."""

    @property
    @abstractmethod
    def last_loss(self) -> float:
        """The learner's latest TD loss (NaN before learning starts)."""

    @abstractmethod
    def policy_state(self) -> dict[str, Any]:
        """The checkpoint's "agent" entry: the trainer's own counters beside the learner and replay."""

    @abstractmethod
    def load_policy_state(self, state: dict[str, Any]) -> None:
        """Restore `policy_state` (called after the learner and the replay are restored)."""

    def session(self) -> AbstractContextManager[object]:
        """Around the episode loop (the Ray trainer: its Ray session and actors)."""
        return nullcontext()

    def describe(self) -> str:
        """How the episodes run, for the start line."""
        return f"device {self.device}"

    # --- shared ------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Open the run directory; with --resume restore every state from the newest checkpoint."""
        opened = self._open_run_dir()
        if opened is None:
            return
        path, state = opened
        fp, saved_fp = self.fp, state.get("fingerprint", {})
        diff = [k for k in sorted(set(fp) | set(saved_fp)) if fp.get(k) != saved_fp.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"--resume: {path} was trained with {k}={saved_fp.get(k)!r}, now {k}={fp.get(k)!r}; "
                f"resume with the same settings ({', '.join(diff)} differ) or start a new --run-dir"
            )
        with RunDir.restoring(path):
            self.learner.load_state_dict(state["learner"])
            self.replay.load_state_dict(state["replay"])
            self.load_policy_state(state["agent"])
            restore_rng_state(state["rng"])
            self.start_episode = int(state["episode"])
            self.window = MetricsWindow.from_state(state["window"])
            self.wall_before = float(state["wall_s"])
        print(f"lbproxy: resuming {self.run_dir.root} from episode {self.start_episode} ({path.name})", file=sys.stderr)

    def _open_run_dir(self) -> tuple[Path, dict[str, Any]] | None:
        """RunDir.open, with the one-line error naming the actor count when the newest checkpoint is
        the other trainer's (trained with another `--actors`)."""
        try:
            return self.run_dir.open(resume=self.settings.resume, fmt=self.FORMAT, trainer="simulator-training")
        except ConfigError:
            trained = _trained_actors(self.run_dir.root) if self.settings.resume else None
            if trained is not None and trained != self.actors:
                path = latest_checkpoint(self.run_dir.root)
                raise ConfigError(
                    f"--resume: {path} was trained with --actors {trained}, now --actors {self.actors}; "
                    f"resume with --actors {trained} or start a new --run-dir"
                ) from None
            raise

    def wall_s(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t0)

    def save(self, episode_done: int) -> Path:
        payload = {
            "format": self.FORMAT,
            "episode": episode_done,
            "fingerprint": self.fp,
            "learner": self.learner.state_dict(),
            "replay": self.replay.state_dict(),
            "agent": self.policy_state(),
            "rng": capture_rng_state(),
            "window": self.window.state(),
            "wall_s": self.wall_s(),
        }
        return self.run_dir.save_checkpoint(episode_done, payload, self.settings.keep_checkpoints)

    def write_final(self, wall: float) -> Path:
        meta = {
            "trained_by": "lbproxy --mode train --env sim" + (f" --actors {self.actors}" if self.actors else ""),
            "episodes": self.episodes,
            "wall_s": round(wall, 1),
            "device": str(self.device),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.fp.items()},
        }
        return self.run_dir.save_final(self.learner.online, meta)

    def report(self, done: int, phase: int, writer: CsvMetricsWriter, progress: Progress) -> None:
        """The CSV row the window closes, and the progress line."""
        wall = self.wall_s()
        means = self.window.means()
        epsilon = self.epsilon
        writer.write(metrics_row(done, phase + 1, means, epsilon=epsilon, updates=self.learner.updates, wall_s=wall))
        progress.row(done, phase + 1, means, epsilon=epsilon, wall_s=wall)
        self.window = MetricsWindow()

    def rounds(self) -> Iterator[range]:
        """The episodes still to run, in rounds of `round_size` cut at every checkpoint boundary: the
        rounds after any checkpoint (a stop's included: it ends a round) are the uninterrupted run's."""
        every, ep = self.settings.checkpoint_every, self.start_episode
        while ep < self.episodes:
            end = min(ep + self.round_size, (ep // every + 1) * every, self.episodes)
            yield range(ep, end)
            ep = end

    def train(self, stop_after: int | None) -> int | None:
        """The loop over rounds; the exit code when a stop signal (or `stop_after`) ended it early."""
        s, log = self.settings, self.run_dir.log
        writer = self.run_dir.metrics_writer()
        progress = Progress(self.episodes, self.start_episode, self.wall_before)
        diverged = False
        try:
            with stop_latch("episode" if self.round_size == 1 else "round of episodes") as latch:
                for episodes in self.rounds():
                    for done, phase in enumerate(self.run_round(episodes), start=episodes.start + 1):
                        if not diverged and self.learner.updates and not math.isfinite(self.last_loss):
                            diverged = True
                            log.warning(f"lbproxy: episode {done}: the TD loss is {self.last_loss} (diverged?)")
                        if done % s.metrics_every == 0 or done == self.episodes:
                            self.report(done, phase, writer, progress)
                    done = episodes.stop
                    stopping = latch.requested or (stop_after is not None and done >= stop_after)
                    if done % s.checkpoint_every == 0 or (stopping and done < self.episodes):
                        self.save(done)
                    if stopping and done < self.episodes:
                        resume_cmd = f"lbproxy --mode train --env sim --resume --run-dir {self.run_dir.root}"
                        if self.actors:
                            resume_cmd += f" --actors {self.actors}"
                        log.warning(
                            f"lbproxy: stopped after episode {done} ({latch.reason}); checkpoint saved. "
                            f"Resume with: {resume_cmd}"
                        )
                        return latch.exit_code
        finally:
            writer.close()
        return None

    def run(self, stop_after: int | None = None) -> int:
        self.resume()
        final = self.run_dir.final_model
        if self.start_episode >= self.episodes:
            if not final.exists():  # killed between the last checkpoint and the final model
                self.write_final(self.wall_before)
            print(
                f"lbproxy: {self.run_dir.root} already finished {self.episodes} episodes; model {final}",
                file=sys.stderr,
            )
            return 0
        s, log = self.settings, self.run_dir.log
        print(
            f"lbproxy: training {self.episodes} episodes x {s.episode_decisions} decisions on scenario "
            f"{self.train_set.name!r}, {self.describe()}, run dir {self.run_dir.root}",
            file=sys.stderr,
        )
        with log.capturing():
            try:
                with self.session():
                    self.t0 = time.perf_counter()
                    stopped = self.train(stop_after)
            except KeyboardInterrupt:
                log.write("WARNING", "aborted by a second stop signal: the episodes after the last checkpoint are lost")
                raise
            except Exception as exc:
                log.write("ERROR", f"training stopped: {type(exc).__name__}: {exc}", exc)
                raise
        if stopped is not None:
            return stopped
        wall = self.wall_s()
        self.write_final(wall)
        print(f"lbproxy: done: {self.episodes} episodes in {format_eta(wall)}; model {final}", file=sys.stderr)
        return 0


def _trained_actors(root: Path) -> int | None:
    """`--actors` of the run whose newest checkpoint is in `root` (0: the single-process trainer's),
    None when there is none or it is neither trainer's."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None
    if state.get("format") == TRAIN_FORMAT:
        return 0
    if state.get("format") == RAY_TRAIN_FORMAT:
        return int(state.get("fingerprint", {}).get("actors", 0))
    return None


class SimTrainer(SimTrainerBase):
    """The single-process trainer (`--actors 0`): rounds of one episode, routed by a DqnAgent that
    learns as it goes (updates after each completion, rl/agent.py)."""

    FORMAT = TRAIN_FORMAT

    def __init__(self, settings: Settings) -> None:
        from lbproxy.rl.agent import DqnAgent

        super().__init__(settings)
        self.agent = DqnAgent(
            self.learner,
            self.replay,
            self.cfg,
            total_decisions=self.episodes * settings.episode_decisions,
            seed=settings.seed,
            width=self.train_set.width,
        )

    @property
    def epsilon(self) -> float:
        return self.agent.epsilon

    @property
    def last_loss(self) -> float:
        return self.agent.last_loss

    def policy_state(self) -> dict[str, Any]:
        return self.agent.state_dict()

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state)

    def run_round(self, episodes: range) -> Iterator[int]:
        for ep in episodes:
            phase, summary = run_training_episode(self.agent, self.settings, self.train_set, self.episodes, ep)
            self.window.add(summary, self.agent.last_loss)
            yield phase


def run_train_sim(settings: Settings, *, stop_after: int | None = None) -> int:
    """Train the DQN in the simulator (`--actors N`: on N Ray actors, train/ray_sim.py); returns the
    exit code. `stop_after` (tests only) stops after the round that reaches that many episodes as if
    Ctrl-C had been pressed, so a run can be split and resumed exactly."""
    if settings.actors > 0:
        from lbproxy.train.ray_sim import RaySimTrainer

        return RaySimTrainer(settings).run(stop_after)
    return SimTrainer(settings).run(stop_after)
