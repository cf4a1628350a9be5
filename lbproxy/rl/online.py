"""Online learning inside the live proxy: the delayed reward join and the background learner.

A routed request's decision (state, action, mask) waits in a bounded :class:`DecisionTable` until
its outcome arrives; then it becomes a transition ``(s, a, r, s', mask')`` in the replay buffer,
with ``s'`` read from the view AFTER the pool recorded the completion (DESIGN.md §4): the dqn policy
joins a loop iteration's outcomes together at its end, with ``s'`` the view then, the state the next
decisions start from (policies/dqn.py).

The :class:`BackgroundLearner` runs Double-DQN updates in a worker THREAD, paced by a token bucket
that completed decisions fill (`updates_per_decision` tokens each), and publishes new weights to the
inference engine every `weight_sync_every` updates through ``loop.call_soon_threadsafe``. The event
loop only ever does ``replay.add_batch`` (row copies) and a reference swap; all torch work is in the
thread.
:class:`ProcessLearner` (``--learner-process``) is the same contract with the updates in a separate
process (shared-memory replay and weights). The thread is the default: on 2 cores it kept throughput
higher and ran more updates per second (benchmarks/results/dqn_proxy.md); torch releases the GIL in
its kernels, so only an update's Python glue competes with the loop, and the learner thread runs at
a lower OS priority so routing comes first.

Failure. Either learner dying (an update raising, the process killed or exiting) sets its `error`;
the dqn runtime logs that once, counts it (`lbproxy_learner_failures_total`) and routing goes on
with the last published weights: learning stops, serving does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lbproxy.rl.replay import TransitionBatch

DEFAULT_TABLE_MAX_ENTRIES = 65_536
"""Decisions awaiting an outcome; far above any realistic in-flight count (the connector limits it)."""

DEFAULT_TABLE_TTL_S = 120.0
"""A decision with no outcome after this long is dropped: above the 60 s default total_timeout_s, so
only requests that truly never completed (dropped client, crash) expire."""

MAX_UPDATE_DEBT = 32
"""Updates the learner may owe before the debt is forgiven: after a burst, or while the replay filled
up to `learning_starts`, the learner must not run hundreds of updates back to back on stale data."""

LEARNER_NICE = 10
"""Niceness of the learner thread (0 = same priority as the event loop; measured in
benchmarks/results/dqn_proxy.md). Routing has priority over learning when both want the CPU."""

IDLE_WAIT_S = 0.002
"""How long the learner sleeps when it has no token (polling keeps the hot path free of cross-thread
wake-ups; 2 ms is far below the time between useful updates). Doubled while it stays idle, up to
IDLE_WAIT_MAX_S."""

IDLE_WAIT_MAX_S = 0.05
"""An idle proxy's learner wakes 20 times a second, not 500: on a core that routes traffic (or on
the one a neighbouring proxy pins to), every wake-up is a context switch taken from routing."""


@dataclass(slots=True)
class DecisionRecord:
    state: np.ndarray
    action: int
    mask: np.ndarray
    req_class: int
    t_s: float
    by_fallback: bool = False
    """Routed by the guardrail's control arm (the fallback heuristic), not by the DQN."""


class DecisionTable:
    """Decision id -> record, bounded by a maximum size and a time-to-live.

    Insertion order is decision order, so expiry only ever looks at the oldest entries (a dict keeps
    insertion order): O(1) amortised per insert, no timers.
    """

    def __init__(self, max_entries: int = DEFAULT_TABLE_MAX_ENTRIES, ttl_s: float = DEFAULT_TABLE_TTL_S) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._records: dict[int, DecisionRecord] = {}
        self.expired = 0
        """Records dropped because their TTL passed or the table was full (outcome never joined)."""

    def __len__(self) -> int:
        return len(self._records)

    def put(self, decision_id: int, record: DecisionRecord) -> None:
        records = self._records
        self.expire(record.t_s)
        while len(records) >= self.max_entries:
            del records[next(iter(records))]
            self.expired += 1
        records[decision_id] = record

    def pop(self, decision_id: int) -> DecisionRecord | None:
        return self._records.pop(decision_id, None)

    def expire(self, now_s: float) -> int:
        """Drop records older than the TTL; returns how many went."""
        records = self._records
        limit = now_s - self.ttl_s
        n = 0
        while records:
            key = next(iter(records))
            if records[key].t_s >= limit:
                break
            del records[key]
            n += 1
        self.expired += n
        return n


