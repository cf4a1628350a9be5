"""`lbproxy --mode train --workers N`: N proxy workers route live traffic and feed ONE learner; the
supervisor keeps the run.

Who does what. The supervisor (lbproxy/workers.py) starts the one learner process with the run's start
state (--resume's checkpoint, --init-model or fresh; lbproxy/shared_learner.py) and the N workers, each
a train-mode dqn proxy attached to its slot of the learner's shared replay. A worker's EpisodeTracker
(lbproxy/live_episodes.py) summarises each finished episode and the worker sends the summary to the
supervisor as one JSON line on its control socket. The supervisor's `LiveRun` (train/live.py) counts
them into the same CSV rows, progress lines, checkpoints and dqn_final.pth as one process would, so a
run resumes with any worker count. The learner's state for a checkpoint comes from the learner process
itself (`LearnerHost.snapshot`), between two of its updates.

Episodes and ε with N workers. An episode is `episode_decisions` decisions of ONE worker: the run's
episodes are the workers' interleaved in the order they finish. The ε schedule runs on the decisions of
every worker together, as it would on one process's: each worker writes its count into its slot of the
shared memory and reads the sum once a second (`DqnRuntime.sync_training`), and the supervisor reads
the same sum for a checkpoint's ε position. The episode the supervisor counted goes into the shared
head the same way, so every worker's `lbproxy_episode` shows the run's.

Stop. After `--episodes` episodes, or on SIGTERM/SIGINT: the workers drain (their last episodes still
arrive: the supervisor reads their sockets to EOF), then the last row, a checkpoint and dqn_final.pth
are written while the learner process still answers, then it stops; exit 0 as with one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbproxy.config import Settings
from lbproxy.rl.shared_replay import F_LAST_LOSS, H_EPISODE, H_UPDATES, S_DECISIONS
from lbproxy.train.live import LiveRun, until_stopped

if TYPE_CHECKING:
    from lbproxy.observe import WindowSummary
    from lbproxy.rl.network import QNetwork
    from lbproxy.shared_learner import SharedLearner


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What a training worker is told beside its settings: the ε schedule's length and the run's start."""

    total_decisions: int
    start_step: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerPlan:
        return cls(int(data["total_decisions"]), int(data["start_step"]))


def episode_message(summaries: list[WindowSummary], fallbacks: int) -> dict[str, Any]:
    """A worker's control-socket line for its finished episodes and its fallback decisions since the last."""
    return {"episodes": [dataclasses.asdict(s) for s in summaries], "fallbacks": fallbacks}


class WorkersTraining:
    """The supervisor's side of live training: the run, the one learner, the workers' episodes."""

    def __init__(self, settings: Settings) -> None:
        from lbproxy.policies.dqn_parts import epsilon_schedule

        self.settings = settings
        self.run = LiveRun(settings)
        self._init: QNetwork | None = None
        self._state: dict[str, Any] | None = None
        self.learner: SharedLearner | None = None
        self.pending: list[WindowSummary] = []
        self.wake = asyncio.Event()
        self._fallbacks = 0
        self._base_updates = 0
        self.schedule = epsilon_schedule(settings, self.run.total_decisions)

    # --- the supervisor's hooks ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Open the run (--resume / --init-model problems are one line, before any process starts)."""
        self._init, self._state = self.run.initial_state()
        self._base_updates = int(self._state["updates"]) if self._state is not None else 0

    async def start_learner(self, n_workers: int, metrics_dir: Path) -> SharedLearner:
        from lbproxy.shared_learner import SharedLearner

        self.learner = await SharedLearner.start(
            self.settings, n_workers, metrics_dir, init=self._init, learner_state=self._state
        )
        self._init = self._state = None
        return self.learner

    def worker_settings(self, data: dict[str, Any]) -> dict[str, Any]:
        """A worker's settings and its plan: the dqn policy, the network size the learner has."""
        data.update(policy="dqn", hidden=self.run.arch["hidden"])
        return {"training": WorkerPlan(self.run.total_decisions, self.run.start_step).to_json()}

    def on_message(self, msg: dict[str, Any]) -> None:
        """A worker's line: its finished episodes, counted by `keep`."""
        from lbproxy.observe import WindowSummary

        if "episodes" in msg:
            self.pending.extend(WindowSummary(**e) for e in msg["episodes"])
            self._fallbacks += int(msg.get("fallbacks", 0))
            self.wake.set()

    async def keep(self, stop: asyncio.Event) -> None:
        """Count episodes as they arrive, checkpoint those due; set `stop` after the last."""
        run, s = self.run, self.settings
        print(
            f"lbproxy train (live, {s.workers} workers): episodes {run.episode}->{run.total_episodes} x "
            f"{s.episode_decisions} decisions, run dir {run.run_dir.root}",
            file=sys.stderr,
            flush=True,
        )

        async def step() -> None:
            while run.add(self.pending, self):
                await asyncio.to_thread(run.save_checkpoint, self)
            self._head[H_EPISODE] = run.episode
            if run.done:
                stop.set()

        if run.done:
            stop.set()
        await until_stopped(stop, self.wake, step)

    def finish(self) -> None:
        """After every worker drained, while the learner process still answers (call off the loop)."""
        self.run.finish(self, self.pending, f"live, {self.settings.workers} workers")

    # --- the Trainee the run reads ---------------------------------------------------------------------
    @property
    def _head(self) -> Any:
        assert self.learner is not None
        return self.learner.host.shm.arrays["head"]

    @property
    def last_loss(self) -> float:
        assert self.learner is not None
        arrays = self.learner.host.shm.arrays
        return float(arrays["stats"][F_LAST_LOSS]) if arrays["head"][H_UPDATES] else float("nan")

    @property
    def total_updates(self) -> int:
        return self._base_updates + int(self._head[H_UPDATES])

    @property
    def decisions(self) -> int:
        assert self.learner is not None
        return self.run.start_step + int(self.learner.host.shm.arrays["slots"][:, S_DECISIONS].sum())

    @property
    def epsilon(self) -> float:
        return self.schedule.value(self.decisions)

    @property
    def fallbacks(self) -> int:
        return self._fallbacks

    def snapshot(self) -> dict[str, Any]:
        assert self.learner is not None
        return self.learner.host.snapshot()


def run_train_workers(settings: Settings) -> int:
    from lbproxy.serve import check_serve_settings, run_async
    from lbproxy.workers import Supervisor

    check_serve_settings(settings)  # an exposed admin listener without a token: before the run dir opens
    training = WorkersTraining(settings)
    training.prepare()

    async def main() -> int:
        return await Supervisor(settings, training).run()

    with training.run.run_dir.log.capturing():
        return run_async(main())
