"""K proxy replicas in the simulator (lbproxy/sim/replicas.py): exact per-replica views, outcomes back to
the replica that decided, and K = 1 identical to the bare policy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lbproxy.observe import ClusterView, Outcome, feature_dim, learning_width
from lbproxy.policies import make_policy
from lbproxy.policy import Policy
from lbproxy.rl.agent import DqnAgent
from lbproxy.rl.learner import DqnConfig, Learner
from lbproxy.rl.replay import ReplayBuffer
from lbproxy.sim import Simulator, load_scenario
from lbproxy.sim.episode import run_episode
from lbproxy.sim.replicas import ReplicaSet, run_replica_episode


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Batch-32 updates gain nothing from intra-op threads; on a loaded 2-core machine two threads made
    the K = 1 test take 30 s instead of ~2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Probe:
    """A replica's policy that routes like `inner` and checks every outcome against its own records."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.records: dict[int, tuple[int, int, ClusterView]] = {}
        self.chosen = 0
        self.observed = 0

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        action = self.inner.choose(req_class, view, now_s)
        self.records[self.chosen] = (action, req_class, view)
        self.chosen += 1
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        action, req_class, chose_with = self.records.pop(outcome.decision_id)
        assert (outcome.backend, outcome.req_class) == (action, req_class)
        assert view is chose_with  # its own view, at the decision and at the outcome
        self.observed += 1
        self.inner.observe(outcome, view, now_s)


class SumCheck:
    """The outermost policy: before every 7th decision, the replica views' in-flight counts add up to
    the engine's view."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas
        self.name = replicas.name
        self.checks = 0
        self._k = 0

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        self._k += 1
        if self._k % 7 == 0:
            views = self.replicas.views
            assert [sum(rv.in_flight[i] for rv in views) for i in range(view.n)] == view.in_flight
            assert sum(rv.total_in_flight for rv in views) == view.total_in_flight
            self.checks += 1
        return self.replicas.choose(req_class, view, now_s)

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        self.replicas.observe(outcome, view, now_s)


@pytest.mark.parametrize("scenario", ["curriculum", "failure"])
def test_replica_views_stay_exact_and_outcomes_reach_the_deciding_replica(scenario: str) -> None:
    sim = Simulator(load_scenario(scenario), seed=3)
    probes = [Probe(make_policy(name, seed=j)) for j, name in enumerate(["least_conn", "peak_ewma", "p2c"])]
    replicas = ReplicaSet(probes, sim.view)
    check = SumCheck(replicas)
    sim.run(check, 3001)
    assert check.checks == 3001 // 7
    assert [p.chosen for p in probes] == [1001, 1000, 1000]  # round robin over arrivals
    assert [p.observed for p in probes] == [p.chosen for p in probes]
    assert all(not p.records for p in probes)
    for rv in replicas.views:
        assert rv.in_flight == [0] * rv.n and rv.total_in_flight == 0
        assert 0 < sum(rv.samples) <= 1001  # latency estimates from its own completions only


def test_replica_outcomes_keep_queue_and_service_time() -> None:
    """The replica's view learns from the outcome the engine reported (queued_behind, service time)."""
    sim = Simulator(load_scenario("heterogeneous"), seed=1)
    replicas = ReplicaSet([make_policy("least_conn")], sim.view)
    sim.run(replicas, 500)
    (rv,) = replicas.views
    assert rv.concurrency == sim.view.concurrency
    assert rv.class_service_s == sim.view.class_service_s


def _agent(seed: int) -> DqnAgent:
    width = learning_width(4)
    cfg = DqnConfig(batch_size=16, buffer_size=2000, learning_starts=128, hidden=16, seed=seed)
    learner = Learner(cfg)
    replay = ReplayBuffer(cfg.buffer_size, feature_dim(width), width, seed=seed)
    return DqnAgent(learner, replay, cfg, total_decisions=512, seed=seed, width=width)


class Recorder:
    def __init__(self, inner: Policy, log: list[int]) -> None:
        self.inner, self.log, self.name = inner, log, inner.name

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        action = self.inner.choose(req_class, view, now_s)
        self.log.append(action)
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        self.inner.observe(outcome, view, now_s)


def test_one_replica_decides_and_learns_exactly_as_the_bare_policy() -> None:
    scenario = load_scenario("curriculum")
    bare, wrapped = _agent(5), _agent(5)
    bare_log: list[int] = []
    wrapped_log: list[int] = []
    for ep in range(2):
        a, _ = run_episode(lambda _s: Recorder(bare, bare_log), scenario, 40 + ep, 1, 256, first_id=bare.decisions)
        b, _ = run_replica_episode(
            lambda _s: [Recorder(wrapped, wrapped_log)], scenario, 40 + ep, 1, 256, first_ids=[wrapped.decisions]
        )
        assert (a.p99_s, a.mean_reward) == (b.p99_s, b.mean_reward)
    assert len(bare_log) == 512 and bare_log == wrapped_log
    assert bare.learner.updates == wrapped.learner.updates > 0 and bare.dropped == wrapped.dropped == 0
    for x, y in zip(bare.learner.online.parameters(), wrapped.learner.online.parameters(), strict=True):
        assert torch.equal(x, y)


def test_replicas_can_share_one_learner() -> None:
    """K agents over one Learner and ReplayBuffer (benchmarks/replicas.py's shared case): every
    replica's transitions land in the one replay, none is dropped, the one learner runs the updates."""
    scenario = load_scenario("curriculum")
    width = learning_width(4)
    cfg = DqnConfig(batch_size=16, buffer_size=4000, learning_starts=128, hidden=16)
    learner = Learner(cfg)
    replay = ReplayBuffer(cfg.buffer_size, feature_dim(width), width)
    agents = [DqnAgent(learner, replay, cfg, total_decisions=512, seed=j, width=width) for j in range(4)]
    run_replica_episode(lambda _s: agents, scenario, 9, 0, 1024, first_ids=[a.decisions for a in agents])
    assert [a.decisions for a in agents] == [256] * 4
    assert sum(a.transitions for a in agents) == len(replay) == 1024
    assert all(a.dropped == 0 for a in agents)
    assert learner.updates == sum(a.pacer.consumed for a in agents) > 0
    assert np.isfinite(agents[0].last_loss)
