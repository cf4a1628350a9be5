"""One episode, as training, evaluation and the Gymnasium environment all run it: a fresh Simulator,
a warm-up routed by the SED oracle, then the policy under test.

The warm-up (WARMUP_DECISIONS, neither recorded nor learned from) fills the backends' queues and the
view's latency estimates, so an episode does not start from an idle, unmeasured cluster. Warm-up and
episode run in ONE `Simulator.run` (:class:`WarmupThen`), so the view's in-flight counts stay exact at
the hand-over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lbproxy.observe import ERROR_PENALTY, ClusterView, Outcome, WindowStats, WindowSummary, is_accurate
from lbproxy.sim.engine import Simulator
from lbproxy.sim.oracle import SedOracle

WARMUP_DECISIONS = 128
"""Decisions the SED oracle routes before each episode (not recorded, not learned from): enough for
every backend of a 16-slot cluster to complete a few requests, so the latency features are warm and
the queues are at their working level when the policy takes over."""


class WarmupThen:
    """A Policy for one episode's Simulator: the SED oracle routes the first `warmup` decisions (not
    recorded, not learned from), then `policy` routes the rest, which are recorded in `stats`.

    Warm-up and episode run in ONE `Simulator.run`, so the view's in-flight counts stay exact at the
    hand-over (a separate warm-up run would drain its completions from the view but leave their work
    on the servers). Decision ids are shifted so that `policy` sees its own lifetime numbering: each
    episode's Simulator counts from 0, the agent keeps counting across episodes.
    Accuracy (vs the SED oracle with true rates) and Gini use lbproxy.observe, as the simulator does.
    """

    def __init__(self, sim: Any, policy: Any, warmup: int, first_id: int, stats: WindowStats) -> None:
        self.name = policy.name
        self._warm = SedOracle(sim)
        self._policy = policy
        self._warmup = warmup
        self._offset = first_id - warmup
        self._rates = sim.true_rates  # live [class][server] lists
        self._k = 0
        self.stats = stats

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        k = self._k
        self._k = k + 1
        if k < self._warmup:
            return self._warm.choose(req_class, view, now_s)
        action = int(self._policy.choose(req_class, view, now_s))
        ok = is_accurate(action, view.in_flight, self._rates[req_class], view.candidates)
        self.stats.record_decision(action, ok)
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        if outcome.decision_id < self._warmup:
            return
        self.stats.record_outcome(outcome, view.typical_all_s)
        out = Outcome(
            outcome.backend,
            outcome.req_class,
            outcome.latency_s,
            outcome.error,
            outcome.decision_id + self._offset,
            outcome.service_time_s,
        )
        self._policy.observe(out, view, now_s)


def run_episode(
    make_policy: Callable[[Any], Any],
    scenario: Any,
    sim_seed: int,
    phase: int,
    decisions: int,
    *,
    first_id: int = 0,
    error_penalty: float = ERROR_PENALTY,
) -> tuple[WindowSummary, WindowStats]:
    """One episode on a fresh Simulator(scenario, sim_seed): SED-oracle warm-up, then `decisions`
    routed by `make_policy(sim)`. Returns the episode's summary and its raw window (for pooling)."""
    sim = Simulator(scenario, sim_seed, phase=phase, error_penalty=error_penalty)
    stats = WindowStats(n=sim.n, error_penalty=error_penalty)
    sim.run(
        WarmupThen(sim, make_policy(sim), WARMUP_DECISIONS, first_id, stats), WARMUP_DECISIONS + decisions, record=False
    )
    return stats.summary(capacity=sim.capacity_rps(), candidates=sim.view.candidates), stats
