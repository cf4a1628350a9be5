"""The background learner of the live proxy: Double-DQN updates in a worker THREAD.

The dqn policy joins each finished request with its decision (rl/reward_join.py) and hands the
loop iteration's transitions to `add_transitions`: a replay row copy on the event loop, nothing
more. The worker runs the updates the pacer says are owed (rl/update_pacer.py: `updates_per_decision`
per transition, none for the warm-up, a capped debt) and publishes new weights to the inference
engine every `weight_sync_every` updates through ``loop.call_soon_threadsafe``: the loop only ever
swaps a reference. :func:`run_paced` is the loop both learners run; the learner process
(``--learner-process``, rl/learner_process.py) is the same contract with the updates in another
process. The thread is the default: on 2 cores it kept throughput higher and ran more updates per
second (benchmarks/results/dqn_proxy.md); torch releases the GIL in its kernels, so only an update's
Python glue competes with the loop, and the learner thread runs at a lower OS priority so routing
comes first.

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
from collections.abc import Callable
from typing import Any

import torch

from lbproxy.rl.learner import Learner
from lbproxy.rl.replay import ReplayBuffer, TransitionBatch
from lbproxy.rl.update_pacer import UpdatePacer

LEARNER_NICE = 10
"""Niceness of the learner thread (0 = same priority as the event loop; measured in
benchmarks/results/dqn_proxy.md). Routing has priority over learning when both want the CPU."""

IDLE_WAIT_S = 0.002
"""How long the learner sleeps when it has no update owed (polling keeps the hot path free of
cross-thread wake-ups; 2 ms is far below the time between useful updates). Doubled while it stays
idle, up to IDLE_WAIT_MAX_S."""

IDLE_WAIT_MAX_S = 0.05
"""An idle proxy's learner wakes 20 times a second, not 500: on a core that routes traffic (or on
the one a neighbouring proxy pins to), every wake-up is a context switch taken from routing."""


def run_paced(
    pacer: UpdatePacer,
    *,
    stopped: Callable[[], bool],
    fed: Callable[[], int],
    replay_size: Callable[[], int],
    update: Callable[[], None],
    sleep: Callable[[float], Any],
) -> None:
    """The live learners' loop: one update whenever one is owed, else an idle wait that doubles up to
    IDLE_WAIT_MAX_S, until `stopped()`. `fed` is read before `replay_size` (UpdatePacer's contract)."""
    idle_s = IDLE_WAIT_S
    while not stopped():
        if pacer.owed(fed(), replay_size()) > 0:
            idle_s = IDLE_WAIT_S
            update()
            pacer.ran()
            continue
        sleep(idle_s)
        idle_s = min(2 * idle_s, IDLE_WAIT_MAX_S)


class BackgroundLearner:
    """Runs learner updates in a worker thread, paced by `pacer`.

    Threading contract: `add_transitions` and `stop` are called on the event loop thread; everything
    else runs in the worker. `replay.add_batch` and `replay.sample` may overlap (the ReplayBuffer copies
    under its own lock). `snapshot()` holds the update lock so a checkpoint sees a consistent learner.
    """

    def __init__(
        self,
        learner: Learner,
        replay: ReplayBuffer,
        *,
        pacer: UpdatePacer,
        batch_size: int,
        weight_sync_every: int,
        publish: Callable[[Any], Any] | None = None,
        prepare: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        device: torch.device | str = "cpu",
        nice: int = LEARNER_NICE,
    ) -> None:
        self.learner = learner
        self.nice = nice
        self.replay = replay
        self.pacer = pacer
        self.batch_size = batch_size
        self.weight_sync_every = weight_sync_every
        self.publish = publish
        self.prepare = prepare
        self.device = device
        self.fed = 0  # written by the loop thread only
        self.updates = 0
        self.version = 0
        """Weights published so far (the loop's engine counts its own swaps)."""
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
        """Joined outcomes into the replay; each earns updates."""
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

    def take_mean_loss(self) -> float:
        """Mean loss since the last call (NaN if no update); read by the gauge task."""
        n, s = self._loss_n, self._loss_sum
        self._loss_n, self._loss_sum = 0, 0.0
        return s / n if n else float("nan")

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

    # --- worker side ------------------------------------------------------------------------------
    def _run(self) -> None:
        # One intra-op thread: the machine's other core belongs to the event loop.
        torch.set_num_threads(1)
        if self.nice > 0:
            # Linux applies setpriority to one thread when given its TID: the scheduler then runs the
            # learner on what the event loop leaves over instead of splitting a core evenly with it.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        try:
            run_paced(
                self.pacer,
                stopped=self._stop.is_set,
                fed=lambda: self.fed,
                replay_size=lambda: len(self.replay),
                update=self._update,
                sleep=self._stop.wait,
            )
        except BaseException as exc:  # surfaced by the runtime's gauge task; routing goes on
            self.error = exc  # the thread ends here: no more updates, the last published weights stay

    def _update(self) -> None:
        with self._lock:
            batch = self.replay.sample(self.batch_size, self.device)
            loss = float(self.learner.update(batch))
            self.updates += 1
        self.last_loss = loss
        self._loss_sum += loss
        self._loss_n += 1
        if self.updates % self.weight_sync_every == 0:
            self._publish()

    def _publish(self) -> None:
        """Prepare the weights here (off the loop) and hand the loop one object to swap in."""
        if self.publish is None:
            return
        with torch.no_grad():
            sd = {k: v.detach().to("cpu").clone() for k, v in self.learner.online.state_dict().items()}
        weights = self.prepare(sd) if self.prepare is not None else sd
        self.version += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing during shutdown
            loop.call_soon_threadsafe(self.publish, weights)
