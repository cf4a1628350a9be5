"""Unit tests of the heuristic policies on a real ClusterView (no sockets: policies are pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome, sed_choices
from lbproxy.policies import (
    HEURISTICS,
    AsyncPolicy,
    NoBackendAvailable,
    PeakEwma,
    Policy,
    PowerOfTwoChoices,
    RoundRobin,
    ShortestExpectedDelay,
    make_policy,
)

CAPACITY_CHOICES = (0.5, 1.0, 1.0, 2.0, 4.0)


def random_view(rng: random.Random, n: int | None = None, equal_capacity: bool = False) -> ClusterView:
    """A view with arbitrary (but valid) statistics, as the pool or the simulator could leave it."""
    n = n if n is not None else rng.randint(1, MAX_BACKENDS)
    cap = [1.0] * n if equal_capacity else [rng.choice(CAPACITY_CHOICES) for _ in range(n)]
    view = ClusterView.create(n, capacity=cap)
    scramble(view, rng, now_s=100.0)
    return view


def set_service(view: ClusterView, i: int, seconds: float) -> None:
    """Backend i's service-time estimates, every class (and the rates derived from them)."""
    view.service_time_s[i] = seconds
    for c in range(len(view.class_service_s)):
        view.class_service_s[c][i] = seconds
        view.class_latency_s[c][i] = seconds
        view.class_rate[c][i] = view.concurrency[i] / max(seconds, 1e-6)


def scramble(view: ClusterView, rng: random.Random, now_s: float) -> None:
    """New in-flight counts, latency costs, update times and service times (availability untouched)."""
    for i in range(view.n):
        view.in_flight[i] = rng.randint(0, 6)
        view.latency_cost_s[i] = rng.choice((0.001, 0.01, 0.03, 0.2, 1.5))
        view.last_update_s[i] = now_s - rng.choice((0.0, 0.5, 5.0, 60.0))
        set_service(view, i, rng.choice((0.0, 0.002, 0.01, 0.05)))
    view.total_in_flight = sum(view.in_flight)


def flip_some(view: ClusterView, rng: random.Random) -> None:
    """Eject or restore a random backend, keeping at least one candidate."""
    i = rng.randrange(view.n)
    if view.available[i] and len(view.candidates) == 1:
        return
    view.set_available(i, not view.available[i])


# --- registry ---------------------------------------------------------------------------------------
def test_registry_builds_every_heuristic() -> None:
    assert HEURISTICS == ("round_robin", "random", "least_conn", "p2c", "peak_ewma", "sed", "prequal", "c3")
    for name in HEURISTICS:
        policy = make_policy(name, seed=3)
        assert policy.name == name
        assert isinstance(policy, Policy)
        assert not isinstance(policy, AsyncPolicy)


def test_registry_rejects_unknown_and_dqn() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; choose one of: round_robin, random"):
        make_policy("nope")
    with pytest.raises(ValueError, match=r"lbproxy\.policies\.dqn"):
        make_policy("dqn")


# --- properties every heuristic has -----------------------------------------------------------------
@pytest.mark.parametrize("name", HEURISTICS)
def test_only_candidates_are_chosen_as_the_set_changes(name: str) -> None:
    rng = random.Random(11)
    policy = make_policy(name, seed=5)
    for trial in range(40):
        view = random_view(rng, equal_capacity=trial % 2 == 0)
        for step in range(60):
            if step % 7 == 0:
                flip_some(view, rng)
            if step % 13 == 0 and view.n < MAX_BACKENDS:
                view.add_backend(capacity=rng.choice(CAPACITY_CHOICES))
            if step % 5 == 0:
                scramble(view, rng, now_s=100.0 + step)
            choice = policy.choose(rng.randrange(3), view, 100.0 + step)
            assert choice in view.candidates
            view.on_dispatch(choice)


@pytest.mark.parametrize("name", HEURISTICS)
def test_empty_candidates_raise(name: str) -> None:
    view = ClusterView.create(3)
    policy = make_policy(name)
    assert policy.choose(0, view, 0.0) in (0, 1, 2)
    for i in range(3):
        view.set_available(i, False)
    with pytest.raises(NoBackendAvailable):
        policy.choose(0, view, 0.0)


@pytest.mark.parametrize("name", HEURISTICS)
def test_single_candidate_is_always_chosen(name: str) -> None:
    view = random_view(random.Random(2), n=5)
    for i in (0, 1, 3, 4):
        view.set_available(i, False)
    policy = make_policy(name, seed=1)
    assert {policy.choose(0, view, 100.0) for _ in range(20)} == {2}


