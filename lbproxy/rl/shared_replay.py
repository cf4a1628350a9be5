"""The learner process's shared memory: one replay segment per producer, a head, the weights.

One learner process (rl/learner_process.py) is fed by one proxy (`--learner-process`) or by every worker
of `--workers N` (lbproxy/workers.py: --online or live training). The replay is N contiguous segments of
equal capacity, one per producer slot: each has exactly one writer (the slot's event loop, whose
ReplayBuffer writes straight into its segment) and keeps its own size, write position and fed count in
its row of `slots`, so nothing on the hot path takes a lock or pickles, and a restarted worker picks its
segment up where its predecessor left it. The learner samples uniformly over the filled rows of all
segments (`SegmentedReplay`) and paces its updates on the sum of the fed counts (rl/update_pacer.py).

Blocks (`Layout.specs`): the six replay fields with a leading slot axis, `head` (updates, weights
version, stop flag, and in live training the episode the supervisor counted), `slots` (size, position,
fed, the weights version the slot's worker serves, and in live training the decisions its workers
took: the ε schedule runs on their sum, lbproxy/train/live_workers.py),
`stats` (last loss, loss sum, loss count) and `weights`: a double buffer the learner writes the
version's slot of before it bumps the version, so a reader copies a buffer no one is writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from lbproxy.rl.replay import ReplayBuffer, ReplaySamples

REPLAY_FIELDS = ("obs", "actions", "rewards", "next_obs", "next_mask", "dones")
H_UPDATES, H_VERSION, H_STOP, H_EPISODE = range(4)
S_SIZE, S_POS, S_FED, S_VERSION, S_DECISIONS = range(5)
F_LAST_LOSS, F_LOSS_SUM, F_LOSS_N = range(3)
Specs = dict[str, tuple[tuple[int, ...], str]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shapes of the blocks: `n_slots` segments of `slot_capacity` rows, and the weights' size."""

    n_slots: int
    slot_capacity: int
    obs_dim: int
    n_actions: int
    n_params: int

    def specs(self) -> Specs:
        s, c = self.n_slots, self.slot_capacity
        return {
            "obs": ((s, c, self.obs_dim), "float32"),
            "actions": ((s, c), "int64"),
            "rewards": ((s, c), "float32"),
            "next_obs": ((s, c, self.obs_dim), "float32"),
            "next_mask": ((s, c, self.n_actions), "bool"),
            "dones": ((s, c), "float32"),
            "head": ((8,), "int64"),
            "slots": ((s, 5), "int64"),
            "stats": ((4,), "float64"),
            "weights": ((2, self.n_params), "float32"),
        }


@dataclasses.dataclass(frozen=True)
class Attachment:
    """What a worker needs to feed the supervisor's learner: the blocks' names and layout, its slot."""

    names: dict[str, str]
    layout: Layout
    slot: int
    untrained: bool = False
    """The learner's version-0 weights are fresh (live training from scratch): a worker routes by its
    fallback until the first published update, as one process does (policies/dqn_parts.learner_for)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "layout": dataclasses.asdict(self.layout),
            "slot": self.slot,
            "untrained": self.untrained,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(dict(data["names"]), Layout(**data["layout"]), int(data["slot"]), bool(data.get("untrained")))


class Shm:
    """Named shared-memory blocks viewed as NumPy arrays; the creator (`names=None`) unlinks them.

    `untrack`: an attaching process that multiprocessing did not start from the creator (a worker the
    supervisor ran with subprocess) has a resource tracker of its own, which would unlink the blocks
    when that process exits or is killed; such a process takes the name off its tracker at once.
    """

    def __init__(self, specs: Specs, names: dict[str, str] | None = None, *, untrack: bool = False) -> None:
        from multiprocessing import resource_tracker, shared_memory

        self.blocks: dict[str, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.owner = names is None
        for key, (shape, dtype) in specs.items():
            nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            if names is None:
                shm = shared_memory.SharedMemory(create=True, size=nbytes)
            else:
                # A spawned child shares its parent's resource tracker, so attaching (which registers
                # the name again, a set) does not make the child's exit unlink the block.
                shm = shared_memory.SharedMemory(name=names[key])
                if untrack:
                    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            self.blocks[key] = shm
            self.arrays[key] = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
            if names is None:
                self.arrays[key].fill(0)

    @property
    def names(self) -> dict[str, str]:
        return {k: b.name for k, b in self.blocks.items()}

    def close(self) -> None:
        self.arrays.clear()
        for b in self.blocks.values():
            with contextlib.suppress(Exception):
                b.close()
            if self.owner:
                with contextlib.suppress(Exception):
                    b.unlink()


def attach_segment(replay: ReplayBuffer, shm: Shm, slot: int) -> int:
    """Point `replay` at slot `slot`'s segment, where its previous writer left it; its fed count."""
    for f in REPLAY_FIELDS:
        setattr(replay, f, shm.arrays[f][slot])
    row = shm.arrays["slots"][slot]
    replay.size, replay.pos = int(row[S_SIZE]), int(row[S_POS])
    return int(row[S_FED])


def detach_segment(replay: ReplayBuffer, shm: Shm) -> None:
    """The replay's arrays become private copies again (before the blocks are closed)."""
    for f in REPLAY_FIELDS:
        setattr(replay, f, np.array(getattr(replay, f)))


class SegmentedReplay:
    """The learner's view of every segment: uniform samples over the filled rows of all of them.

    A sample may rarely read a row a producer is overwriting after its ring wrapped (no cross-process
    lock on the hot path); one torn transition in a 128-row minibatch is noise to SGD.
    """

    def __init__(self, shm: Shm, layout: Layout, seed: int) -> None:
        self.layout = layout
        self.slots = shm.arrays["slots"]
        n = layout.n_slots * layout.slot_capacity
        self.flat = ReplayBuffer(n, layout.obs_dim, layout.n_actions, seed=seed)
        for f in REPLAY_FIELDS:  # views: a (slots, capacity, ...) block is contiguous
            arr = shm.arrays[f]
            setattr(self.flat, f, arr.reshape(n, *arr.shape[2:]))
        self._sizes = np.zeros(layout.n_slots, np.int64)

    def size(self) -> int:
        """Filled rows over all segments (read after the fed counts: UpdatePacer's contract)."""
        self._sizes[:] = self.slots[:, S_SIZE]
        self.flat.size = int(self._sizes.sum())
        return self.flat.size

    def sample(self, batch_size: int, device: torch.device | str) -> ReplaySamples:
        """Rows k in [0, filled) map to (segment, row) in segment order, with the sizes `size()` read."""
        sizes = self._sizes
        ends = np.cumsum(sizes)
        k = self.flat.draw(batch_size)
        seg = np.searchsorted(ends, k, side="right")
        rows = seg * self.layout.slot_capacity + (k - (ends[seg] - sizes[seg]))
        return self.flat.gather(rows, device)
