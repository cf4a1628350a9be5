"""The background learner in a separate process (`--learner-process`): no GIL shared with the loop.

Same contract as rl/online.py's BackgroundLearner (add_transitions, start, stop, snapshot, error) and
the same paced loop (`run_paced`, rl/update_pacer.py). The replay lives in shared memory (the loop
writes rows, the process samples them), weights come back through a double-buffered shared block
polled every WEIGHT_POLL_S, and checkpoints ask the process for its state over a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lbproxy.rl.online import LEARNER_NICE, run_paced
from lbproxy.rl.replay import TransitionBatch
from lbproxy.rl.update_pacer import UpdatePacer

_REPLAY_FIELDS = ("obs", "actions", "rewards", "next_obs", "next_mask", "dones")
_H_SIZE, _H_FED, _H_UPDATES, _H_VERSION, _H_STOP = range(5)
_F_LAST_LOSS, _F_LOSS_SUM, _F_LOSS_N = range(3)
WEIGHT_POLL_S = 0.05
"""How often the loop looks for new weights from the learner process (a version counter read)."""


class _Shm:
    """Named shared-memory blocks viewed as NumPy arrays; the creator unlinks them."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], str]], names: dict[str, str] | None = None) -> None:
        from multiprocessing import shared_memory

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


def _flat_size(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state_dict.values())


def _process_main(
    conn: Any, names: dict[str, str], specs: dict[str, tuple[tuple[int, ...], str]], boot: dict[str, Any]
) -> None:
    """The learner process: samples the shared replay, updates, writes weights to shared memory."""
    from lbproxy.rl.learner import DqnConfig, Learner
    from lbproxy.rl.replay import ReplayBuffer

    torch.set_num_threads(1)
    with contextlib.suppress(OSError):
        os.nice(int(boot["nice"]))
    shm = _Shm(specs, names)
    replay = ReplayBuffer(boot["capacity"], boot["obs_dim"], boot["n_actions"], seed=boot["seed"] + 1)
    for f in _REPLAY_FIELDS:
        setattr(replay, f, shm.arrays[f])
    learner = Learner(DqnConfig(**boot["cfg"]), device=boot["device"])
    learner.load_state_dict(boot["learner"])
    try:
        _learn(conn, shm, replay, learner, boot)
    except Exception as exc:  # one line to the parent (which logs and counts it), not a traceback
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"))
    finally:
        conn.close()
        shm.close()


def _learn(conn: Any, shm: _Shm, replay: Any, learner: Any, boot: dict[str, Any]) -> None:
    """The learner process's loop: update at the pace the loop's transitions allow, until told to stop."""
    head, stats, weights = shm.arrays["head"], shm.arrays["stats"], shm.arrays["weights"]
    bs, every = boot["batch_size"], boot["weight_sync_every"]
    p = boot["pacer"]
    pacer = UpdatePacer(p["ratio"], p["learning_starts"], batch_size=bs, capacity=boot["capacity"])
    updates = 0

    def stopped() -> bool:
        """Told to stop (the stop flag or a message); answers a snapshot request meanwhile."""
        if head[_H_STOP]:
            return True
        while conn.poll(0):
            msg = conn.recv()
            if msg == "stop":
                return True
            if msg == "snapshot":
                conn.send(dict(learner.state_dict().items()))
        return False

    def replay_size() -> int:
        replay.size = int(head[_H_SIZE])
        return int(replay.size)

    def update() -> None:
        nonlocal updates
        loss = float(learner.update(replay.sample(bs, learner.device)))
        updates += 1
        head[_H_UPDATES] = updates
        stats[_F_LAST_LOSS] = loss
        stats[_F_LOSS_SUM] += loss
        stats[_F_LOSS_N] += 1
        if updates % every == 0:
            # Double buffer: write the slot the reader is not on, then bump the version.
            version = int(head[_H_VERSION]) + 1
            slot = weights[version % 2]
            off = 0
            for v in learner.online.state_dict().values():
                n = v.numel()
                slot[off : off + n] = v.detach().reshape(-1).cpu().numpy()
                off += n
            head[_H_VERSION] = version

    run_paced(
        pacer, stopped=stopped, fed=lambda: int(head[_H_FED]), replay_size=replay_size, update=update, sleep=time.sleep
    )


