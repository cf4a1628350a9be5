"""The live `dqn` policy: batched inference with a decision deadline, the reward join, online learning.

`create_dqn_runtime(settings, view, metrics)` builds everything the proxy needs (serve.py calls it;
live_train.py builds one in train mode): the policy (an `AsyncPolicy`), the inference engine, and in
train/online mode the replay buffer, learner and background learner thread. Its `lifespan(app)`
goes into aiohttp's `cleanup_ctx` so the learner starts and stops with the app.

Routing never waits on the learner: a decision either comes from the current inference weights
within `decision_deadline_us`, or the request is routed by `peak_ewma` and the fallback counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import (
    MAX_BACKENDS,
    NUM_CLASSES,
    ClusterView,
    Outcome,
    WindowStats,
    action_mask,
    dispatch_states,
    encode_state,
    feature_dim,
    is_accurate,
    reward,
)
from lbproxy.policies.base import Decision, NoBackendAvailable, Policy
from lbproxy.proxy.batched_metrics import BatchedHistogram
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.online import BackgroundLearner, DecisionRecord, DecisionTable, ProcessLearner
from lbproxy.rl.replay import TransitionBatch
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.telemetry import Metrics

GAUGE_INTERVAL_S = 1.0
"""Learning gauges (ε, loss, updates, replay size) are refreshed this often, not per request."""

FALLBACK_POLICY = "peak_ewma"
"""DESIGN.md §3: a missed deadline or a missing model routes by peak-EWMA P2C (Linkerd's default)."""


class EpisodeTracker:
    """Per-episode quality window for live training: the same WindowStats the simulator uses.

    Outcomes are counted in the window open when they complete (live requests straddle episodes).
    """

    def __init__(self, n: int, episode_decisions: int, latency_scale_s: float, error_penalty: float) -> None:
        self.episode_decisions = episode_decisions
        self.latency_scale_s = latency_scale_s
        self.error_penalty = error_penalty
        self.n = n
        self.window = WindowStats(n, latency_scale_s, error_penalty)
        self.completed: list[WindowStats] = []
        self.on_episode: Callable[[], None] | None = None

    def record_decision(self, action: int, view: ClusterView) -> None:
        self.window.record_decision(action, is_accurate(action, view.in_flight, view.rate, view.candidates))
        if self.window.decisions >= self.episode_decisions:
            self.completed.append(self.window)
            self.window = WindowStats(max(self.n, view.n), self.latency_scale_s, self.error_penalty)
            if self.on_episode is not None:
                self.on_episode()

    def record_outcome(self, outcome: Outcome) -> None:
        self.window.record_outcome(outcome)


DISPATCH_EFFECT_TTL_S = 0.05
"""A measured dispatch effect (below) is reused by later loop iterations of the same request class for
this long, then measured again (also at once on new weights or a new candidate set). A ReLU network
is piecewise linear, so the effect only changes when the operating point crosses into another linear
region; 50 ms is ~50 iterations at saturation, and measuring costs one pass of k+1 rows instead of 1."""


@dataclasses.dataclass(slots=True)
class _DispatchEffect:
    """How one more request dispatched to slot b moves the Q-values: row b of `d` is
    Q(state after that dispatch) - Q(state), measured with `observe.dispatch_states`."""

    d: list[np.ndarray]
    """Row b (as a list: indexing it makes no NumPy view on the per-request path)."""
    version: int
    """The engine's weight version it was measured with."""
    candidates: list[int]
    t_s: float


@dataclasses.dataclass(slots=True, eq=False)  # identity: it holds arrays, and lists of snapshots are searched
class _Snapshot:
    """What every request of one class sees during one event-loop iteration (the batch).

    The requests whose handlers run in one loop iteration are decided from one encoded state per
    class and ONE forward pass. They are not blind to each other: each decision adds the dispatch
    effect of its action to `q`, so the next one is taken on Q-values moved as the network says the
    dispatch moves them: first order in the iteration's dispatches, exact for the first when the
    effect was measured on this state (else it is at most DISPATCH_EFFECT_TTL_S old). Without that,
    every request of an iteration would go to the same backend: worse routing, and ~5 % less proxy
    throughput even for round robin made to do so (measured while building this).

    Inline, the pass runs when the iteration's first request needs it and nobody is suspended.
    Off-loop (CUDA), the snapshot's rows go to the device thread and its requests wait for them; the
    dispatches other requests make meanwhile are counted in `since` and applied when the Q-values
    land, so passes in flight do not herd either.
    `state` and `mask` are never mutated once built: decision records keep references to them.
    """

    state: np.ndarray
    mask: np.ndarray
    mask_add: np.ndarray
    """0 on the mask, -inf off it: Q-values plus this are masked in one addition."""
    candidates: list[int]
    """The view's candidates list it was built from: a new list (health event) invalidates it."""
    q: np.ndarray | None = None
    """Masked Q-values for the next decision (-inf off the mask), once evaluated."""
    d: list[np.ndarray] | None = None
    late: bool = False
    """The pass missed the decision deadline (or failed): the snapshot's requests fall back."""
    answered: int = 0
    """Greedy decisions answered from this snapshot's pass (the pass's batch size)."""
    measure: bool = False
    """This snapshot's pass also re-measures its class's dispatch effect (it has k+1 rows)."""
    t_s: float = 0.0
    version: int = 0
    """The engine's weight version when the pass was asked for (what a re-measured effect is valid for)."""
    pending: asyncio.Future[np.ndarray | None] | None = None
    """Off-loop: the pass in flight."""
    since: list[int] | None = None
    """Off-loop: dispatches per slot made while the pass was in flight."""


class DqnPolicy:
    """`AsyncPolicy` over an :class:`InferenceEngine`, with ε-greedy exploration in train mode."""

    name = "dqn"

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        metrics: Metrics | None = None,
        fallback: Policy | None = None,
        max_backends: int = MAX_BACKENDS,
        learner: BackgroundLearner | ProcessLearner | None = None,
        table: DecisionTable | None = None,
        epsilon: Callable[[int], float] | None = None,
        latency_scale_s: float = 0.1,
        error_penalty: float = 5.0,
        seed: int = 0,
        tracker: EpisodeTracker | None = None,
    ) -> None:
        from lbproxy.policies import make_policy

        self.engine = engine
        self.metrics = metrics
        self.fallback = fallback if fallback is not None else make_policy(FALLBACK_POLICY, seed)
        self.max_backends = max_backends
        self.learner = learner
        self.table = table if table is not None or learner is None else DecisionTable()
        self.epsilon_fn = epsilon
        self.epsilon = epsilon(0) if epsilon is not None else 0.0
        self.latency_scale_s = latency_scale_s
        self.error_penalty = error_penalty
        self.rng = random.Random(seed)
        self.tracker = tracker
        self.decisions = 0
        self.explored = 0
        self.fallback_counts = {"deadline": 0, "no_model": 0, "unavailable": 0}
        self._next_id = 0
        self._mask = np.zeros(max_backends, dtype=bool)
        self._mask_add = np.zeros(max_backends, dtype=np.float32)
        """0 on the mask, -inf off it: Q-values plus this are masked in one addition."""
        self._inline = engine.inline
        self._max_batch = engine.max_batch
        """Inline: decisions one pass answers before the next is taken (bounds the first-order drift)."""
        self._learning = self.epsilon_fn is not None or self.tracker is not None or self.table is not None
        self._mask_src: list[int] | None = None
        self._mask_len = -1
        self._fb_children: dict[str, Any] = {}
        self._snapshots: list[_Snapshot | None] = [None] * NUM_CLASSES
        self._evaluated: list[_Snapshot] = []
        """Snapshots whose Q-values the next decisions move (this iteration's)."""
        self._in_flight: list[_Snapshot] = []
        """Off-loop snapshots whose pass has not landed yet (they count dispatches in `since`)."""
        self._effects: list[_DispatchEffect | None] = [None] * NUM_CLASSES
        self._joined: list[list[tuple[DecisionRecord, float]]] = [[] for _ in range(NUM_CLASSES)]
        """Outcomes joined with their decision in this loop iteration (decision record, reward), by class."""
        self._join_armed = False
        self._join_view: ClusterView | None = None
        self._clear_armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if metrics is not None:
            for reason in self.fallback_counts:
                self._fb_children[reason] = metrics.fallbacks.labels(reason=reason)

    def _mask_for(self, view: ClusterView) -> np.ndarray:
        """The action mask, rebuilt only when the pool replaced its candidates list (health events).
        Never mutated once built: queued decisions and table records keep references to it."""
        cands = view.candidates
        if cands is not self._mask_src or self._mask_len != len(cands):
            self._mask = action_mask(view, self.max_backends)
            self._mask_add = np.where(self._mask, 0.0, -np.inf).astype(np.float32)
            self._mask_src = cands
            self._mask_len = len(cands)
        return self._mask

    def _snapshot(self, req_class: int, view: ClusterView) -> _Snapshot:
        """A new snapshot for the class (first use in this iteration, new candidates, or max_batch
        decisions taken from the last one). All are retired by one callback queued behind the
        iteration's handlers."""
        snap = self._snapshots[req_class]
        if snap is not None:
            self._retire(snap)
        self._arm_clear()
        mask = self._mask_for(view)
        snap = _Snapshot(encode_state(view, req_class, self.max_backends), mask, self._mask_add, view.candidates)
        self._snapshots[req_class] = snap
        return snap

    def _retire(self, snap: _Snapshot) -> None:
        """Account the snapshot's pass (the batch size is known now) and stop moving its Q-values."""
        if snap.answered:
            self.engine.record_pass(snap.answered)
        if snap.q is not None:
            self._evaluated.remove(snap)

    def _soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` after the handlers already queued for this loop iteration (asyncio and uvloop
        run callbacks queued during an iteration in the next one, in order)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(callback)

    def _arm_clear(self) -> None:
        if not self._clear_armed:
            self._soon(self._clear_snapshots)
            self._clear_armed = True

    def _clear_snapshots(self) -> None:
        """End of the iteration: account every evaluated snapshot's pass; the next request of each
        class takes a new snapshot. (Off-loop snapshots still in flight stay in `_in_flight`.)"""
        self._clear_armed = False
        for c in range(NUM_CLASSES):
            self._snapshots[c] = None
        for snap in self._evaluated:
            if snap.answered:
                self.engine.record_pass(snap.answered)
        self._evaluated.clear()

    def _pass_rows(self, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> np.ndarray:
        """What the snapshot's pass evaluates: its state, plus one row per candidate's dispatch
        (`observe.dispatch_states`) when the class's cached dispatch effect is stale."""
        engine = self.engine
        eff = self._effects[req_class]
        snap.measure = not (
            eff is not None
            and eff.version == engine.version
            and eff.candidates is view.candidates
            and now_s - eff.t_s < DISPATCH_EFFECT_TTL_S
        )
        snap.t_s = now_s
        snap.version = engine.version
        return dispatch_states(view, snap.state, self.max_backends) if snap.measure else snap.state

    def _land(self, snap: _Snapshot, req_class: int, q: np.ndarray) -> np.ndarray:
        """Install a pass's Q-values on the snapshot (re-measuring the dispatch effect when its pass
        carried the dispatch rows) and start moving them with each dispatch."""
        if snap.measure:
            d = np.zeros((self.max_backends, self.max_backends), dtype=np.float32)
            d[snap.candidates] = q[1:] - q[0]
            self._effects[req_class] = _DispatchEffect(list(d), snap.version, snap.candidates, snap.t_s)
            q = q[0]
        elif q.ndim == 2:
            q = q[0]
        effect = self._effects[req_class]
        assert effect is not None
        q = q + snap.mask_add
        if snap.since is not None:  # off-loop: what was dispatched while the pass was in flight
            for b, count in enumerate(snap.since):
                if count:
                    q += count * effect.d[b]
        snap.q = q
        snap.d = effect.d
        self._evaluated.append(snap)
        return q

    def _evaluate(self, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> np.ndarray | None:
        """The inline pass for a snapshot, or None (and the snapshot marked late) when the pass
        missed the deadline."""
        q = self.engine.q_now(self._pass_rows(snap, req_class, view, now_s))
        if q is None:
            snap.late = True
            return None
        return self._land(snap, req_class, q)

    def _fall_back(self, reason: str, req_class: int, view: ClusterView, now_s: float) -> int:
        self.fallback_counts[reason] += 1
        child = self._fb_children.get(reason)
        if child is not None:
            child.inc()
        return self.fallback.choose(req_class, view, now_s)

    def decide(self, req_class: int, view: ClusterView, now_s: float) -> Decision | Awaitable[Decision]:
        """(backend, decision id) at once on the inline path, or an awaitable of it when the answer
        comes from an off-loop pass (AsyncPolicy)."""
        snap = self._snapshots[req_class]
        if snap is None or snap.candidates is not view.candidates or snap.answered >= self._max_batch:
            if not view.candidates:
                raise NoBackendAvailable("no backend available")
            snap = self._snapshot(req_class, view)
        eps = self.epsilon
        q = snap.q
        if eps > 0.0 and self.rng.random() < eps:
            action = self.rng.choice(view.candidates)
            self.explored += 1
        elif q is not None:  # the iteration's pass has run: the common case under load
            action = int(q.argmax())
            snap.answered += 1
        elif not self.engine.has_model:
            action = self._fall_back("no_model", req_class, view, now_s)
        elif not self._inline:
            return self._decide_off_loop(snap, req_class, view, now_s)
        elif snap.late or (q := self._evaluate(snap, req_class, view, now_s)) is None:
            # The pass was too slow: every request of the snapshot falls back.
            action = self._fall_back("deadline", req_class, view, now_s)
        else:
            action = int(q.argmax())
            snap.answered += 1
        return self._decided(action, snap, req_class, view, now_s)

    async def _decide_off_loop(self, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """Wait for the snapshot's off-loop pass (the first request of the snapshot submits it), then
        decide as the inline path does."""
        pending = snap.pending
        if pending is None:
            rows = self._pass_rows(snap, req_class, view, now_s)
            pending = snap.pending = self.engine.submit_q(rows if rows.ndim == 2 else rows[None])
            snap.since = [0] * self.max_backends
            self._in_flight.append(snap)
            # Registered before any request awaits, so it runs first when the pass lands.
            pending.add_done_callback(lambda fut: self._landed(snap, req_class, fut))
        await pending
        q = snap.q
        if q is None:
            action = self._fall_back("deadline", req_class, view, now_s)
        else:
            action = int(q.argmax())
            if action not in view.candidates:
                # The backend went away while the pass ran (ejected/removed): never route to it.
                action = self._fall_back("unavailable", req_class, view, now_s)
            else:
                snap.answered += 1
        return self._decided(action, snap, req_class, view, now_s)

    def _landed(self, snap: _Snapshot, req_class: int, fut: asyncio.Future[np.ndarray | None]) -> None:
        self._in_flight.remove(snap)
        q = None if fut.cancelled() else fut.result()
        if q is None:
            snap.late = True
            return
        self._land(snap, req_class, q)
        self._arm_clear()  # queued behind the snapshot's waiting requests: they all see its Q-values

    def _decided(self, action: int, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """Bookkeeping common to every decision, however it was made."""
        for ev in self._evaluated:  # this dispatch moves the Q-values of the iteration's next decisions
            ev.q += ev.d[action]  # type: ignore[index, operator]
        for fl in self._in_flight:  # ... and those of passes in flight, once they land
            fl.since[action] += 1  # type: ignore[index]
        self.decisions += 1
        if self._learning:
            return self._record(action, snap, req_class, view, now_s)
        return action, -1

    def _record(self, action: int, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """Train/online bookkeeping: ε schedule, episode tracker, and the decision record for the join."""
        if self.epsilon_fn is not None:
            self.epsilon = self.epsilon_fn(self.decisions)
        if self.tracker is not None:
            self.tracker.record_decision(action, view)
        table = self.table
        if table is None:
            return action, -1
        decision_id = self._next_id
        self._next_id += 1
        # The state the decision was taken in: the view now (the snapshot's dispatch-moved Q-values
        # stand for it), not the snapshot's.
        state = encode_state(view, req_class, self.max_backends)
        table.put(decision_id, DecisionRecord(state, action, snap.mask, req_class, now_s))
        return action, decision_id

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Join the outcome with its decision; the transition enters the replay at the end of the loop
        iteration (`flush_joins`)."""
        if self.tracker is not None:
            self.tracker.record_outcome(outcome)
        table = self.table
        if table is None or self.learner is None:
            return
        rec = table.pop(outcome.decision_id)
        if rec is None:
            return
        self._joined[rec.req_class].append(
            (rec, reward(outcome.latency_s, outcome.error, self.latency_scale_s, self.error_penalty))
        )
        if not self._join_armed:
            self._join_view = view
            self._join_armed = True
            self._soon(self.flush_joins)

    def flush_joins(self) -> None:
        """The outcomes joined in one loop iteration become transitions together, with s' encoded once
        per class from the view as it is now: after the pool applied all of the iteration's
        completions, the state the next decisions start from. (Done per completion, the encoding and
        the replay row cost the loop ~7 µs a request; batched, ~4: benchmarks/results/dqn_proxy.md.)"""
        self._join_armed = False
        view, learner = self._join_view, self.learner
        if view is None or learner is None:
            return
        next_mask = self._mask_for(view)
        for req_class, joined in enumerate(self._joined):
            if joined:
                learner.add_transitions(
                    TransitionBatch(
                        np.stack([rec.state for rec, _r in joined]),
                        [rec.action for rec, _r in joined],
                        [r for _rec, r in joined],
                        encode_state(view, req_class, self.max_backends),
                        next_mask,
                    )
                )
                joined.clear()


@dataclasses.dataclass
class DqnRuntime:
    """What the proxy holds for the DQN: the policy plus the objects whose lifetime the app owns."""

    policy: DqnPolicy
    engine: InferenceEngine
    learner: BackgroundLearner | ProcessLearner | None = None
    metrics: Metrics | None = None
    core: Any = None  # the rl.learner.Learner (train/online), for checkpoints
    replay: Any = None
    arch: dict[str, Any] | None = None
    batch_sizes: BatchedHistogram | None = None
    _gauge_task: asyncio.Task[None] | None = None
    _reported_updates: int = 0
    _error_reported: bool = False

    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: start the learner thread and the gauge task; stop both at shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        # gc.freeze() after start-up (torch's heap: an ~80 ms full collection wrecked p99) is done once
        # by the process entry point (serve.tune_gc, also called by live_train), not here.
        loop = asyncio.get_running_loop()
        if self.learner is not None:
            self.learner.start(loop)
        self._gauge_task = loop.create_task(self._gauges())

    async def stop(self) -> None:
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
            self._gauge_task = None
        self.policy.flush_joins()  # nothing joined is lost
        if self.learner is not None:
            await asyncio.to_thread(self.learner.stop)
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
        if lrn is not None:
            loss = lrn.take_mean_loss()
            if not math.isnan(loss):
                m.td_loss.set(loss)
            delta = lrn.updates - self._reported_updates
            if delta > 0:
                m.learner_updates.inc(delta)
                self._reported_updates = lrn.updates
            m.replay_size.set(len(lrn.replay))

    async def _gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            self.update_gauges()
            self.table_expire()
            lrn = self.learner
            if lrn is not None and lrn.error is not None and not self._error_reported:
                # Routing goes on with the last published weights; say once why learning stopped.
                print(f"lbproxy: learner stopped: {lrn.error!r}", file=sys.stderr)
                self._error_reported = True

    def table_expire(self) -> int:
        table = self.policy.table
        if table is None:
            return 0
        return table.expire(asyncio.get_running_loop().time())


def _model_error(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(str(exc) if str(path) in str(exc) else f"cannot load model {str(path)!r}: {exc}")


def load_serving_model(settings: Settings, max_backends: int = MAX_BACKENDS) -> tuple[Any, dict[str, Any], Path]:
    """The model to serve: --model, else the shipped default. Missing/mismatched -> ConfigError (one line)."""
    from lbproxy.rl.checkpoint import CheckpointError, default_model_path, load_model

    path = settings.model if settings.model is not None else default_model_path()
    if not path.is_file():
        hint = (
            "pass --model PATH to an existing model"
            if settings.model is not None
            else "train one with `lbproxy --mode train --env sim` or pass --model PATH"
        )
        raise ConfigError(f"model file {str(path)!r} not found; {hint}")
    try:
        net, meta = load_model(
            path, device="cpu", expect_n_actions=max_backends, expect_obs_dim=feature_dim(max_backends)
        )
    except CheckpointError as exc:
        raise _model_error(path, exc) from None
    return net, meta, path


def create_dqn_runtime(
    settings: Settings,
    view: ClusterView | None = None,
    metrics: Metrics | None = None,
    *,
    train: bool | None = None,
    net: Any = None,
    total_decisions: int | None = None,
    learner_state: dict[str, Any] | None = None,
    epsilon_start_step: int = 0,
    tracker: EpisodeTracker | None = None,
    engine_cls: type[InferenceEngine] = InferenceEngine,
) -> DqnRuntime:
    """Build the dqn policy for the proxy.

    serve (default): greedy, weights from `settings.model` (or the shipped default), learning only
    with `--online` (then ε = eps_end, so the agent keeps sampling the alternatives it learns about).
    train (`train=True`, used by live_train): ε schedule over `total_decisions`, learner always on,
    weights from `net` (e.g. --init-model) or a fresh network.
    """
    import torch

    from lbproxy.rl.learner import DqnConfig, Learner, resolve_device
    from lbproxy.rl.network import QNetwork
    from lbproxy.rl.replay import ReplayBuffer

    is_train = settings.mode == "train" if train is None else train
    mb = MAX_BACKENDS
    obs_dim = feature_dim(mb)
    device = resolve_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device auto or --device cpu")
    # `auto`: live inference stays inline on the CPU even beside a GPU (the learner takes the GPU).
    # Whatever the device's speed, the off-loop round trip costs the event loop itself more than the
    # inline NumPy pass does for this model: 4.3 vs 1.5 µs per decision at 256 requests per loop
    # iteration, 16 vs 3 at 8 (benchmarks/results/decision_latency.md). `--device cuda` asks for both.
    infer_device = torch.device("cpu") if settings.device == "auto" else device
    if net is None and not is_train:
        net, _meta, _path = load_serving_model(settings, mb)
    cfg = DqnConfig.from_settings(settings)
    if net is not None:
        cfg = dataclasses.replace(cfg, hidden=net.hidden, dueling=net.dueling)
    # Counted locally and flushed with the gauges: a Prometheus observe per pass costs ~1 µs.
    batch_sizes = BatchedHistogram(metrics.batch_size) if metrics is not None else None
    engine = engine_cls(
        obs_dim,
        mb,
        max_batch=settings.max_batch,
        device=infer_device,
        deadline_s=settings.decision_deadline_us * 1e-6,
        on_batch=batch_sizes.observe if batch_sizes is not None else None,
    )
    learning = is_train or settings.online
    core = replay = None
    background: BackgroundLearner | ProcessLearner | None = None
    epsilon: Callable[[int], float] | None = None
    if learning:
        core = Learner(obs_dim, mb, cfg, device=device)
        if learner_state is not None:
            core.load_state_dict(learner_state)
        elif net is not None:
            core.online.load_state_dict(net.state_dict())
            core.target.load_state_dict(net.state_dict())
        replay = ReplayBuffer(settings.buffer_size, obs_dim, mb, seed=settings.seed)
        serving_net = QNetwork(obs_dim, mb, cfg.hidden, cfg.dueling)
        serving_net.load_state_dict({k: v.detach().cpu() for k, v in core.online.state_dict().items()})
        engine.load_network(serving_net)
        common: dict[str, Any] = {
            "batch_size": settings.batch_size,
            "learning_starts": settings.learning_starts,
            "updates_per_decision": settings.updates_per_decision,
            "weight_sync_every": settings.weight_sync_every,
            "publish": engine.publish,
            "prepare": engine.prepare,
            "device": device,
        }
        if settings.learner_process:
            background = ProcessLearner(core, replay, cfg=cfg, **common)
        else:
            background = BackgroundLearner(core, replay, **common)
        if is_train:
            sched = EpsilonSchedule.for_training(
                settings.eps_start, settings.eps_end, settings.eps_fraction, total_decisions or 0
            )
            epsilon = lambda step: sched.value(step + epsilon_start_step)  # noqa: E731
        else:
            end = settings.eps_end
            epsilon = lambda step: end  # noqa: E731
    else:
        engine.load_network(net)
    policy = DqnPolicy(
        engine,
        metrics=metrics,
        max_backends=mb,
        learner=background,
        table=DecisionTable() if background is not None else None,
        epsilon=epsilon,
        latency_scale_s=settings.latency_scale_s,
        error_penalty=settings.error_penalty,
        seed=settings.seed,
        tracker=tracker,
    )
    return DqnRuntime(
        policy=policy,
        engine=engine,
        learner=background,
        metrics=metrics,
        core=core,
        replay=replay,
        arch={"obs_dim": obs_dim, "n_actions": mb, "hidden": cfg.hidden, "dueling": cfg.dueling},
        batch_sizes=batch_sizes,
    )