@pytest.mark.parametrize("name", HEURISTICS)
def test_deterministic_for_a_seed(name: str) -> None:
    def run(seed: int) -> list[int]:
        rng = random.Random(99)  # the same states for every run; only the policy's seed varies
        view = random_view(rng, n=8, equal_capacity=True)
        policy = make_policy(name, seed=seed)
        out = []
        for step in range(300):
            if step % 10 == 0:
                for i in range(view.n):  # many ties, so tie-breaking randomness shows
                    view.in_flight[i] = rng.randint(0, 1)
            out.append(policy.choose(0, view, 100.0))
        return out

    assert run(7) == run(7)
    if name in ("random", "least_conn", "p2c", "peak_ewma", "sed"):
        assert run(7) != run(8)


@pytest.mark.parametrize("name", HEURISTICS)
def test_observe_is_harmless(name: str) -> None:
    view = ClusterView.create(2)
    policy = make_policy(name)
    i = policy.choose(0, view, 0.0)
    view.on_dispatch(i)
    out = Outcome(backend=i, req_class=0, latency_s=0.01, error=False)
    view.on_complete(out, 0.01)
    policy.observe(out, view, 0.01)
    assert policy.choose(0, view, 0.02) in (0, 1)


# --- round robin ------------------------------------------------------------------------------------
def sequence(policy: RoundRobin, view: ClusterView, count: int) -> list[int]:
    return [policy.choose(0, view, 0.0) for _ in range(count)]


def test_round_robin_equal_weights_is_plain_rotation() -> None:
    view = ClusterView.create(3)
    assert sequence(RoundRobin(), view, 9) == [0, 1, 2] * 3


def test_round_robin_matches_nginx_smooth_sequence() -> None:
    # nginx's documented example (ngx_http_upstream_round_robin.c commit 52327e0627f4): 5,1,1 -> a a b a c a a
    view = ClusterView.create(3, capacity=[5, 1, 1])
    assert "".join("abc"[i] for i in sequence(RoundRobin(), view, 14)) == "aabacaa" * 2


def test_round_robin_exactly_proportional_and_smooth() -> None:
    view = ClusterView.create(3, capacity=[1, 2, 4])
    seq = sequence(RoundRobin(), view, 7 * 20)
    for c in range(20):
        assert Counter(seq[7 * c : 7 * (c + 1)]) == {0: 1, 1: 2, 2: 4}
    longest = max(len(run) for run in "".join(str(i) for i in seq).replace("0", " ").replace("1", " ").split())
    assert longest <= 2  # 4 of 7 can be spread as 2,1,1: never three in a row


def test_round_robin_follows_ejection_and_recovery_without_starving() -> None:
    view = ClusterView.create(4, capacity=[1, 2, 4, 1])
    policy = RoundRobin()
    sequence(policy, view, 5)  # mid-cycle, so the change lands on a non-trivial state
    view.set_available(2, False)
    seq = sequence(policy, view, 40 * 4)
    assert set(seq) == {0, 1, 3}
    counts = Counter(seq)
    assert abs(counts[1] - 2 * counts[0]) <= 2 and abs(counts[0] - counts[3]) <= 2
    view.set_available(2, True)
    seq = sequence(policy, view, 8 * 30)
    counts = Counter(seq)
    for i, w in enumerate([1, 2, 4, 1]):
        assert abs(counts[i] - 30 * w) <= 3


def test_round_robin_stays_fair_under_frequent_flapping() -> None:
    rng = random.Random(4)
    weights = [1.0, 2.0, 3.0, 1.0, 1.0]
    view = ClusterView.create(5, capacity=weights)
    policy = RoundRobin()
    served = Counter[int]()
    offered: dict[int, float] = dict.fromkeys(
        range(5), 0.0
    )  # decisions made while each backend was a candidate, weighted share
    for _ in range(3000):
        if rng.random() < 0.3:
            flip_some(view, rng)
        total = sum(weights[i] for i in view.candidates)
        for i in view.candidates:
            offered[i] += weights[i] / total
        served[policy.choose(0, view, 0.0)] += 1
    for i in range(5):
        assert served[i] == pytest.approx(offered[i], rel=0.1), (i, served, offered)
    assert max(abs(v) for v in policy._current) < 100.0  # bounded state, however often the set changes


