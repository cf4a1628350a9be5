"""The background learner in a separate process: no GIL shared with any event loop.

Same contract as rl/online.py's BackgroundLearner (add_transitions, start, stop, snapshot, error) and
the same paced loop (`run_paced`, rl/update_pacer.py). The replay lives in shared memory
(rl/shared_replay.py: one segment per producer; the loops write rows, the process samples them),
weights come back through a double-buffered shared block polled every WEIGHT_POLL_S, and checkpoints
ask the process for its state over a pipe.

Who starts it (`LearnerHost`): one proxy with `--learner-process` (its ProcessLearner, in
rl/process_learner.py, owns the host; one segment), or the supervisor of `--workers N` with --online or
in live training (lbproxy/workers.py; one segment per worker, each worker's ProcessLearner attached to
its slot). The host's process also writes the learner's
metrics (updates, loss, replay size, weights version) where the supervisor's /metrics reads them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from typing import Any

import numpy as np
import torch

from lbproxy.rl.online import LEARNER_NICE, run_paced
from lbproxy.rl.shared_replay import (
    F_LAST_LOSS,
    F_LOSS_N,
    F_LOSS_SUM,
    H_STOP,
    H_UPDATES,
    H_VERSION,
    S_FED,
    S_SIZE,
    S_VERSION,
    Layout,
    SegmentedReplay,
    Shm,
)
from lbproxy.rl.update_pacer import UpdatePacer

WEIGHT_POLL_S = 0.05
"""How often a loop looks for new weights from the learner process (a version counter read)."""


def _flat(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([v.detach().reshape(-1).cpu().numpy() for v in state_dict.values()])


def _process_main(conn: Any, names: dict[str, str], layout: Layout, boot: dict[str, Any]) -> None:
    """The learner process: samples the shared replay, updates, writes weights to shared memory."""
    from lbproxy.rl.learner import DqnConfig, Learner

    torch.set_num_threads(1)
    with contextlib.suppress(OSError):
        os.nice(int(boot["nice"]))
    shm = Shm(layout.specs(), names)
    replay = SegmentedReplay(shm, layout, seed=boot["seed"] + 1)
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


def _learner_metrics(metrics_dir: str | None) -> Any:
    """The learner's metrics in the workers' PROMETHEUS_MULTIPROC_DIR (None: its host reports them)."""
    if metrics_dir is None:
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import CollectorRegistry, values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # mmap files from here on
    from lbproxy.telemetry import LearnerMetrics

    return LearnerMetrics(CollectorRegistry())


def _learn(conn: Any, shm: Shm, replay: SegmentedReplay, learner: Any, boot: dict[str, Any]) -> None:
    """The learner process's loop: update at the pace the producers' transitions allow, until told to stop."""
    head, slots, stats, weights = (shm.arrays[k] for k in ("head", "slots", "stats", "weights"))
    bs, every = boot["batch_size"], boot["weight_sync_every"]
    p = boot["pacer"]
    pacer = UpdatePacer(p["ratio"], p["learning_starts"], batch_size=bs, capacity=replay.flat.capacity)
    metrics = _learner_metrics(boot["metrics_dir"])
    updates = 0
    published = {"updates": 0, "loss_sum": 0.0}

    def stopped() -> bool:
        """Told to stop (the stop flag or a message); answers a snapshot request meanwhile."""
        if head[H_STOP]:
            return True
        while conn.poll(0):
            msg = conn.recv()
            if msg == "stop":
                return True
            if msg == "snapshot":
                conn.send(dict(learner.state_dict().items()))
        return False

    def update() -> None:
        nonlocal updates
        loss = float(learner.update(replay.sample(bs, learner.device)))
        updates += 1
        head[H_UPDATES] = updates
        stats[F_LAST_LOSS] = loss
        stats[F_LOSS_SUM] += loss
        stats[F_LOSS_N] += 1
        if updates % every == 0:
            # Double buffer: write the slot the readers are not on, then bump the version.
            version = int(head[H_VERSION]) + 1
            weights[version % 2] = _flat(learner.online.state_dict())
            head[H_VERSION] = version
            if metrics is not None:
                n, s = updates - published["updates"], float(stats[F_LOSS_SUM]) - published["loss_sum"]
                metrics.published(n, s / n, replay.flat.size, version)
                published.update(updates=updates, loss_sum=float(stats[F_LOSS_SUM]))

    run_paced(
        pacer,
        stopped=stopped,
        fed=lambda: int(slots[:, S_FED].sum()),
        replay_size=replay.size,
        update=update,
        sleep=time.sleep,
    )


class LearnerHost:
    """Starts the learner process and owns its shared memory (the module docstring says who holds it)."""

    def __init__(
        self,
        core: Any,
        cfg: Any,
        layout: Layout,
        *,
        pacer: UpdatePacer,
        batch_size: int,
        weight_sync_every: int,
        device: torch.device | str = "cpu",
        nice: int = LEARNER_NICE,
        metrics_dir: str | None = None,
    ) -> None:
        self.core = core
        self.layout = layout
        self.shm = Shm(layout.specs())
        self.shm.arrays["weights"][0] = _flat(core.online.state_dict())  # version 0: what every loop starts on
        self.boot = {
            "seed": int(getattr(cfg, "seed", 0)),
            "cfg": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "device": str(device),
            "pacer": {"ratio": pacer.ratio, "learning_starts": pacer.learning_starts},
            "batch_size": batch_size,
            "weight_sync_every": weight_sync_every,
            "nice": nice,
            "metrics_dir": metrics_dir,
        }
        self._last: dict[str, Any] | None = None
        """The last state the process sent (what a snapshot returns once it has died)."""
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()
        self.failed: str | None = None
        """The one line of a process that failed while answering a snapshot."""

    def start(self) -> None:
        import multiprocessing

        if self._proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        parent, child = ctx.Pipe()
        boot = dict(self.boot, learner={k: v for k, v in self.core.state_dict().items()})
        self._proc = ctx.Process(target=_process_main, args=(child, self.shm.names, self.layout, boot), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def failure(self) -> str | None:
        """Why the process ended, once it has (None while it runs, or while a snapshot holds the pipe:
        never wait on a loop). The one line it sent before exiting, else its exit code (-9: killed)."""
        if self._proc is None or self._proc.is_alive() or not self._lock.acquire(blocking=False):
            return None
        try:
            with contextlib.suppress(Exception):
                while self._conn is not None and self._conn.poll(0):
                    msg = self._conn.recv()
                    if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "error":
                        return f"learner process failed: {msg[1]}"
            return f"learner process exited with code {self._proc.exitcode}"
        finally:
            self._lock.release()

    def snapshot(self) -> dict[str, Any]:
        """The learner process's state (call off the loop: it waits for the reply). When the process
        failed meanwhile, `failed` gets its one line and the last state it sent is the answer."""
        with self._lock:
            if self._conn is None or not self.alive:
                return copy.deepcopy(self._last if self._last is not None else self.core.state_dict())
            try:
                self._conn.send("snapshot")
                state = self._conn.recv()
            except (EOFError, OSError):  # died while answering: the last state it sent is what there is
                state = ("error", f"exited with code {self._proc.exitcode}")
            if not isinstance(state, dict):  # ("error", line): the process failed meanwhile
                self.failed = f"learner process failed: {state[1]}"
                return copy.deepcopy(self._last if self._last is not None else self.core.state_dict())
            self._last = state
            return dict(state)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None:
            self.shm.arrays["head"][H_STOP] = 1
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Unlink the shared memory (after stop, and after every loop attached to it let go)."""
        self.shm.close()

    def describe(self) -> dict[str, Any]:
        """For the admin JSON: the process, its updates and weights version, and per slot its fed count
        and the weights version its loop serves."""
        head, slots = self.shm.arrays["head"], self.shm.arrays["slots"]
        return {
            "pid": self.pid,
            "running": self.alive,
            "updates": int(head[H_UPDATES]),
            "weights_version": int(head[H_VERSION]),
            "replay_size": int(slots[:, S_SIZE].sum()),
            "fed_per_slot": [int(x) for x in slots[:, S_FED]],
            "version_per_slot": [int(x) for x in slots[:, S_VERSION]],
        }