class ProcessLearner:
    """The learner process's handle on the loop side (the module docstring says how it works).

    A sample may rarely read a row the loop is overwriting after the ring wrapped (no cross-process
    lock on the hot path); one torn transition in a 128-row minibatch is noise to SGD.
    """

    def __init__(
        self,
        core: Any,
        replay: Any,
        *,
        cfg: Any,
        pacer: UpdatePacer,
        batch_size: int,
        weight_sync_every: int,
        publish: Callable[[Any], Any],
        prepare: Callable[[dict[str, torch.Tensor]], Any],
        device: torch.device | str = "cpu",
        nice: int = LEARNER_NICE,
    ) -> None:
        self.core = core
        self.replay = replay
        self.publish = publish
        self.prepare = prepare
        self.error: BaseException | None = None
        self._template = {k: v.detach().cpu().clone() for k, v in core.online.state_dict().items()}
        n_params = _flat_size(self._template)
        specs: dict[str, tuple[tuple[int, ...], str]] = {
            f: ((replay.capacity, *getattr(replay, f).shape[1:]), str(getattr(replay, f).dtype)) for f in _REPLAY_FIELDS
        }
        specs.update({"head": ((8,), "int64"), "stats": ((4,), "float64"), "weights": ((2, n_params), "float32")})
        self._specs = specs
        self._shm = _Shm(specs)
        for f in _REPLAY_FIELDS:  # the loop's ReplayBuffer now writes straight into shared memory
            setattr(replay, f, self._shm.arrays[f])
        self._head = self._shm.arrays["head"]
        self._stats = self._shm.arrays["stats"]
        self._boot = {
            "capacity": replay.capacity,
            "obs_dim": replay.obs_dim,
            "n_actions": replay.n_actions,
            "seed": int(getattr(cfg, "seed", 0)),
            "cfg": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "device": str(device),
            "pacer": {"ratio": pacer.ratio, "learning_starts": pacer.learning_starts},
            "batch_size": batch_size,
            "weight_sync_every": weight_sync_every,
            "nice": nice,
        }
        self.base_updates = int(core.updates)
        self.fed = 0
        self._seen_version = 0
        self._last: dict[str, Any] | None = None
        """The last state the process sent (what a snapshot returns once it has died)."""
        self._loss_n_seen = 0.0
        self._loss_sum_seen = 0.0
        self._proc: Any = None
        self._conn: Any = None
        self._poll: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    # --- loop side ----------------------------------------------------------------------------------
    def add_transitions(self, batch: TransitionBatch) -> None:
        self.replay.add_batch(batch)
        self.fed += batch.obs.shape[0]
        head = self._head
        head[_H_SIZE] = self.replay.size
        head[_H_FED] = self.fed

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        import multiprocessing

        if self._proc is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        parent, child = ctx.Pipe()
        boot = dict(self._boot, learner={k: v for k, v in self.core.state_dict().items()})
        self._proc = ctx.Process(target=_process_main, args=(child, self._shm.names, self._specs, boot), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self._poll = self._loop.call_later(WEIGHT_POLL_S, self._poll_weights)

    def _poll_weights(self) -> None:
        version = int(self._head[_H_VERSION])
        if version != self._seen_version:
            flat = self._shm.arrays["weights"][version % 2].copy()
            if int(self._head[_H_VERSION]) - version < 2:  # not overwritten while we copied
                sd: dict[str, torch.Tensor] = {}
                off = 0
                for k, v in self._template.items():
                    n = v.numel()
                    sd[k] = torch.from_numpy(flat[off : off + n].reshape(v.shape))
                    off += n
                self.publish(self.prepare(sd))
                self._seen_version = version
        dead = self._proc is not None and not self._proc.is_alive() and self.error is None
        # Never wait on the loop: a checkpoint's snapshot() may hold the pipe; then try the next poll.
        if dead and self._lock.acquire(blocking=False):
            try:
                if self.error is None:
                    self.error = RuntimeError(self._exit_reason())
            finally:
                self._lock.release()
        if self._loop is not None and self._proc is not None:
            self._poll = self._loop.call_later(WEIGHT_POLL_S, self._poll_weights)

    def _exit_reason(self) -> str:
        """Why the learner process ended: the one line it sent before exiting, else its exit code
        (e.g. -9: killed, by the OOM killer or an operator)."""
        conn = self._conn
        with contextlib.suppress(Exception):
            while conn is not None and conn.poll(0):
                msg = conn.recv()
                if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "error":
                    return f"learner process failed: {msg[1]}"
        assert self._proc is not None
        return f"learner process exited with code {self._proc.exitcode}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._proc is not None:
            with contextlib.suppress(Exception):  # keep the final state for the last checkpoint
                self.snapshot()
            self._head[_H_STOP] = 1
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Release the shared memory (after stop; the replay arrays become private copies again)."""
        for f in _REPLAY_FIELDS:
            setattr(self.replay, f, np.array(self._shm.arrays[f]))
        self._head = np.zeros(8, np.int64)
        self._stats = np.zeros(4, np.float64)
        self._shm.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def updates(self) -> int:
        return int(self._head[_H_UPDATES])

    @property
    def total_updates(self) -> int:
        return self.base_updates + self.updates

    @property
    def last_loss(self) -> float:
        return float(self._stats[_F_LAST_LOSS]) if self.updates else float("nan")

    def take_mean_loss(self) -> float:
        s, n = float(self._stats[_F_LOSS_SUM]), float(self._stats[_F_LOSS_N])
        ds, dn = s - self._loss_sum_seen, n - self._loss_n_seen
        self._loss_sum_seen, self._loss_n_seen = s, n
        return ds / dn if dn > 0 else float("nan")

    def snapshot(self) -> dict[str, Any]:
        """The learner process's state (call off the loop: it waits for the reply)."""
        with self._lock:
            if self._conn is None or not self.running:
                return copy.deepcopy(self._last_snapshot_or_core())
            try:
                self._conn.send("snapshot")
                state = self._conn.recv()
            except (EOFError, OSError):  # died while answering: the last state it sent is what there is
                state = ("error", f"exited with code {self._proc.exitcode if self._proc is not None else '?'}")
            if not isinstance(state, dict):  # ("error", line): the process failed meanwhile
                if self.error is None:
                    self.error = RuntimeError(f"learner process failed: {state[1]}")
                return copy.deepcopy(self._last_snapshot_or_core())
            self._last = state
            return dict(state)

    def _last_snapshot_or_core(self) -> dict[str, Any]:
        return self._last if self._last is not None else self.core.state_dict()
