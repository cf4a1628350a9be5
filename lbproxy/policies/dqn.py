"""The live `dqn` policy: a decision per request from the current inference weights, the decision
deadline and its fallback, safe exploration, the guardrail's control arm and the decision record.

Routing never waits on the learner: a decision either comes from the current inference weights
within `decision_deadline_us`, or the request is routed by `peak_ewma` and the fallback counted.
Where the scores come from (one encoded state per class and loop iteration, moved exactly by every
dispatch) is rl/iteration.py; the decision record and its join with the outcome are
rl/reward_join.py, the ε rule rl/action_selection.py, all shared with the simulator agent.
`create_dqn_runtime` (policies/dqn_runtime.py) builds this policy with its engine and learner.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable
from typing import Any

from lbproxy.guardrail import Guardrail
from lbproxy.live_episodes import EpisodeTracker
from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome
from lbproxy.policy import Decision, NoBackendAvailable, Policy, resolve
from lbproxy.rl.action_selection import EpsilonGreedy, best_candidate
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.iteration import LATE, IterationScheduler, Snapshot
from lbproxy.rl.reward_join import RewardJoin
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.telemetry import Metrics

FALLBACK_POLICY = "peak_ewma"
"""DESIGN.md §3: a missed deadline or a missing model routes by peak-EWMA P2C (Linkerd's default)."""

CONTROL_ARM = -2
"""Decision id of a request routed by the guardrail's control arm when no decision record is kept
(greedy serving): the outcome tells the guardrail which arm it belongs to. DQN-routed: -1."""


class DqnPolicy:
    """`AsyncPolicy` over an :class:`InferenceEngine`; in train/online mode also ε-greedy with safe
    exploration, and every decision recorded for the reward join."""

    name = "dqn"

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        metrics: Metrics | None = None,
        fallback: Policy | None = None,
        width: int = MAX_BACKENDS,
        join: RewardJoin | None = None,
        epsilon: EpsilonSchedule | None = None,
        epsilon_step: int = 0,
        seed: int = 0,
        tracker: EpisodeTracker | None = None,
        guardrail: Guardrail | None = None,
    ) -> None:
        from lbproxy.policies import make_policy

        self.engine = engine
        self.metrics = metrics
        self.fallback = fallback if fallback is not None else make_policy(FALLBACK_POLICY, seed)
        self.width = width
        """Rows of every encoded state: the replay's width when learning, else room for the pool."""
        self.iteration = IterationScheduler(engine, width)
        self.join = join
        """The decision records and their join with outcomes (learning only)."""
        self.rng = random.Random(seed)
        self.explorer = EpsilonGreedy(epsilon, self.rng.random, epsilon_step) if epsilon is not None else None
        self.tracker = tracker
        self.guardrail = guardrail
        """The control arm and the switch to the fallback when the DQN is worse (lbproxy/guardrail.py)."""
        self._by_fallback = guardrail.route_by_fallback if guardrail is not None else None
        self.decisions = 0
        self.explored = 0
        self.fallback_counts = {"deadline": 0, "no_model": 0, "unavailable": 0}
        self._next_id = 0
        self._learning = self.explorer is not None or tracker is not None or join is not None
        self._fb_children: dict[str, Any] = {}
        self._flush_armed = False
        self._flush_view: ClusterView | None = None
        self._flush_now_s = 0.0
        if metrics is not None:
            for reason in self.fallback_counts:
                self._fb_children[reason] = metrics.fallbacks.labels(reason=reason)

    @property
    def epsilon(self) -> float:
        return self.explorer.epsilon if self.explorer is not None else 0.0

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
        if not view.candidates:
            raise NoBackendAvailable("no backend available")
        iteration = self.iteration
        snap = iteration.current(req_class, view, now_s)
        explorer = self.explorer
        if explorer is not None and explorer.explores():
            # Safe exploration: the fallback heuristic's pick (P2C on peak-EWMA: the better of two random
            # backends) is a backend a production balancer would choose too, never a random overloaded
            # one. Learning is off-policy, so these decisions teach the network like its own.
            action = self.fallback.choose(req_class, view, now_s)
            self.explored += 1
        elif snap.scores is None and not self.engine.has_model:
            action = self._fall_back("no_model", req_class, view, now_s)
        elif snap.scores is None and not iteration.inline:
            return self._decide_off_loop(snap, req_class, view, now_s)
        elif (action := iteration.greedy(snap)) == LATE:
            # The pass was too slow: every request of the snapshot falls back.
            action = self._fall_back("deadline", req_class, view, now_s)
        return self._decided(action, snap, req_class, view, now_s)

    def _control(self, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """The guardrail's control arm (everything but its probe share while it is tripped): the
        fallback heuristic decides. Such decisions still move the live snapshots' scores, and when
        learning they are recorded like any other (learning is off-policy)."""
        if not view.candidates:
            raise NoBackendAvailable("no backend available")
        action = self.fallback.choose(req_class, view, now_s)
        snap = self.iteration.current(req_class, view, now_s, answering=False) if self._learning else None
        action, did = self._decided(action, snap, req_class, view, now_s, by_fallback=True)
        return action, did if did >= 0 else CONTROL_ARM

    async def _decide_off_loop(self, snap: Snapshot, req_class: int, view: ClusterView, now_s: float) -> Decision:
        """Wait for the snapshot's off-loop pass (the first request of the snapshot submits it), then
        decide as the inline path does."""
        await self.iteration.submit(snap)
        scores = snap.scores
        if scores is None or snap.late:
            action = self._fall_back("deadline", req_class, view, now_s)
        elif snap.exhausted:
            return await resolve(self.decide(req_class, view, now_s))
        else:
            action = best_candidate(scores, snap.candidates)
            if action not in view.candidates:
                # The backend went away while the pass ran (ejected/removed): never route to it.
                action = self._fall_back("unavailable", req_class, view, now_s)
            else:
                snap.answered += 1
        return self._decided(action, snap, req_class, view, now_s)

    def _decided(
        self,
        action: int,
        snap: Snapshot | None,
        req_class: int,
        view: ClusterView,
        now_s: float,
        by_fallback: bool = False,
    ) -> Decision:
        """Bookkeeping common to every decision, however it was made."""
        decision = self._record(action, snap, req_class, view, now_s, by_fallback) if self._learning else (action, -1)
        self.iteration.dispatched(action)
        self.decisions += 1
        return decision

    def _record(
        self, action: int, snap: Snapshot | None, req_class: int, view: ClusterView, now_s: float, by_fallback: bool
    ) -> Decision:
        """Train/online bookkeeping: ε schedule, episode tracker, and the decision record for the join."""
        if self.explorer is not None:
            self.explorer.advance()
        if self.tracker is not None:
            self.tracker.record_decision(action, req_class, view)
        join = self.join
        if join is None or snap is None:
            return action, -1
        decision_id = self._next_id
        self._next_id += 1
        join.record(decision_id, snap.decided_state(), action, req_class, now_s, by_fallback)
        return action, decision_id

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Join the outcome with its decision; the transition enters the replay at the end of the loop
        iteration (`flush_joins`), with s' the state the iteration's completions left."""
        if self.tracker is not None:
            self.tracker.record_outcome(outcome, view)
        did = outcome.decision_id
        join = self.join
        rec = join.join(outcome, view) if join is not None and did >= 0 else None
        guard = self.guardrail
        if guard is not None:
            by_fallback = rec.by_fallback if rec is not None else did == CONTROL_ARM
            guard.record(outcome.req_class, by_fallback, outcome.latency_s, outcome.error, now_s)
        if rec is None:
            return
        self._flush_now_s = now_s
        if not self._flush_armed:
            self._flush_view = view
            self._flush_armed = True
            self.iteration.at_iteration_end(self.flush_joins)

    def flush_joins(self) -> None:
        """The outcomes joined in this loop iteration become transitions together (rl/reward_join.py)."""
        self._flush_armed = False
        view, join = self._flush_view, self.join
        if view is not None and join is not None:
            join.flush(view, self._flush_now_s)