def test_round_robin_survives_the_proxys_retry_mask() -> None:
    """The proxy swaps in `candidates` minus the failed backend for a retry, then restores it."""
    view = ClusterView.create(3, capacity=[1, 2, 4])
    policy = RoundRobin()
    seq: list[int] = []
    for step in range(700):
        first = policy.choose(0, view, 0.0)
        seq.append(first)
        if step % 10 == 0:
            saved = view.candidates
            view.candidates = [i for i in saved if i != first]
            retry = policy.choose(0, view, 0.0)
            assert retry != first and retry in saved
            view.candidates = saved
    counts = Counter(seq)
    assert counts[0] == pytest.approx(100, abs=10) and counts[2] == pytest.approx(400, abs=20)


# --- least connections ------------------------------------------------------------------------------
def test_least_conn_picks_the_minimum() -> None:
    rng = random.Random(8)
    policy = make_policy("least_conn", seed=2)
    for _ in range(500):
        view = random_view(rng)
        for _ in range(rng.randrange(view.n)):
            flip_some(view, rng)
        choice = policy.choose(0, view, 100.0)
        best = min(view.in_flight[i] / view.capacity[i] for i in view.candidates)
        assert view.in_flight[choice] / view.capacity[choice] == pytest.approx(best)


def test_least_conn_is_weighted_by_capacity() -> None:
    view = ClusterView.create(2, capacity=[1.0, 4.0])
    view.in_flight[:] = [1, 3]  # 1/1 > 3/4
    assert {make_policy("least_conn").choose(0, view, 0.0) for _ in range(10)} == {1}


def test_least_conn_shares_ties() -> None:
    view = ClusterView.create(4)
    view.in_flight[:] = [2, 0, 5, 0]
    policy = make_policy("least_conn", seed=1)
    counts = Counter(policy.choose(0, view, 0.0) for _ in range(2000))
    assert set(counts) == {1, 3}
    assert counts[1] == pytest.approx(1000, abs=120)


# --- power of two choices ---------------------------------------------------------------------------
def twin_samples(rng: random.Random, k: int) -> tuple[int, int]:
    """The documented p2c sampling formula, replayed on a twin of the policy's generator."""
    a = int(rng.random() * k)
    b = int(rng.random() * (k - 1))
    return a, b + (b >= a)


def p2c_load(view: ClusterView, i: int) -> float:
    return (view.in_flight[i] + 1) / view.capacity[i]


def test_p2c_never_picks_the_worse_of_its_two_samples() -> None:
    rng = random.Random(21)
    policy = PowerOfTwoChoices(seed=9)
    twin = random.Random(9)
    for _ in range(2000):
        view = random_view(rng)
        for _ in range(rng.randrange(view.n)):
            flip_some(view, rng)
        choice = policy.choose(0, view, 100.0)
        k = len(view.candidates)
        if k == 1:
            assert choice == view.candidates[0]
            continue
        a, b = twin_samples(twin, k)
        assert a != b
        ia, ib = view.candidates[a], view.candidates[b]
        assert choice in (ia, ib)
        other = ib if choice == ia else ia
        assert p2c_load(view, choice) <= p2c_load(view, other) * (1 + 1e-12)


def test_p2c_rank_distribution_matches_theory() -> None:
    """Distinct uniform pairs, better one kept: rank r of k (0 = least loaded) wins 2(k-1-r)/(k(k-1))."""
    k = 5
    view = ClusterView.create(k)
    view.in_flight[:] = [3, 0, 4, 1, 2]  # ranks: backend 1 < 3 < 4 < 0 < 2
    policy = PowerOfTwoChoices(seed=3)
    draws = 20000
    counts = Counter(policy.choose(0, view, 0.0) for _ in range(draws))
    for rank, backend in enumerate([1, 3, 4, 0, 2]):
        expected = draws * 2 * (k - 1 - rank) / (k * (k - 1))
        assert counts[backend] == pytest.approx(expected, abs=0.04 * draws)
    assert counts[2] == 0  # the most loaded can never win a comparison


def test_p2c_two_candidates_always_the_better() -> None:
    view = ClusterView.create(2, capacity=[1.0, 3.0])
    view.in_flight[:] = [1, 4]  # (1+1)/1 = 2 > (4+1)/3: Envoy's weighted score prefers backend 1
    assert {PowerOfTwoChoices(seed=s).choose(0, view, 0.0) for s in range(20)} == {1}