class _Replay(Protocol):
    def add_batch(self, batch: TransitionBatch) -> None: ...

    def sample(self, batch_size: int, device: torch.device | str = ...) -> Any: ...

    def __len__(self) -> int: ...


class _Learner(Protocol):
    @property
    def online(self) -> torch.nn.Module: ...

    @property
    def updates(self) -> int: ...

    def update(self, batch: Any) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...


class BackgroundLearner:
    """Runs learner updates in a worker thread at `updates_per_decision` x completed decisions.

    Threading contract: `add_transitions` and `stop` are called on the event loop thread; everything
    else runs in the worker. `replay.add_batch` and `replay.sample` may overlap (the ReplayBuffer copies
    under its own lock). `paused()` holds the update lock so a checkpoint sees a consistent learner.
    """

    def __init__(
        self,
        learner: _Learner,
        replay: _Replay,
        *,
        batch_size: int,
        learning_starts: int,
        updates_per_decision: float,
        weight_sync_every: int,
        publish: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        prepare: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        device: torch.device | str = "cpu",
        nice: int = LEARNER_NICE,
    ) -> None:
        self.learner = learner
        self.nice = nice
        self.replay = replay
        self.batch_size = batch_size
        self.learning_starts = max(learning_starts, batch_size)
        self.ratio = updates_per_decision
        self.weight_sync_every = weight_sync_every
        self.publish = publish
        self.prepare = prepare
        self.device = device
        self.fed = 0  # written by the loop thread only
        self.consumed = 0  # written by the worker only
        self.forgiven = 0  # written by the worker only
        self.updates = 0
        self.published = 0
        self.last_loss = float("nan")
        self._loss_sum = 0.0
        self._loss_n = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- loop side --------------------------------------------------------------------------------
    def add_transitions(self, batch: TransitionBatch) -> None:
        """Joined outcomes into the replay; each earns update tokens."""
        self.replay.add_batch(batch)
        self.fed += batch.obs.shape[0]

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lbproxy-learner", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def take_mean_loss(self) -> float:
        """Mean loss since the last call (NaN if no update); read by the gauge task."""
        n, s = self._loss_n, self._loss_sum
        self._loss_n, self._loss_sum = 0, 0.0
        return s / n if n else float("nan")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No update runs while inside (take a checkpoint here, off the loop)."""
        with self._lock:
            yield

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the learner state, consistent (taken between updates). Call off the loop."""
        with self._lock:
            return copy.deepcopy(self.learner.state_dict())

    @property
    def total_updates(self) -> int:
        """Updates of the learner since it was created (resumed runs included)."""
        return int(self.learner.updates)

    def close(self) -> None:
        """Nothing to release (the process variant frees shared memory here)."""

    @property
    def backlog(self) -> int:
        """Updates owed right now (read-only; any thread)."""
        return int(self.fed * self.ratio) - self.consumed - self.forgiven

    # --- worker side ------------------------------------------------------------------------------
    def _owed(self) -> int:
        owed = int(self.fed * self.ratio) - self.consumed - self.forgiven
        if owed > MAX_UPDATE_DEBT:
            self.forgiven += owed - MAX_UPDATE_DEBT
            owed = MAX_UPDATE_DEBT
        return owed

    def _run(self) -> None:
        # One intra-op thread: the machine's other core belongs to the event loop.
        torch.set_num_threads(1)
        if self.nice > 0:
            # Linux applies setpriority to one thread when given its TID: the scheduler then runs the
            # learner on what the event loop leaves over instead of splitting a core evenly with it.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        idle_s = IDLE_WAIT_S
        try:
            while not self._stop.is_set():
                fed = self.fed  # read BEFORE the size check: these decisions all fell in the warm-up
                if len(self.replay) < self.learning_starts:
                    self.forgiven = max(self.forgiven, int(fed * self.ratio) - self.consumed)  # no warm-up debt
                elif self._owed() > 0:
                    idle_s = IDLE_WAIT_S
                    self._update()
                    continue
                self._stop.wait(idle_s)
                idle_s = min(2 * idle_s, IDLE_WAIT_MAX_S)
        except BaseException as exc:  # surfaced by the runtime's gauge task; routing goes on
            self.error = exc  # the thread ends here: no more updates, the last published weights stay

    def _update(self) -> None:
        with self._lock:
            batch = self.replay.sample(self.batch_size, self.device)
            loss = float(self.learner.update(batch))
            self.consumed += 1
            self.updates += 1
        self.last_loss = loss
        self._loss_sum += loss
        self._loss_n += 1
        if self.updates % self.weight_sync_every == 0:
            self.publish_now()

    def publish_now(self) -> None:
        """Prepare the weights here (off the loop) and hand the loop one object to swap in."""
        if self.publish is None:
            return
        with torch.no_grad():
            sd = {k: v.detach().to("cpu").clone() for k, v in self.learner.online.state_dict().items()}
        weights = self.prepare(sd) if self.prepare is not None else sd
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing during shutdown
            loop.call_soon_threadsafe(self.publish, weights)
            self.published += 1


