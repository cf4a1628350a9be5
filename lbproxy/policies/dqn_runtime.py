"""What the proxy runs for `--policy dqn`: the policy, its inference engine and, in train/online mode,
the replay buffer and background learner, with the lifetime the app gives them.

`create_dqn_runtime(settings, view, metrics)` builds it from its parts (policies/dqn_parts.py; serve.py
calls it; train/live.py builds one in train mode). Its `lifespan` goes into `ProxyServer.lifespans` so
the learner starts and stops with the proxy; a gauge task refreshes the learning gauges, runs the
guardrail's test and reports a dead learner once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbproxy.config import Settings
from lbproxy.guardrail import Guardrail
from lbproxy.live_episodes import EpisodeTracker
from lbproxy.observe import MAX_BACKENDS, ClusterView, learning_width
from lbproxy.policies.dqn import DqnPolicy
from lbproxy.policies.dqn_parts import devices, epsilon_schedule, learner_for, load_serving_model
from lbproxy.proxy.batched_metrics import BatchedHistogram
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.online import BackgroundLearner
from lbproxy.rl.process_learner import ProcessLearner
from lbproxy.rl.reward_join import RewardJoin
from lbproxy.telemetry import Metrics

if TYPE_CHECKING:
    import torch

    from lbproxy.rl.network import QNetwork
    from lbproxy.rl.shared_replay import Attachment

GAUGE_INTERVAL_S = 1.0
"""Learning gauges (ε, loss, updates, replay size) are refreshed this often, not per request."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass
class DqnRuntime:
    """What the proxy holds for the DQN: the policy plus the objects whose lifetime the app owns."""

    policy: DqnPolicy
    engine: InferenceEngine
    learner: BackgroundLearner | ProcessLearner | None = None
    metrics: Metrics | None = None
    batch_sizes: BatchedHistogram | None = None
    model_arch: dict[str, Any] | None = None
    """QNetwork.arch() of the served model (greedy serving): a CUDA engine swaps only same-shape weights."""
    report: Callable[[str], None] = _to_stderr
    """Where a dead learner is reported (live training also writes it to the run's error log)."""
    run_start_step: int | None = None
    """A live-training worker of `--workers N`: the run's ε position at its start; ε then runs on the
    decisions of every worker together (`sync_training`)."""
    _gauge_task: asyncio.Task[None] | None = None
    _reported_updates: int = 0
    _error_reported: bool = False

    async def lifespan(self) -> AsyncIterator[None]:
        """For `ProxyServer.lifespans`: start the learner thread and the gauge task; stop both at shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        # gc.freeze() after start-up (torch's heap: an ~80 ms full collection wrecked p99) is done once
        # by the process entry point (serve.tune_gc, also called by train/live.py), not here.
        loop = asyncio.get_running_loop()
        if self.learner is not None:
            self.learner.start(loop)
        self.sync_training()
        self._gauge_task = loop.create_task(self._gauges())

    async def stop(self) -> None:
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
            self._gauge_task = None
        self.policy.flush_joins()  # nothing joined is lost
        self.sync_training()  # a training worker's last decisions count in the run's
        if self.learner is not None:
            await asyncio.to_thread(self.learner.stop)
            self.check_learner()
        self.update_gauges()
        if self.learner is not None:
            self.learner.close()
        self.engine.close()

    def update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.epsilon.set(self.policy.epsilon)
        if self.batch_sizes is not None:
            self.batch_sizes.flush()
        lrn = self.learner
        if lrn is not None and not (isinstance(lrn, ProcessLearner) and lrn.attached):  # else its process does
            m.weights_version.set(lrn.version)
            loss = lrn.take_mean_loss()
            if not math.isnan(loss):
                m.td_loss.set(loss)
            delta = lrn.updates - self._reported_updates
            if delta > 0:
                m.learner_updates.inc(delta)
                self._reported_updates = lrn.updates
            m.replay_size.set(len(lrn.replay))

    async def _gauges(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            guard = self.policy.guardrail
            if guard is not None:
                guard.evaluate(loop.time())  # ~1-2 ms per tested class, once a second
            self.sync_training()
            self.update_gauges()
            join = self.policy.join
            if join is not None:
                join.table.expire(loop.time())
            self.check_learner()

    def sync_training(self) -> None:
        """A live-training worker of `--workers N` (lbproxy/train/live_workers.py): put the ε schedule at
        the decisions of every worker together, and the episode gauge at the supervisor's count. Once a
        second: between two calls ε runs on this worker's own decisions."""
        lrn, explorer = self.learner, self.policy.explorer
        if self.run_start_step is None or not isinstance(lrn, ProcessLearner) or explorer is None:
            return
        decisions, episode = lrn.count_decisions(self.policy.decisions)
        explorer.restore(self.run_start_step + decisions)
        if self.metrics is not None:
            self.metrics.episode.set(episode)

    def check_learner(self) -> bool:
        """A dead learner (thread or process) is reported once: one line, lbproxy_learner_failures_total.
        Routing goes on with the last published weights (the guardrail still compares them with the
        fallback); nothing else changes. Returns True once a failure was seen."""
        lrn = self.learner
        if lrn is None or lrn.error is None:
            return False
        if not self._error_reported:
            self._error_reported = True
            err = lrn.error
            why = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            self.report(
                f"lbproxy: learner stopped ({why}); routing goes on with the last published weights "
                f"(model version {self.engine.version}), learning does not"
            )
            if self.metrics is not None:
                self.metrics.learner_failures.inc()
        return True

    async def reload_model(self, path: Path) -> dict[str, Any]:
        """POST /admin/model: load `path` off the loop, check it, swap it in for the next decision.
        Any problem raises CheckpointError and leaves the current model serving."""
        from lbproxy.rl.checkpoint import CheckpointError, load_model

        if self.learner is not None:
            raise CheckpointError(f"{path}: not loaded: the learner owns the weights while the proxy learns")
        net, meta = await asyncio.to_thread(load_model, path, "cpu")
        if self.engine.backend == "cuda" and self.model_arch is not None and net.arch() != self.model_arch:
            raise CheckpointError(
                f"{path}: network {net.arch()} differs from the one serving on the GPU ({self.model_arch}); "
                "restart with --model to change its shape"
            )
        weights = await asyncio.to_thread(self.engine.prepare, net.state_dict())
        self.engine.publish(weights)
        self.model_arch = net.arch()
        trained_by = meta.get("trained_by", meta.get("env"))
        trained_by = None if trained_by is None else str(trained_by)[:200]
        return {"model": str(path), "model_version": self.engine.version, "arch": net.arch(), "trained_by": trained_by}