# --- peak EWMA --------------------------------------------------------------------------------------
def test_peak_ewma_uses_decayed_cost_times_pending() -> None:
    """The inlined cost equals `view.decayed_cost(i, now) * (in_flight + 1)` on its two samples."""
    rng = random.Random(31)
    policy = PeakEwma(seed=4)
    twin = random.Random(4)
    for _ in range(2000):
        view = random_view(rng)
        for _ in range(rng.randrange(view.n)):
            flip_some(view, rng)
        now_s = 100.0 + rng.random() * 30.0
        choice = policy.choose(0, view, now_s)
        k = len(view.candidates)
        if k == 1:
            continue
        a, b = twin_samples(twin, k)
        ia, ib = view.candidates[a], view.candidates[b]
        load_a = view.decayed_cost(ia, now_s) * (view.in_flight[ia] + 1)
        load_b = view.decayed_cost(ib, now_s) * (view.in_flight[ib] + 1)
        assert choice == (ia if load_a <= load_b else ib)


def test_peak_ewma_prefers_the_cheaper_backend() -> None:
    view = ClusterView.create(2)
    view.latency_cost_s[:] = [0.2, 0.02]
    view.in_flight[:] = [3, 3]
    assert {PeakEwma(seed=s).choose(0, view, 0.0) for s in range(20)} == {1}
    view.in_flight[:] = [0, 12]  # 0.2 * 1 < 0.02 * 13: pending work outweighs a 10x faster backend
    assert {PeakEwma(seed=s).choose(0, view, 0.0) for s in range(20)} == {0}


def test_peak_ewma_avoids_a_backend_that_just_answered_slowly() -> None:
    view = ClusterView.create(3)
    policy = PeakEwma(seed=6)
    now_s = 1.0
    for i in range(3):
        view.on_dispatch(i)
        view.on_complete(Outcome(backend=i, req_class=0, latency_s=0.01, error=False), now_s)
    view.on_dispatch(2)
    view.on_complete(Outcome(backend=2, req_class=0, latency_s=2.0, error=False), now_s + 0.1)
    counts = Counter(policy.choose(0, view, now_s + 0.2) for _ in range(300))
    assert counts[2] == 0 and counts[0] > 100 and counts[1] > 100


def test_peak_ewma_never_measured_backend_costs_default_rtt() -> None:
    view = ClusterView.create(2)
    view.on_dispatch(0)
    view.on_complete(Outcome(backend=0, req_class=0, latency_s=0.3, error=False), 5.0)
    # Backend 1 was never measured: DEFAULT_RTT_S (30 ms) decayed from t=0, far below 0.3 s.
    assert {PeakEwma(seed=s).choose(0, view, 5.0) for s in range(10)} == {1}


# --- shortest expected delay ------------------------------------------------------------------------
def test_sed_matches_the_oracle_with_estimated_rates() -> None:
    rng = random.Random(41)
    policy = ShortestExpectedDelay(seed=2)
    for _ in range(2000):
        view = random_view(rng)
        for _ in range(rng.randrange(view.n)):
            flip_some(view, rng)
        c = rng.randrange(3)
        assert policy.choose(c, view, 100.0) in sed_choices(view.in_flight, view.class_rate[c], view.candidates)


def test_sed_prefers_fast_backend_until_its_queue_is_longer() -> None:
    view = ClusterView.create(2)
    set_service(view, 0, 0.04)
    set_service(view, 1, 0.01)  # backend 1 is 4x faster
    view.in_flight[:] = [0, 2]  # (0+1)*0.04 > (2+1)*0.01
    assert ShortestExpectedDelay().choose(0, view, 0.0) == 1
    view.in_flight[:] = [0, 4]  # (0+1)*0.04 < (4+1)*0.01
    assert ShortestExpectedDelay().choose(0, view, 0.0) == 0


def test_sed_breaks_ties_randomly() -> None:
    view = ClusterView.create(3)
    policy = ShortestExpectedDelay(seed=5)
    counts = Counter(policy.choose(0, view, 0.0) for _ in range(3000))
    assert all(counts[i] == pytest.approx(1000, abs=120) for i in range(3))


def test_least_conn_shares_weighted_ties() -> None:
    view = ClusterView.create(3, capacity=[1.0, 2.0, 2.0])
    view.in_flight[:] = [1, 2, 2]  # all at in_flight / capacity = 1
    policy = make_policy("least_conn", seed=4)
    counts = Counter(policy.choose(0, view, 0.0) for _ in range(3000))
    assert all(counts[i] == pytest.approx(1000, abs=120) for i in range(3))


def test_round_robin_zero_weight_gets_no_turns_unless_all_are_zero() -> None:
    view = ClusterView.create(3, capacity=[0.0, 1.0, 2.0])
    assert Counter(sequence(RoundRobin(), view, 30)) == {1: 10, 2: 20}
    view = ClusterView.create(2, capacity=[0.0, 0.0])
    assert sequence(RoundRobin(), view, 4) == [0, 1, 0, 1]
