"""K proxy replicas in front of one simulated cluster, as one Policy (DESIGN.md §9, "many hosts").

What a replica knows. A real proxy replica sees only the requests it routed itself: its in-flight
counts are its own share of the backends' queues, and its latency, error and service-time estimates
come from its own completions. :class:`ReplicaSet` models exactly that without touching the engine:
it is the one Policy the Simulator drives, and it keeps one `ClusterView` per replica, changed only
through `on_dispatch` / `on_complete` in the same order the engine changes its own (global) view, so
at every decision the replicas' in-flight counts add up to the engine's. What the replicas share is
what the cluster tells every one of them alike: availability and candidates (health checks, outlier
ejection and slow start are the engine's, lbproxy/sim/servers.py). Live, each replica would run its
own passive ejection and see a backend fail a little later or earlier than the others; that
difference is not modelled.

Which replica gets a request: round robin over arrivals, so each replica sees exactly 1/K of the
traffic (the issue's setup), in the engine's arrival order, which is already random (Poisson or
bursty); round robin adds no second source of randomness that more seeds would have to average out,
and keeps each replica's share of the warm-up exact (`run_replica_episode`). A Kubernetes Service
(kube-proxy's default iptables mode) spreads connections, not requests, at random; with many
keep-alive clients that is close to an even split per replica, burstier per replica than round robin.

Decision ids. Each replica numbers its own decisions from 0, as a Simulator numbers its choose calls,
so a policy behind a replica sees the same `outcome.decision_id` contract as behind a Simulator
(DqnAgent's reward join keys on it). The ReplicaSet maps the engine's id back to (replica, its id).

Use it as the outermost policy of ONE `Simulator.run` (as every episode is run): after a run the
engine puts the requests it reported early that are still in service back into its own view ("ghosts",
engine.py), and the replica views do not see them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from lbproxy.observe import ERROR_PENALTY, ClusterView, Outcome, WindowStats, WindowSummary
from lbproxy.policy import Policy
from lbproxy.sim.engine import Simulator
from lbproxy.sim.episode import WARMUP_DECISIONS, WarmupThen
from lbproxy.sim.scenario import Scenario


class ReplicaSet:
    """`policies[j]` routes as replica j with its own view `views[j]`; see the module docstring.

    `view` is the engine's view of the Simulator it runs in (`sim.view`): the replicas take its size,
    capacities and availability. `first_id` is the engine's id of the first decision routed through
    this set (`sim.decisions`; 0 for a fresh Simulator).
    """

    def __init__(self, policies: Sequence[Policy], view: ClusterView, *, first_id: int = 0) -> None:
        if not policies:
            raise ValueError("a ReplicaSet needs at least one replica policy")
        self.policies = tuple(policies)
        self.k = len(self.policies)
        self.name = self.policies[0].name
        views = []
        for _ in self.policies:
            rv = ClusterView.create(view.n, view.capacity)
            rv.available = view.available  # the cluster's health, the same list for every replica
            rv.candidates = view.candidates
            views.append(rv)
        self.views = tuple(views)
        self.decisions = [0] * self.k
        """Decisions each replica made (the next id it gives)."""
        self._turn = 0
        self._next_id = first_id
        self._owner: dict[int, tuple[int, int]] = {}
        """The engine's decision id -> (replica, that replica's own id), for requests in flight."""

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        j = self._turn
        self._turn = j + 1 if j + 1 < self.k else 0
        rv = self.views[j]
        rv.candidates = view.candidates
        action = self.policies[j].choose(req_class, rv, now_s)
        rv.on_dispatch(action)
        own = self.decisions[j]
        self.decisions[j] = own + 1
        self._owner[self._next_id] = (j, own)
        self._next_id += 1
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        j, own = self._owner.pop(outcome.decision_id)
        rv = self.views[j]
        rv.candidates = view.candidates
        rv.on_complete(outcome, now_s)  # first the view, then the policy: it observes s' (engine.py)
        self.policies[j].observe(dataclasses.replace(outcome, decision_id=own), rv, now_s)


def run_replica_episode(
    make_policies: Callable[[Simulator], Sequence[Policy]],
    scenario: Scenario,
    sim_seed: int,
    phase: int,
    decisions: int,
    *,
    first_ids: Sequence[int] | None = None,
    error_penalty: float = ERROR_PENALTY,
) -> tuple[WindowSummary, WindowStats]:
    """`run_episode` (sim/episode.py) with K replicas: a fresh Simulator, the SED-oracle warm-up, then
    `decisions` routed by the replicas' policies, all in one `Simulator.run` through a ReplicaSet.

    Each replica warms up on its own view (SED with true rates and its own in-flight counts) for its
    round-robin share of the WARMUP_DECISIONS, so the hand-over happens at the same arrival as in a
    single-proxy episode; `first_ids[j]` is the id replica j's policy gives its first decision
    (`agent.decisions` for a DqnAgent that learns across episodes; 0 by default). The summary and the
    window pool every replica's post-warm-up requests; each outcome's reward is in the unit of the
    view of the replica that routed it (`typical_all_s`), as that replica's learner computes it.
    """
    sim = Simulator(scenario, sim_seed, phase=phase, error_penalty=error_penalty)
    stats = WindowStats(n=sim.n, error_penalty=error_penalty)
    policies = make_policies(sim)
    k = len(policies)
    ids = [0] * k if first_ids is None else list(first_ids)
    if len(ids) != k:
        raise ValueError(f"first_ids has {len(ids)} entries for {k} replicas")
    warm = [WarmupThen(sim, p, len(range(j, WARMUP_DECISIONS, k)), ids[j], stats) for j, p in enumerate(policies)]
    sim.run(ReplicaSet(warm, sim.view, first_id=sim.decisions), WARMUP_DECISIONS + decisions, record=False)
    return stats.summary(capacity=sim.capacity_rps(), candidates=sim.view.candidates), stats
