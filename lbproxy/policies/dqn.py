"""The live `dqn` policy: per-iteration inference with exact per-dispatch re-scoring, a decision
deadline, safe exploration, the guardrail's control arm and the reward join for online learning.

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
from lbproxy.guardrail import Guardrail
from lbproxy.observe import (
    MAX_BACKENDS,
    NUM_CLASSES,
    ROW_FEATURES,
    ClusterView,
    DispatchModel,
    Outcome,
    WindowStats,
    action_mask,
    encode_state,
    feature_dim,
    is_accurate,
    learning_width,
    reward,
)
from lbproxy.policies.base import Decision, NoBackendAvailable, Policy
from lbproxy.proxy.batched_metrics import BatchedHistogram
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.network import RowScorer
from lbproxy.rl.online import BackgroundLearner, DecisionRecord, DecisionTable, ProcessLearner
from lbproxy.rl.replay import TransitionBatch
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.telemetry import Metrics

GAUGE_INTERVAL_S = 1.0
"""Learning gauges (ε, loss, updates, replay size) are refreshed this often, not per request."""

FALLBACK_POLICY = "peak_ewma"
"""DESIGN.md §3: a missed deadline or a missing model routes by peak-EWMA P2C (Linkerd's default)."""

CONTROL_ARM = -2
"""Decision id of a request routed by the guardrail's control arm when no decision record is kept
(greedy serving): the outcome tells the guardrail which arm it belongs to. DQN-routed: -1."""

LOOKAHEAD_LEVELS = 4
"""Inline: what-if rows scored per backend at a time. A snapshot's pass scores each backend as it is
(all a lone request needs); the first time a decision of the snapshot finds a dispatched backend's
next score missing, every candidate is scored after 1..4 more dispatches in ONE row pass (the
iteration has several requests: they will need them), and later a backend that runs out gets as many
more as it has (doubling) the same way. Scores are exact whatever the count (observe.DispatchModel);
this only batches them."""

OFF_LOOP_LEVELS = 8
"""Off-loop: an off-loop pass scores every backend after 0..7 more dispatches in one device pass (8
states); a snapshot whose backend would need a ninth is retired and the next decision takes a new
one (a device round trip costs more than re-encoding, so no per-row extension)."""


class EpisodeTracker:
    """Per-episode quality window for live training: the same WindowStats the simulator uses.

    Outcomes are counted in the window open when they complete (live requests straddle episodes).
    """

    def __init__(self, n: int, episode_decisions: int, error_penalty: float) -> None:
        self.episode_decisions = episode_decisions
        self.error_penalty = error_penalty
        self.n = n
        self.window = WindowStats(n, error_penalty)
        self.completed: list[WindowStats] = []
        self.on_episode: Callable[[], None] | None = None

    def record_decision(self, action: int, req_class: int, view: ClusterView) -> None:
        ok = is_accurate(action, view.in_flight, view.class_rate[req_class], view.candidates)
        self.window.record_decision(action, ok)
        if self.window.decisions >= self.episode_decisions:
            self.completed.append(self.window)
            self.window = WindowStats(max(self.n, view.n), self.error_penalty)
            if self.on_episode is not None:
                self.on_episode()

    def record_outcome(self, outcome: Outcome, view: ClusterView) -> None:
        self.window.record_outcome(outcome, view.typical_all_s)


@dataclasses.dataclass(slots=True, eq=False)  # identity: it holds arrays, and lists of snapshots are searched
class _Snapshot:
    """What every request of one class sees during one event-loop iteration (the batch).

    The requests whose handlers run in one loop iteration are decided from one encoded state per
    class. They are not blind to each other: every dispatch (by any class, any arm) advances the
    dispatched backend's score to the one it has with one more request in flight (`levels`), which
    is exactly the score a full forward pass of the state after that dispatch would give it: a
    dispatch changes that one row and nothing the other rows' scores depend on (rl/network.py).
    Without that, every request of an iteration would go to the same backend: worse routing, and
    ~5 % less proxy throughput even for round robin made to do so (measured while building this).

    Inline, the pass runs when the iteration's first request needs it and nobody is suspended.
    Off-loop (CUDA), the snapshot's states go to the device thread and its requests wait for them;
    the dispatches other requests make meanwhile are counted too and applied when the scores land.
    `state` and `mask` are never mutated once built: decision records keep references to them.
    """

    state: np.ndarray
    model: DispatchModel
    mask: np.ndarray
    candidates: list[int]
    """The view's candidates list it was built from: a new list (health event) invalidates it."""
    counts: list[int]
    """Dispatches per slot since the snapshot was encoded."""
    scores: np.ndarray | None = None
    """Each slot's current score (-inf off the mask), once evaluated."""
    levels: list[list[float]] | None = None
    """levels[b][k]: slot b's score after k dispatches since the snapshot."""
    scorer: RowScorer | None = None
    """Inline: the state's pass, to score further what-if rows of one backend."""
    stale: list[int] = dataclasses.field(default_factory=list)
    """Inline: slots dispatched to whose next score is not computed yet (done before the next decision)."""
    looked_ahead: bool = False
    """Inline: every candidate's what-if rows were scored once (`_refresh`)."""
    late: bool = False
    """The pass missed the decision deadline (or failed): the snapshot's requests fall back."""
    exhausted: bool = False
    """Off-loop: a backend went past the dispatches its scores were computed for: take a new snapshot."""
    answered: int = 0
    """Greedy decisions answered from this snapshot's pass (the pass's batch size)."""
    pending: asyncio.Future[np.ndarray | None] | None = None
    """Off-loop: the pass in flight."""


class DqnPolicy:
    """`AsyncPolicy` over an :class:`InferenceEngine`, with safe exploration in train/online mode."""

    name = "dqn"

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        metrics: Metrics | None = None,
        fallback: Policy | None = None,
        width: int = MAX_BACKENDS,
        learner: BackgroundLearner | ProcessLearner | None = None,
        table: DecisionTable | None = None,
        epsilon: Callable[[int], float] | None = None,
        error_penalty: float = 50.0,
        seed: int = 0,
        tracker: EpisodeTracker | None = None,
        bootstrap: bool = True,
        guardrail: Guardrail | None = None,
    ) -> None:
        from lbproxy.policies import make_policy

        self.engine = engine
        self.metrics = metrics
        self.fallback = fallback if fallback is not None else make_policy(FALLBACK_POLICY, seed)
        self.width = width
        """Rows of every encoded state: the replay's width when learning, else room for the pool."""
        self.learner = learner
        self.table = table if table is not None or learner is None else DecisionTable()
        self.epsilon_fn = epsilon
        self.epsilon = epsilon(0) if epsilon is not None else 0.0
        self.error_penalty = error_penalty
        self.bootstrap = bootstrap
        """False with gamma = 0: transitions carry no s' (the learner never reads it)."""
        self.rng = random.Random(seed)
        self.tracker = tracker
        self.guardrail = guardrail
        """The control arm and the switch to the fallback when the DQN is worse (lbproxy/guardrail.py)."""
        self._by_fallback = guardrail.route_by_fallback if guardrail is not None else None
        self.decisions = 0
        self.explored = 0
        self.fallback_counts = {"deadline": 0, "no_model": 0, "unavailable": 0}
        self._next_id = 0
        self._inline = engine.inline
        self._max_batch = engine.max_batch
        """Decisions one pass answers before the next is taken."""
        self._learning = self.epsilon_fn is not None or self.tracker is not None or self.table is not None
        self._mask = np.zeros(width, dtype=bool)
        self._mask_src: list[int] | None = None
        self._mask_len = -1
        self._fb_children: dict[str, Any] = {}
        self._snapshots: list[_Snapshot | None] = [None] * NUM_CLASSES
        self._live: list[_Snapshot] = []
        """Snapshots whose scores this iteration's dispatches move (evaluated, or off-loop in flight)."""
        self._joined: list[list[tuple[DecisionRecord, float]]] = [[] for _ in range(NUM_CLASSES)]
        """Outcomes joined with their decision in this loop iteration (decision record, reward), by class."""
        self._join_armed = False
        self._join_view: ClusterView | None = None
        self._join_now_s = 0.0
        self._clear_armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._no_state = np.zeros(feature_dim(width), dtype=np.float32)
        self._no_mask = np.zeros(width, dtype=bool)
        if metrics is not None:
            for reason in self.fallback_counts:
                self._fb_children[reason] = metrics.fallbacks.labels(reason=reason)

    def describe(self) -> dict[str, object]:
        """The policy's state for the admin JSON (GET /admin/backends)."""
        return {
            "decisions": self.decisions,
            "explored": self.explored,
            "epsilon": self.epsilon,
            "fallbacks": dict(self.fallback_counts),
            "model_version": self.engine.version,
            "guardrail": self.guardrail.describe() if self.guardrail is not None else None,
        }

    def _mask_for(self, view: ClusterView) -> np.ndarray:
        """The action mask, rebuilt only when the pool replaced its candidates list (health events).
        Never mutated once built: queued decisions and table records keep references to it."""
        cands = view.candidates
        if cands is not self._mask_src or self._mask_len != len(cands):
            self._mask = action_mask(view, self.width)
            self._mask_src = cands
            self._mask_len = len(cands)
        return self._mask

    def _snapshot(self, req_class: int, view: ClusterView, now_s: float) -> _Snapshot:
        """A new snapshot for the class (first use in this iteration, new candidates, max_batch
        decisions taken from the last one, or the last one exhausted). All are retired by one
        callback queued behind the iteration's handlers."""
        snap = self._snapshots[req_class]
        if snap is not None:
            self._retire(snap)
        self._arm_clear()
        state = encode_state(view, req_class, now_s, self.width)
        snap = _Snapshot(
            state, DispatchModel(view, req_class, state), self._mask_for(view), view.candidates, [0] * view.n
        )
        self._snapshots[req_class] = snap
        self._live.append(snap)  # counts every dispatch from now on, evaluated or not
        return snap

    def _retire(self, snap: _Snapshot) -> None:
        """Account the snapshot's pass (the batch size is known now) and stop moving its scores."""
        if snap.answered:
            self.engine.record_pass(snap.answered)
            snap.answered = 0
        if snap.pending is None and snap in self._live:
            self._live.remove(snap)

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
        class takes a new snapshot. (Off-loop snapshots still in flight stay live.)"""
        self._clear_armed = False
        for c in range(NUM_CLASSES):
            self._snapshots[c] = None
        keep = []
        for snap in self._live:
            if snap.pending is not None and snap.scores is None and not snap.late:  # off-loop, in flight
                keep.append(snap)
            elif snap.answered:
                self.engine.record_pass(snap.answered)
        self._live = keep

    def _install(self, snap: _Snapshot, levels: list[list[float]]) -> np.ndarray:
        """Start deciding from a pass's scores, moved by the dispatches counted since the snapshot."""
        n = len(levels)
        scores = np.full(n, -np.inf)
        snap.levels = levels
        for b in snap.candidates:
            k = snap.counts[b]
            lev = levels[b]
            if k < len(lev):
                scores[b] = lev[k]
            elif snap.scorer is not None:
                snap.stale.append(b)
            else:
                snap.exhausted = True
                break
        snap.scores = scores
        if snap not in self._live:
            self._live.append(snap)
        if snap.stale:
            self._refresh(snap)
        return scores

    def _refresh(self, snap: _Snapshot) -> None:
        """Inline: score what the stale slots (dispatched to, next score missing) read now, in one row
        pass: the first time for every candidate (LOOKAHEAD_LEVELS further dispatches each), then for
        the stale slots only."""
        levels, scores, scorer = snap.levels, snap.scores, snap.scorer
        assert levels is not None and scores is not None and scorer is not None
        slots = snap.candidates if not snap.looked_ahead else sorted(set(snap.stale))
        snap.looked_ahead = True
        snap.stale.clear()
        counts = snap.counts
        starts = [len(levels[b]) for b in slots]
        # Doubling: a backend that keeps taking dispatches in one iteration gets 4, 8, 16, ... more at a time.
        ends = [
            max(counts[b] + 1, start + max(LOOKAHEAD_LEVELS, start)) for b, start in zip(slots, starts, strict=True)
        ]
        which = np.repeat(np.asarray(slots, dtype=np.intp), np.subtract(ends, starts))
        extra = np.concatenate([np.arange(a, e, dtype=np.float64) for a, e in zip(starts, ends, strict=True)])
        got = self.engine.score(scorer, snap.model.rows_after(which, extra)).tolist()
        k = 0
        for b, a, e in zip(slots, starts, ends, strict=True):
            levels[b].extend(got[k : k + e - a])
            k += e - a
            scores[b] = levels[b][counts[b]]

    def _evaluate(self, snap: _Snapshot) -> np.ndarray | None:
        """The inline pass for a snapshot: every candidate's score now; None (and the snapshot marked
        late) when the pass missed the deadline."""
        model = snap.model
        out = self.engine.inline_pass(model.rows, model.ctx, model.rows[:0])
        if out is None:
            snap.late = True
            return None
        snap.scorer, scores = out
        flat = scores.tolist()
        return self._install(snap, [[flat[b]] for b in range(model.n)])

    def _fall_back(self, reason: str, req_class: int, view: ClusterView, now_s: float) -> int:
        self.fallback_counts[reason] += 1
        child = self._fb_children.get(reason)
        if child is not None:
            child.inc()
        return self.fallback.choose(req_class, view, now_s)

    def decide(self, req_class: int, view: ClusterView, now_s: float) -> Decision | Awaitable[Decision]:
        """(backend, decision id) at once on the inline path, or an awaitable of it when the answer
        comes from an off-loop pass (AsyncPolicy)."""
        by_fallback = self._by_fallback
        if by_fallback is not None and by_fallback(req_class):
            return self._control(req_class, view, now_s)
        snap = self._snapshots[req_class]
        if snap is None or snap.candidates is not view.candidates or snap.answered >= self._max_batch or snap.exhausted:
            if not view.candidates:
                raise NoBackendAvailable("no backend available")
            snap = self._snapshot(req_class, view, now_s)
        eps = self.epsilon
        scores = snap.scores
        if eps > 0.0 and self.rng.random() < eps:
            # Safe exploration: the fallback heuristic's pick (P2C on peak-EWMA: the better of two random
            # backends) is a backend a production balancer would choose too, never a random overloaded
            # one. Learning is off-policy, so these decisions teach the network like its own.
            action = self.fallback.choose(req_class, view, now_s)
            self.explored += 1
        elif scores is not None:  # the iteration's pass has run: the common case under load
            if snap.stale:
                self._refresh(snap)
            action = int(scores.argmax())
            snap.answered += 1
        elif not self.engine.has_model:
            action = self._fall_back("no_model", req_class, view, now_s)
        elif not self._inline:
            return self._decide_off_loop(snap, req_class, view, now_s)
        elif snap.late or (scores := self._evaluate(snap)) is None:
            # The pass was too slow: every request of the snapshot falls back.
            action = self._fall_back("deadline", req_class, view, now_s)
        else:
            action = int(scores.argmax())
            snap.answered += 1
        return self._decided(action, snap, req_class, view, now_s)

    def _control(self, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """The guardrail's control arm (everything but its probe share while it is tripped): the
        fallback heuristic decides. Such decisions still move the live snapshots' scores, and when
        learning they are recorded like any other (learning is off-policy)."""
        if not view.candidates:
            raise NoBackendAvailable("no backend available")
        action = self.fallback.choose(req_class, view, now_s)
        snap = self._snapshots[req_class] if self._learning else None
        if self._learning and (snap is None or snap.candidates is not view.candidates or snap.exhausted):
            snap = self._snapshot(req_class, view, now_s)
        action, did = self._decided(action, snap, req_class, view, now_s, by_fallback=True)
        return action, did if did >= 0 else CONTROL_ARM

    async def _decide_off_loop(self, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """Wait for the snapshot's off-loop pass (the first request of the snapshot submits it), then
        decide as the inline path does."""
        pending = snap.pending
        if pending is None:
            model = snap.model
            cands = np.asarray(snap.candidates)
            states = np.repeat(snap.state[None], OFF_LOOP_LEVELS, axis=0)
            width = self.width
            for k in range(1, OFF_LOOP_LEVELS):
                rows = states[k, : width * ROW_FEATURES].reshape(width, ROW_FEATURES)
                rows[cands] = model.rows_after(cands, np.full(len(cands), float(k)))
            pending = snap.pending = self.engine.submit_q(states)
            # Registered before any request awaits, so it runs first when the pass lands.
            pending.add_done_callback(lambda fut: self._landed(snap, fut))
        await pending
        scores = snap.scores
        if scores is None or snap.late:
            action = self._fall_back("deadline", req_class, view, now_s)
        elif snap.exhausted:
            return await self._resolve(self.decide(req_class, view, now_s))
        else:
            action = int(scores.argmax())
            if action not in view.candidates:
                # The backend went away while the pass ran (ejected/removed): never route to it.
                action = self._fall_back("unavailable", req_class, view, now_s)
            else:
                snap.answered += 1
        return self._decided(action, snap, req_class, view, now_s)

    @staticmethod
    async def _resolve(decision: Decision | Awaitable[Decision]) -> Decision:
        return decision if isinstance(decision, tuple) else await decision

    def _landed(self, snap: _Snapshot, fut: asyncio.Future[np.ndarray | None]) -> None:
        q = None if fut.cancelled() else fut.result()
        if q is None:
            snap.late = True
            if snap in self._live:
                self._live.remove(snap)
            return
        n = snap.model.n
        self._install(snap, [q[:, b].tolist() for b in range(n)])
        self._arm_clear()  # queued behind the snapshot's waiting requests: they all see its scores

    def _decided(
        self,
        action: int,
        snap: _Snapshot | None,
        req_class: int,
        view: ClusterView,
        now_s: float,
        by_fallback: bool = False,
    ) -> Decision:
        """Bookkeeping common to every decision, however it was made: the dispatch it makes moves the
        dispatched backend's score in every live snapshot, exactly."""
        if self._learning and snap is not None:
            decision = self._record(action, snap, req_class, view, now_s, by_fallback)
        else:
            decision = (action, -1)
        for live in self._live:
            counts = live.counts
            if action >= len(counts):
                continue  # a slot added after the snapshot was taken
            k = counts[action] + 1
            counts[action] = k
            levels, scores = live.levels, live.scores
            if levels is None or scores is None or scores[action] == -np.inf:
                continue  # in flight (applied when it lands), or not a candidate of that snapshot
            lev = levels[action]
            if k < len(lev):
                scores[action] = lev[k]
            elif live.scorer is not None:
                live.stale.append(action)  # scored before the snapshot's next decision, if it has one
            else:
                live.exhausted = True
        self.decisions += 1
        return decision

    def _record(
        self, action: int, snap: _Snapshot, req_class: int, view: ClusterView, now_s: float, by_fallback: bool
    ) -> Decision:
        """Train/online bookkeeping: ε schedule, episode tracker, and the decision record for the join."""
        if self.epsilon_fn is not None:
            self.epsilon = self.epsilon_fn(self.decisions + 1)
        if self.tracker is not None:
            self.tracker.record_decision(action, req_class, view)
        table = self.table
        if table is None:
            return action, -1
        decision_id = self._next_id
        self._next_id += 1
        # The state the decision was taken in: the snapshot after the dispatches made since it was encoded.
        state = snap.model.state_after(snap.counts) if any(snap.counts) else snap.state
        table.put(decision_id, DecisionRecord(state, action, snap.mask, req_class, now_s, by_fallback))
        return action, decision_id

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Join the outcome with its decision; the transition enters the replay at the end of the loop
        iteration (`flush_joins`)."""
        if self.tracker is not None:
            self.tracker.record_outcome(outcome, view)
        did = outcome.decision_id
        table = self.table
        rec = table.pop(did) if table is not None and did >= 0 else None
        guard = self.guardrail
        if guard is not None:
            by_fallback = rec.by_fallback if rec is not None else did == CONTROL_ARM
            guard.record(outcome.req_class, by_fallback, outcome.latency_s, outcome.error, now_s)
        if rec is None or self.learner is None:
            return
        self._joined[rec.req_class].append(
            (rec, reward(outcome.latency_s, outcome.error, view.typical_all_s, self.error_penalty))
        )
        self._join_now_s = now_s
        if not self._join_armed:
            self._join_view = view
            self._join_armed = True
            self._soon(self.flush_joins)

    def flush_joins(self) -> None:
        """The outcomes joined in one loop iteration become transitions together, with s' encoded once
        per class from the view as it is now: after the pool applied all of the iteration's
        completions, the state the next decisions start from. (Done per completion, the encoding and
        the replay row cost the loop ~7 µs a request; batched, ~4: benchmarks/results/dqn_proxy.md.)
        Without bootstrapping (gamma = 0) s' is never read and not encoded."""
        self._join_armed = False
        view, learner = self._join_view, self.learner
        if view is None or learner is None:
            return
        for req_class, joined in enumerate(self._joined):
            if joined:
                if self.bootstrap:
                    next_state = encode_state(view, req_class, self._join_now_s, self.width)
                    next_mask = self._mask_for(view)
                else:
                    next_state, next_mask = self._no_state, self._no_mask
                learner.add_transitions(
                    TransitionBatch(
                        np.stack([rec.state for rec, _r in joined]),
                        [rec.action for rec, _r in joined],
                        [r for _rec, r in joined],
                        next_state,
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
    model_arch: dict[str, Any] | None = None
    """QNetwork.arch() of the served model (greedy serving): a CUDA engine swaps only same-shape weights."""
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
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            guard = self.policy.guardrail
            if guard is not None:
                guard.evaluate(loop.time())  # ~1-2 ms per tested class, once a second
            self.update_gauges()
            self.table_expire()
            self.check_learner()

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
            print(
                f"lbproxy: learner stopped ({why}); routing goes on with the last published weights "
                f"(model version {self.engine.version}), learning does not",
                file=sys.stderr,
                flush=True,
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

    def table_expire(self) -> int:
        table = self.policy.table
        if table is None:
            return 0
        return table.expire(asyncio.get_running_loop().time())


def _model_error(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(str(exc) if str(path) in str(exc) else f"cannot load model {str(path)!r}: {exc}")


def load_serving_model(settings: Settings) -> tuple[Any, dict[str, Any], Path]:
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
        net, meta = load_model(path, device="cpu")
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
    learning = is_train or settings.online
    n = view.n if view is not None else max(1, len(settings.backends))
    # Learning: the replay's width (memory grows with it; a backend added at runtime past it is routed
    # by the fallback). Serving only: room for every slot the pool can ever have.
    width = learning_width(n) if learning else MAX_BACKENDS
    obs_dim = feature_dim(width)
    device = resolve_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device auto or --device cpu")
    # `auto`: live inference stays inline on the CPU even beside a GPU (the learner takes the GPU).
    # Whatever the device's speed, the off-loop round trip costs the event loop itself more than the
    # inline NumPy pass does for this model: 4.3 vs 1.5 µs per decision at 256 requests per loop
    # iteration, 16 vs 3 at 8 (benchmarks/results/decision_latency.md). `--device cuda` asks for both.
    infer_device = torch.device("cpu") if settings.device == "auto" else device
    if net is None and not is_train:
        net, _meta, _path = load_serving_model(settings)
    cfg = DqnConfig.from_settings(settings)
    if net is not None:
        cfg = dataclasses.replace(cfg, hidden=net.hidden)
    # Counted locally and flushed with the gauges: a Prometheus observe per pass costs ~1 µs.
    batch_sizes = BatchedHistogram(metrics.batch_size) if metrics is not None else None
    engine = engine_cls(
        width,
        max_batch=settings.max_batch,
        device=infer_device,
        deadline_s=settings.decision_deadline_us * 1e-6,
        on_batch=batch_sizes.observe if batch_sizes is not None else None,
    )
    core = replay = None
    model_arch: dict[str, Any] | None = None
    background: BackgroundLearner | ProcessLearner | None = None
    epsilon: Callable[[int], float] | None = None
    if learning:
        core = Learner(cfg, device=device)
        if learner_state is not None:
            core.load_state_dict(learner_state)
        elif net is not None:
            core.online.load_state_dict(net.state_dict())
            core.target.load_state_dict(net.state_dict())
        replay = ReplayBuffer(settings.buffer_size, obs_dim, width, seed=settings.seed)
        serving_net = QNetwork(cfg.hidden)
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
        model_arch = net.arch()
    guardrail = (
        Guardrail(
            control_share=settings.control_share,
            seed=settings.seed,
            on_switch=metrics.guardrail_switched if metrics is not None else None,
        )
        if settings.control_share > 0.0
        else None
    )
    policy = DqnPolicy(
        engine,
        metrics=metrics,
        width=width,
        learner=background,
        table=DecisionTable() if background is not None else None,
        epsilon=epsilon,
        error_penalty=settings.error_penalty,
        seed=settings.seed,
        tracker=tracker,
        bootstrap=settings.gamma > 0.0,
        guardrail=guardrail,
    )
    return DqnRuntime(
        policy=policy,
        engine=engine,
        learner=background,
        metrics=metrics,
        core=core,
        replay=replay,
        arch={"hidden": cfg.hidden, "width": width},
        batch_sizes=batch_sizes,
        model_arch=model_arch,
    )