# --- the separate-process variant ---------------------------------------------------------------------
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
    ratio, starts, bs, every = boot["ratio"], boot["learning_starts"], boot["batch_size"], boot["weight_sync_every"]
    consumed = forgiven = 0
    updates = 0
    idle_s = IDLE_WAIT_S
    while not head[_H_STOP]:
        if conn.poll(0):
            msg = conn.recv()
            if msg == "snapshot":
                conn.send({k: v for k, v in learner.state_dict().items()})
                continue
            if msg == "stop":
                break
        fed = int(head[_H_FED])
        replay.size = int(head[_H_SIZE])
        owed = int(fed * ratio) - consumed - forgiven
        if replay.size < starts:
            forgiven = max(forgiven, owed + forgiven)
            owed = 0
        if owed > MAX_UPDATE_DEBT:
            forgiven += owed - MAX_UPDATE_DEBT
            owed = MAX_UPDATE_DEBT
        if owed <= 0:
            time.sleep(idle_s)
            idle_s = min(2 * idle_s, IDLE_WAIT_MAX_S)
            continue
        idle_s = IDLE_WAIT_S
        loss = float(learner.update(replay.sample(bs, learner.device)))
        consumed += 1
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


class ProcessLearner:
    """The background learner in a separate process (`--learner process`): no GIL shared with the
    event loop. The replay lives in shared memory (the loop writes rows, the process samples them),
    weights come back through a double-buffered shared block polled every WEIGHT_POLL_S, and
    checkpoints ask the process for its state over a pipe. Same interface as BackgroundLearner.

    A sample may rarely read a row the loop is overwriting after the ring wrapped (no cross-process
    lock on the hot path); one torn transition in a 128-row minibatch is noise to SGD.
    """

    def __init__(
        self,
        core: Any,
        replay: Any,
        *,
        cfg: Any,
        batch_size: int,
        learning_starts: int,
        updates_per_decision: float,
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
            "ratio": updates_per_decision,
            "learning_starts": max(learning_starts, batch_size),
            "batch_size": batch_size,
            "weight_sync_every": weight_sync_every,
            "nice": nice,
        }
        self.base_updates = int(core.updates)
        self.fed = 0
        self._seen_version = 0
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
        last = getattr(self, "_last", None)
        return last if last is not None else self.core.state_dict()