def _guardrail(settings: Settings, metrics: Metrics | None) -> Guardrail | None:
    if settings.control_share <= 0.0:
        return None
    switched = metrics.guardrail_switched if metrics is not None else None
    return Guardrail(control_share=settings.control_share, seed=settings.seed, on_switch=switched)


def _engine(
    engine_cls: type[InferenceEngine],
    settings: Settings,
    width: int,
    device: torch.device,
    metrics: Metrics | None,
) -> tuple[InferenceEngine, BatchedHistogram | None]:
    """The inference engine, and the batch-size histogram it feeds (None without metrics)."""
    # Counted locally and flushed with the gauges: a Prometheus observe per pass costs ~1 µs.
    batch_sizes = BatchedHistogram(metrics.batch_size) if metrics is not None else None
    on_batch = batch_sizes.observe if batch_sizes is not None else None
    engine = engine_cls(
        width,
        max_batch=settings.max_batch,
        device=device,
        deadline_s=settings.decision_deadline_us * 1e-6,
        on_batch=on_batch,
    )
    return engine, batch_sizes


def create_dqn_runtime(
    settings: Settings,
    view: ClusterView | None = None,
    metrics: Metrics | None = None,
    *,
    train: bool | None = None,
    net: QNetwork | None = None,
    total_decisions: int = 0,
    learner_state: dict[str, Any] | None = None,
    epsilon_start_step: int = 0,
    tracker: EpisodeTracker | None = None,
    engine_cls: type[InferenceEngine] = InferenceEngine,
    attach: Attachment | None = None,
) -> DqnRuntime:
    """Build the dqn policy for the proxy. serve (default): greedy, weights from `net`, else
    `settings.model` (or the shipped default), learning only with `--online`. train (`train=True`,
    train/live.py): ε schedule over `total_decisions` from `epsilon_start_step`, weights from
    `learner_state` (--resume), `net` (--init-model) or fresh. `view` sizes a learning state. `attach`:
    a worker of `--workers N --online` feeds the supervisor's learner instead of starting one."""
    is_train = settings.mode == "train" if train is None else train
    learning = is_train or settings.online
    n = view.n if view is not None else max(1, len(settings.backends))
    # Learning: the replay's width (memory grows with it; a backend added at runtime past it is routed
    # by the fallback). Serving only: room for every slot the pool can ever have.
    width = learning_width(n) if learning else MAX_BACKENDS
    device, infer_device = devices(settings)
    if net is None and not is_train:  # --online learns on from the served model
        net = load_serving_model(settings)
    engine, batch_sizes = _engine(engine_cls, settings, width, infer_device, metrics)
    learner = join = schedule = None
    if learning:
        learner = learner_for(settings, engine, width, device, net, learner_state, attach)
        join = RewardJoin(width, settings.error_penalty, bootstrap=settings.gamma > 0.0, sink=learner.add_transitions)
        schedule = epsilon_schedule(settings, total_decisions if is_train else None)
    else:
        assert net is not None
        engine.load_network(net)
    policy = DqnPolicy(
        engine,
        metrics=metrics,
        width=width,
        join=join,
        epsilon=schedule,
        epsilon_step=epsilon_start_step if is_train else 0,
        seed=settings.seed,
        tracker=tracker,
        guardrail=_guardrail(settings, metrics),
    )
    return DqnRuntime(
        policy=policy,
        engine=engine,
        learner=learner,
        metrics=metrics,
        batch_sizes=batch_sizes,
        model_arch=net.arch() if not learning and net is not None else None,
        run_start_step=epsilon_start_step if is_train and attach is not None else None,
    )
