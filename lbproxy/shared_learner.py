"""The one learner of `--workers N` (`--online`, or live training: lbproxy/train/live_workers.py), as
the supervisor (lbproxy/workers.py) holds it.

ONE learner process (lbproxy/rl/learner_process.py `LearnerHost`), started before the workers and
stopped after they drained. Its replay is one shared-memory segment per worker slot
(lbproxy/rl/shared_replay.py); the control line tells each worker the blocks' names and its slot (its
index), so a restarted worker writes on in its predecessor's segment. Every worker polls the weights
version between loop iterations and swaps the new weights in. The learner gets a core of its own when
there are more CPUs than workers (the workers are pinned to the others), else it runs on theirs at
LEARNER_NICE, so routing comes first. Its metrics go to the workers' PROMETHEUS_MULTIPROC_DIR; its
state is under `learner` in the supervisor's GET /admin/backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbproxy.config import Settings
from lbproxy.rl.learner_process import LearnerHost
from lbproxy.rl.shared_replay import Attachment

if TYPE_CHECKING:
    from lbproxy.rl.network import QNetwork

log = logging.getLogger("lbproxy")


class SharedLearner:
    """The supervisor's learner: its host, where it runs, and the watch that reports its death once."""

    def __init__(self, host: LearnerHost, metrics_dir: Path, worker_cpus: set[int], *, untrained: bool) -> None:
        self.host = host
        self.untrained = untrained
        """Live training from scratch: the weights it starts on route nothing (Attachment.untrained)."""
        self.metrics_dir = metrics_dir
        self.worker_cpus = worker_cpus
        """The CPUs left to the workers when the learner has one of its own; empty: no pinning."""
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        settings: Settings,
        n_workers: int,
        metrics_dir: Path,
        *,
        init: QNetwork | None = None,
        learner_state: dict[str, Any] | None = None,
    ) -> SharedLearner:
        """Load the served model (--online) or take the run's start state (live training: `init`,
        `learner_state`), make the blocks and start the process (ConfigError: one line)."""
        from lbproxy.policies.dqn_parts import shared_learner_host
        from lbproxy.rl.online import LEARNER_NICE

        cpus = sorted(os.sched_getaffinity(0))
        own_core = len(cpus) > n_workers
        nice = 0 if own_core else LEARNER_NICE
        host = await asyncio.to_thread(
            shared_learner_host, settings, n_workers, str(metrics_dir), nice, init, learner_state
        )
        try:
            host.start()
        except BaseException:
            host.close()
            raise
        untrained = settings.mode == "train" and init is None and learner_state is None
        self = cls(host, metrics_dir, set(cpus[:-1]) if own_core else set(), untrained=untrained)
        if own_core and host.pid is not None:
            with contextlib.suppress(OSError):  # it died at once: the watch reports why
                os.sched_setaffinity(host.pid, {cpus[-1]})
        self._watch = asyncio.get_running_loop().create_task(self._report_death())
        return self

    def attachment(self, slot: int) -> Attachment:
        return Attachment(self.host.shm.names, self.host.layout, slot, self.untrained)

    def describe(self) -> dict[str, Any]:
        return self.host.describe()

    async def _report_death(self) -> None:
        while (why := self.host.failure()) is None:
            await asyncio.sleep(1.0)
        log.warning("lbproxy: %s; the workers route on with the last published weights, learning stops", why)

    async def stop(self) -> None:
        """After the workers let go of its blocks: stop the process, drop its metrics, unlink the blocks."""
        from prometheus_client import multiprocess

        if self._watch is not None:
            self._watch.cancel()
        pid = self.host.pid
        await asyncio.to_thread(self.host.stop)
        self.host.close()
        if pid is not None:
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
