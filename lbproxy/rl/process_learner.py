"""A loop's handle on the learner process (rl/learner_process.py): it writes its replay segment and
swaps in the weights the process publishes. It owns the process (`--learner-process`: one proxy) or is
attached to one slot of the supervisor's (`--workers N`: lbproxy/shared_learner.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lbproxy.rl.learner_process import WEIGHT_POLL_S, LearnerHost
from lbproxy.rl.replay import ReplayBuffer, TransitionBatch
from lbproxy.rl.shared_replay import (
    F_LAST_LOSS,
    F_LOSS_N,
    F_LOSS_SUM,
    H_EPISODE,
    H_UPDATES,
    H_VERSION,
    S_DECISIONS,
    S_FED,
    S_POS,
    S_SIZE,
    S_VERSION,
    Attachment,
    Shm,
    attach_segment,
    detach_segment,
)


class ProcessLearner:
    """A loop's handle on the learner process: it owns the process (`host`: one proxy) or is attached to
    slot `attach.slot` of the supervisor's (`--workers N`). Either way its ReplayBuffer writes its own
    segment and the loop polls the weights version."""

    def __init__(
        self,
        core: Any,
        replay: ReplayBuffer,
        *,
        publish: Callable[[Any], Any],
        prepare: Callable[[dict[str, torch.Tensor]], Any],
        host: LearnerHost | None = None,
        attach: Attachment | None = None,
    ) -> None:
        assert (host is None) != (attach is None)
        self.core = core
        self.replay = replay
        self.publish = publish
        self.prepare = prepare
        self.host = host
        self.error: BaseException | None = None
        self._template = {k: v.detach().cpu().clone() for k, v in core.online.state_dict().items()}
        if host is not None:
            self._shm, self.slot = host.shm, 0
        else:
            assert attach is not None
            self._shm, self.slot = Shm(attach.layout.specs(), attach.names, untrack=True), attach.slot
        self.fed = attach_segment(replay, self._shm, self.slot)
        self._head = self._shm.arrays["head"]
        self._stats = self._shm.arrays["stats"]
        self._row = self._shm.arrays["slots"][self.slot]
        self.base_updates = int(core.updates) if host is not None else 0
        self._seen_version = 0
        self._decisions_base = int(self._row[S_DECISIONS])
        """Decisions this slot's earlier workers took (live training counts on from there)."""
        if attach is not None:  # start on what the learner serves now: a resumed run's, or a later version
            self._seen_version = self._take_current(core.online.load_state_dict)
        self._loss_n_seen = 0.0
        self._loss_sum_seen = 0.0
        self._poll: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def serving_version(self) -> int:
        """The learner's weights version this loop took last (0: its start weights; -1: the first
        copy raced a publish, the poll takes the next)."""
        return self._seen_version

    @property
    def attached(self) -> bool:
        """Fed into the supervisor's learner, which reports the learner's metrics itself."""
        return self.host is None

    # --- loop side ----------------------------------------------------------------------------------
    def add_transitions(self, batch: TransitionBatch) -> None:
        self.replay.add_batch(batch)
        self.fed += batch.obs.shape[0]
        row = self._row
        row[S_POS] = self.replay.pos
        row[S_SIZE] = self.replay.size  # before fed: the learner reads fed first (UpdatePacer's contract)
        row[S_FED] = self.fed

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._poll is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        if self.host is not None:
            self.host.start()
        self._poll = self._loop.call_soon(self._poll_weights)  # a restarted worker takes the latest at once

    def _take_current(self, use: Callable[[dict[str, torch.Tensor]], Any]) -> int:
        """Hand the weights version the learner publishes now to `use`; the version (-1: it was
        overwritten while copied, try again later)."""
        version = int(self._head[H_VERSION])
        flat = self._shm.arrays["weights"][version % 2].copy()
        if int(self._head[H_VERSION]) - version >= 2:
            return -1
        sd: dict[str, torch.Tensor] = {}
        off = 0
        for k, v in self._template.items():
            n = v.numel()
            sd[k] = torch.from_numpy(flat[off : off + n].reshape(v.shape))
            off += n
        use(sd)
        self._row[S_VERSION] = version
        return version

    def count_decisions(self, decisions: int) -> tuple[int, int]:
        """Live training with N workers: record this loop's `decisions` in its slot; (the decisions of
        every slot together, the episode the supervisor counted). Called once a second, not per request."""
        self._row[S_DECISIONS] = self._decisions_base + decisions
        return int(self._shm.arrays["slots"][:, S_DECISIONS].sum()), int(self._head[H_EPISODE])

    def _poll_weights(self) -> None:
        if int(self._head[H_VERSION]) != self._seen_version:
            version = self._take_current(lambda sd: self.publish(self.prepare(sd)))
            if version >= 0:
                self._seen_version = version
        if self.host is not None and self.error is None and (why := self.host.failure()) is not None:
            self.error = RuntimeError(why)
        if self._loop is not None:
            self._poll = self._loop.call_later(WEIGHT_POLL_S, self._poll_weights)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self._loop = None
        if self.host is not None:
            with contextlib.suppress(Exception):  # keep the final state for the last checkpoint
                self.snapshot()
            self.host.stop(timeout_s)

    def close(self) -> None:
        """Release the shared memory (after stop; the replay arrays become private copies again)."""
        detach_segment(self.replay, self._shm)
        self._head = np.zeros(8, np.int64)
        self._stats = np.zeros(4, np.float64)
        self._row = np.zeros(5, np.int64)
        if self.host is not None:
            self.host.close()
        else:
            self._shm.close()

    @property
    def running(self) -> bool:
        return self.host.alive if self.host is not None else self._poll is not None

    @property
    def updates(self) -> int:
        return int(self._head[H_UPDATES])

    @property
    def version(self) -> int:
        """Weights the learner process published so far."""
        return int(self._head[H_VERSION])

    @property
    def total_updates(self) -> int:
        return self.base_updates + self.updates

    @property
    def last_loss(self) -> float:
        return float(self._stats[F_LAST_LOSS]) if self.updates else float("nan")

    def take_mean_loss(self) -> float:
        s, n = float(self._stats[F_LOSS_SUM]), float(self._stats[F_LOSS_N])
        ds, dn = s - self._loss_sum_seen, n - self._loss_n_seen
        self._loss_sum_seen, self._loss_n_seen = s, n
        return ds / dn if dn > 0 else float("nan")

    def snapshot(self) -> dict[str, Any]:
        """The learner process's state (call off the loop: it waits for the reply). Attached: the
        supervisor's learner is checkpointed by its host, a worker has only its starting state."""
        if self.host is None:
            return copy.deepcopy(self.core.state_dict())
        state = self.host.snapshot()
        if self.host.failed is not None and self.error is None:
            self.error = RuntimeError(self.host.failed)
        return state
