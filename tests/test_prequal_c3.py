"""Prequal (HCL) and C3 on real ClusterViews, and in the simulator against `random`."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from lbproxy.observe import MAX_BACKENDS, NUM_CLASSES, ClusterView
from lbproxy.policies import C3, HEURISTICS, NoBackendAvailable, Prequal, make_policy
from lbproxy.policies.prequal import POOL_SIZE, Q_RIF
from lbproxy.sim import Simulator, load_scenario

NAMES = ("prequal", "c3")


def busy_view(rng: random.Random, n: int) -> ClusterView:
    """A view with arbitrary in-flight counts, per-class latencies and service times."""
    view = ClusterView.create(n)
    for i in range(n):
        view.in_flight[i] = rng.randint(0, 8)
        view.service_time_s[i] = rng.choice((0.002, 0.01, 0.05))
        for c in range(NUM_CLASSES):
            view.class_latency_s[c][i] = rng.choice((0.001, 0.01, 0.03, 0.2))
    view.total_in_flight = sum(view.in_flight)
    return view


def eject_some(view: ClusterView, rng: random.Random) -> None:
    """Mark a random subset unavailable, keeping at least one candidate."""
    for i in rng.sample(range(view.n), rng.randrange(view.n)):
        view.set_available(i, False)


# --- properties both have ----------------------------------------------------------------------------
def test_registered_after_sed() -> None:
    assert HEURISTICS[HEURISTICS.index("sed") + 1 :] == NAMES
    assert isinstance(make_policy("prequal"), Prequal) and isinstance(make_policy("c3"), C3)


@pytest.mark.parametrize("name", NAMES)
def test_only_candidates_are_chosen(name: str) -> None:
    rng = random.Random(3)
    policy = make_policy(name, seed=1)
    for _ in range(300):
        view = busy_view(rng, rng.randint(1, MAX_BACKENDS))
        eject_some(view, rng)
        for _ in range(5):
            choice = policy.choose(rng.randrange(NUM_CLASSES), view, 10.0)
            assert choice in view.candidates
            view.on_dispatch(choice)


@pytest.mark.parametrize("name", NAMES)
def test_no_candidates_raise(name: str) -> None:
    view = ClusterView.create(2)
    view.set_available(0, False)
    view.set_available(1, False)
    with pytest.raises(NoBackendAvailable):
        make_policy(name).choose(0, view, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_choices(name: str) -> None:
    def run(seed: int) -> list[int]:
        rng = random.Random(5)  # the same states for every run; only the policy's seed varies
        view = ClusterView.create(8)  # every estimate at its default: ties everywhere
        policy = make_policy(name, seed=seed)
        out = []
        for step in range(300):
            if step % 10 == 0:
                view.in_flight[:] = [rng.randint(0, 1) for _ in range(8)]
            out.append(policy.choose(0, view, 1.0))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- Prequal -------------------------------------------------------------------------------------------
def test_prequal_quantile_is_numpys() -> None:
    """On random views, the choice is a cold candidate (RIF <= NumPy's Q_RIF quantile of all
    candidates' RIF) with the lowest latency of its class, then the lowest RIF."""
    rng = random.Random(11)
    policy = Prequal(seed=2)
    for _ in range(1000):
        view = busy_view(rng, rng.randint(2, POOL_SIZE))
        eject_some(view, rng)
        c = rng.randrange(NUM_CLASSES)
        choice = policy.choose(c, view, 0.0)
        rifs = [view.in_flight[i] for i in view.candidates]
        cold = [i for i in view.candidates if view.in_flight[i] <= np.quantile(rifs, Q_RIF)]
        lat = view.class_latency_s[c]
        best = min((lat[i], view.in_flight[i]) for i in cold)
        assert choice in cold and (lat[choice], view.in_flight[choice]) == best


def test_prequal_hot_fastest_backend_loses_to_a_cold_one() -> None:
    view = ClusterView.create(4)
    view.in_flight[:] = [5, 1, 1, 2]  # sorted 1,1,2,5: the 0.84 quantile is 2, so only backend 0 is hot
    view.class_latency_s[0][:] = [0.001, 0.05, 0.03, 0.02]  # ... and it is 20x faster than the rest
    assert {Prequal(seed=s).choose(0, view, 0.0) for s in range(20)} == {3}  # fastest of the cold ones
    view.in_flight[0] = 2  # no longer above the quantile: cold, and the fastest
    assert Prequal().choose(0, view, 0.0) == 0


def test_prequal_ranks_by_the_request_class() -> None:
    view = ClusterView.create(3)
    view.class_latency_s[0][:] = [0.01, 0.02, 0.03]
    view.class_latency_s[1][:] = [0.3, 0.2, 0.1]
    assert Prequal().choose(0, view, 0.0) == 0
    assert Prequal().choose(1, view, 0.0) == 2


def test_prequal_cold_start_is_least_rif_with_random_ties() -> None:
    view = ClusterView.create(4)  # no completion yet: every latency is the default
    view.in_flight[:] = [1, 0, 2, 0]
    policy = Prequal(seed=3)
    counts = Counter(policy.choose(0, view, 0.0) for _ in range(2000))
    assert set(counts) == {1, 3} and counts[1] == pytest.approx(1000, abs=120)


def twin_pool(rng: random.Random, cands: list[int], size: int) -> list[int]:
    """The documented pool draw (`size` consecutive candidates from a uniform start), on a twin generator."""
    start = int(rng.random() * len(cands))
    return [cands[(start + j) % len(cands)] for j in range(size)]


def test_prequal_all_hot_pool_takes_the_lowest_rif() -> None:
    """With a pool smaller than the hot set (a 2-probe pool here) every pooled backend can be hot;
    then the lowest RIF wins, however fast the others are."""
    n = 16
    view = ClusterView.create(n)
    view.in_flight[:] = list(range(n))  # quantile index floor(15 * 0.84) = 12: backends 13, 14, 15 are hot
    view.class_latency_s[0][:] = [0.1 - 0.005 * i for i in range(n)]  # the more loaded, the faster
    hot = {13, 14, 15}
    policy = Prequal(seed=4, pool_size=2)
    twin = random.Random(4)
    all_hot = 0
    for _ in range(3000):
        pool = twin_pool(twin, view.candidates, 2)
        choice = policy.choose(0, view, 0.0)
        if set(pool) <= hot:
            all_hot += 1
            assert choice == min(pool)  # lowest RIF, although it is the slower of the two
        else:
            assert choice == max(i for i in pool if i not in hot)  # the fastest cold one
    assert all_hot > 200  # pools (13, 14) and (14, 15): 2 of 16 starts, ~375 expected


def test_prequal_ranks_a_drawn_pool_beyond_pool_size_candidates() -> None:
    n = MAX_BACKENDS
    if n <= POOL_SIZE:
        pytest.skip("a pool can only be drawn from more than POOL_SIZE backends")
    view = ClusterView.create(n)
    view.set_available(5, False)  # candidates [0..4, 6..]: the pool is drawn from them, not from slots
    view.class_latency_s[0][:] = [0.001 * (i + 1) for i in range(n)]  # all cold; the lower, the faster
    policy = Prequal(seed=6)
    twin = random.Random(6)
    for _ in range(2000):
        pool = twin_pool(twin, view.candidates, POOL_SIZE)
        assert policy.choose(0, view, 0.0) == min(pool)  # the fastest of the pool


# --- C3 ------------------------------------------------------------------------------------------------
def c3_view(response_1: float) -> ClusterView:
    """Backend 0 fast (service 1/128 s) with 3 requests outstanding, backend 1 8x slower and idle.

    Dyadic values keep the arithmetic exact: Psi_0 = 1/64 - 1/128 + (1 + 3)^3 / 128 = 0.5078125 and
    Psi_1 = response_1 - 1/16 + 1^3 / 16 = response_1.
    """
    view = ClusterView.create(2)
    view.service_time_s[:] = [1 / 128, 1 / 16]
    view.class_latency_s[0][:] = [1 / 64, response_1]
    view.in_flight[:] = [3, 0]
    return view


def test_c3_cubic_queue_term_sends_to_the_slower_idle_backend() -> None:
    view = c3_view(response_1=0.125)
    # Psi_1 = 0.125 < Psi_0 = 0.5078125. A linear queue term would have kept the fast one:
    # 1/64 - 1/128 + 4/128 = 0.0390625 < 0.125.
    assert {C3(seed=s).choose(0, view, 0.0) for s in range(20)} == {1}
    view.in_flight[0] = 0  # idle again: Psi_0 = 1/64 < Psi_1
    assert C3().choose(0, view, 0.0) == 0


def test_c3_psi_is_the_hand_computed_value() -> None:
    """Psi_1 equals response_1, so sweeping it across 0.5078125 finds Psi_0 to the last bit."""
    assert {C3(seed=s).choose(0, c3_view(0.5078125 - 2**-20), 0.0) for s in range(10)} == {1}
    assert {C3(seed=s).choose(0, c3_view(0.5078125 + 2**-20), 0.0) for s in range(10)} == {0}
    tied = C3(seed=1)
    counts = Counter(tied.choose(0, c3_view(0.5078125), 0.0) for _ in range(2000))
    assert counts[0] == pytest.approx(1000, abs=120)  # an exact tie, broken at random


def test_c3_counts_other_clients_outstanding_requests() -> None:
    # n = 2 clients: q_0 = 1 + 3 * 2 = 7, Psi_0 = 1/128 + 343/128 = 2.6875.
    assert C3(clients=2).choose(0, c3_view(2.6875 - 2**-16), 0.0) == 1
    assert C3(clients=2).choose(0, c3_view(2.6875 + 2**-16), 0.0) == 0


# --- in the simulator --------------------------------------------------------------------------------
def test_tail_latency_far_below_random_on_heterogeneous_servers() -> None:
    """Speeds 1:2:4: `random` overloads the slow server; both rules must cut its p99 by well over half."""

    def p99(name: str) -> float:
        sim = Simulator(load_scenario("heterogeneous"), seed=1)
        res = sim.run(make_policy(name, seed=1), 2000)
        assert res.decisions == 2000 and sum(res.load) == 2000
        return res.summary.p99_s

    baseline = p99("random")
    for name in NAMES:
        assert p99(name) < 0.35 * baseline, (name, p99(name), baseline)
