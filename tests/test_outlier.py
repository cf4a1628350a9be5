"""The shared availability rules (lbproxy/outlier.py) and the retry budget (lbproxy/retry.py, with the
retry-slot queue of lbproxy/proxy/retry_sweep.py), without I/O: consecutive-failure and latency
ejection, the percentage cap and backoff, panic mode, slow start through the candidate list for
every policy, and how the pool and the simulator apply them."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from lbproxy.config import load_settings
from lbproxy.config_values import BackendSpec
from lbproxy.observe import ClusterView, Outcome, action_mask
from lbproxy.outlier import (
    MAX_EJECTION_S,
    OutlierConfig,
    OutlierDetector,
    SlowStart,
    route_candidates,
)
from lbproxy.policies import HEURISTICS, Policy, make_policy
from lbproxy.retry import RetryBudget
from lbproxy.sim.engine import Simulator
from lbproxy.sim.scenario import Fault, load_scenario
from lbproxy.upstream import Pool, PoolConfig, pool_config_from


def detector(n: int = 4, **cfg: float) -> OutlierDetector:
    return OutlierDetector(OutlierConfig(**cfg), [True] * n)  # type: ignore[arg-type]


def feed(d: OutlierDetector, latencies: list[float], rounds: int, req_class: int = 0) -> list[int]:
    """`rounds` completions per slot at the given latencies; the slots that became due for ejection."""
    due: list[int] = []
    for _ in range(rounds):
        for i, lat in enumerate(latencies):
            if d.record(i, req_class, lat, False) and i not in due:
                due.append(i)
    return due


# --- panic mode ------------------------------------------------------------------------------------
def test_route_candidates_and_panic() -> None:
    present = [True] * 4
    assert route_candidates([True, False, True, True], present, 50.0) == ([0, 2, 3], False)
    assert route_candidates([False, False, True, True], present, 50.0) == ([2, 3], False)  # exactly 50 %
    assert route_candidates([False, False, False, True], present, 50.0) == ([0, 1, 2, 3], True)
    # removed slots neither count nor come back in panic; threshold 0 never panics
    assert route_candidates([False, False, False, True], [False, True, True, True], 50.0) == ([1, 2, 3], True)
    assert route_candidates([False] * 4, present, 0.0) == ([], False)


# --- consecutive failures --------------------------------------------------------------------------
def test_consecutive_failures_are_due_at_the_threshold_and_a_success_resets() -> None:
    d = detector(eject_consecutive_failures=3, latency_eject_factor=0.0)
    assert not d.record(0, 0, 0.01, True) and not d.record(0, 0, 0.01, True)
    assert not d.record(0, 0, 0.01, False)  # streak broken
    assert [d.record(0, 0, 0.01, True) for _ in range(3)] == [False, False, True]
    assert d.record(0, 0, 0.01, True)  # still due while no ejection happened (the cap may refuse one)
    assert d.eject(0, 0.0) == 30.0 and d.consecutive_failures[0] == 0
    assert not d.record(0, 0, 0.01, True)  # already ejected
    off = detector(eject_consecutive_failures=0)
    assert not any(off.record(0, 0, 0.01, True) for _ in range(100))


def test_ejection_backoff_is_capped() -> None:
    d = detector(eject_base_s=100.0)
    durations = []
    for t in range(5):
        duration = d.eject(1, float(t) * 1000)
        assert duration is not None and d.ejected[1]
        durations.append(duration)
        assert d.expired(t * 1000 + duration - 0.001) == []
        assert d.expired(t * 1000 + duration) == [1]
        d.uneject(1)
        assert not d.ejected[1] and d.ejected_until_s[1] == 0.0
    assert durations == [100.0, 200.0, MAX_EJECTION_S, MAX_EJECTION_S, MAX_EJECTION_S]
    assert d.times_ejected[1] == 5
    # a base above the cap is still honoured once (the cap never shortens the base time)
    assert detector(eject_base_s=400.0).eject(0, 0.0) == 400.0


def test_max_ejection_percent_with_the_first_ejection_always_allowed() -> None:
    d = detector(4, max_ejection_percent=50.0)
    assert [d.eject(i, 0.0) is not None for i in range(4)] == [True, True, False, False]
    one = detector(2, max_ejection_percent=10.0)  # 1 of 2 is 50 % > 10 %: allowed as the first
    assert one.eject(0, 0.0) is not None and one.eject(1, 0.0) is None
    # removed slots leave the count: 1 ejected of 2 present is 50 %
    d = detector(4, max_ejection_percent=50.0)
    d.remove(2)
    d.remove(3)
    assert d.eject(0, 0.0) is not None and d.eject(1, 0.0) is None
    assert d.eject(2, 0.0) is None  # a removed slot is never ejected


# --- latency ejection --------------------------------------------------------------------------------
def test_a_latency_outlier_is_due_after_min_samples_and_completions() -> None:
    d = detector(4, latency_eject_factor=10.0, latency_eject_min_samples=20, latency_eject_completions=10)
    # 20 completions each to qualify (the first refresh of the median may lag a few), then 10 above
    assert feed(d, [0.01, 0.012, 0.011, 0.3], 20) == []
    due = feed(d, [0.01, 0.012, 0.011, 0.3], 12)
    assert due == [3]
    assert d.eject(3, 0.0) is not None
    # slow but within the factor (8x): never
    d = detector(4, latency_eject_factor=10.0)
    assert feed(d, [0.01, 0.012, 0.011, 0.08], 200) == []


def test_latency_needs_enough_peers_and_a_sustained_streak() -> None:
    d = detector(2, latency_eject_min_backends=3)
    assert feed(d, [0.01, 1.0], 200) == []  # a median of two is no consensus
    d = detector(4, latency_eject_min_backends=3)
    d.available[1] = d.available[2] = False  # unhealthy peers do not count either
    assert feed(d, [0.01, 0.01, 0.01, 1.0], 200) == []
    # a burst of huge responses (a GC pause) is clipped: it cannot hold the EWMA up for a whole streak
    d = detector(4, latency_eject_completions=10)
    feed(d, [0.01, 0.01, 0.01, 0.01], 30)
    due = False
    for k in range(300):
        for i in range(3):
            d.record(i, 0, 0.01, False)
        due |= d.record(3, 0, 100.0 if k % 20 < 6 else 0.01, False)
    assert not due
    # the same backend slow for good is ejected
    assert feed(d, [0.01, 0.01, 0.01, 100.0], 15) == [3]


def test_latency_is_judged_per_request_class() -> None:
    """A backend slow only at heavy work is an outlier only while its heavy completions run in a row."""
    d = detector(3)
    feed(d, [0.01, 0.01, 0.01], 30, req_class=0)
    feed(d, [0.05, 0.05, 0.05], 30, req_class=1)
    assert feed(d, [0.01, 0.01, 0.011], 100, req_class=0) == []
    assert feed(d, [0.05, 0.05, 1.0], 30, req_class=1) == [2]


def test_readmission_forgets_the_latency_history() -> None:
    d = detector(4, latency_eject_min_samples=20, latency_eject_completions=10)
    feed(d, [0.01, 0.01, 0.01, 1.0], 40)
    assert d.eject(3, 0.0) is not None
    d.uneject(3)
    # back and healthy: its old 1 s estimate is gone, so fast answers never make it "slow"
    assert feed(d, [0.01, 0.01, 0.01, 0.01], 100) == []
    off = detector(4, latency_eject_factor=0.0)
    assert feed(off, [0.01, 0.01, 0.01, 1.0], 200) == []


# --- slow start ------------------------------------------------------------------------------------------
def test_slow_start_factor_is_envoys() -> None:
    ss = SlowStart(window_s=10.0, aggression=1.0, min_weight_percent=10.0)
    assert ss.factor(0, 5.0) == 1.0  # not slow-starting
    ss.begin(0, 100.0)
    assert ss.factor(0, 100.0) == pytest.approx(0.1)  # max(t, 1) / window, at least min weight
    assert ss.factor(0, 105.0) == pytest.approx(0.5)
    assert ss.factor(0, 110.0) == 1.0
    fast = SlowStart(window_s=10.0, aggression=2.0, min_weight_percent=0.0)
    fast.begin(0, 0.0)
    assert fast.factor(0, 2.5) == pytest.approx(0.5)  # (0.25) ^ (1 / 2)
    off = SlowStart(window_s=0.0)
    off.begin(0, 0.0)
    assert not off.since_s and off.factor(0, 0.0) == 1.0


def _share(policy: Policy, factor_at: float) -> float:
    """Share of decisions to slot 3 (slow-starting at a fixed factor) among 4 equal backends."""
    view = ClusterView.create(4)
    ss = SlowStart(window_s=10.0, min_weight_percent=0.0)
    ss.begin(3, 0.0)
    base = view.candidates
    view.candidates = ss.candidates(base, view.capacity)
    chosen = 0
    n = 4000
    for k in range(n):
        i = policy.choose(0, view, 1.0)
        assert i in view.candidates
        view.on_dispatch(i)
        view.on_complete(Outcome(i, 0, 0.01, False, queued_behind=0), 1.0 + k * 1e-4)
        chosen += i == 3
        if ss.on_dispatch(i, factor_at * 10.0):
            view.candidates = ss.candidates(base, view.capacity)
    return chosen / n


@pytest.mark.parametrize("name", HEURISTICS)
def test_slow_start_caps_the_share_under_every_policy(name: str) -> None:
    """Factor 0.3 of a fair share of 1/4: at most 7.5 % of the decisions, whatever the policy would do
    with an idle newcomer (least_conn and SED pick it every time it is offered)."""
    assert _share(make_policy(name, 1), 0.3) <= 0.3 / 4 + 0.01


def test_slow_start_caps_a_policy_that_always_wants_the_newcomer() -> None:
    class Greedy:
        name = "greedy"

        def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
            return 3 if 3 in view.candidates else view.candidates[0]

        def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None: ...

    for factor in (0.1, 0.3, 0.8):
        assert _share(Greedy(), factor) == pytest.approx(factor / 4, abs=0.01)


def test_slow_start_goes_through_the_dqn_mask() -> None:
    view = ClusterView.create(3)
    ss = SlowStart(window_s=10.0)
    ss.begin(2, 0.0)
    base = view.candidates
    view.candidates = ss.candidates(base, view.capacity)
    assert view.candidates is base  # not in debt yet: same list object, policies' caches stay valid
    assert ss.on_dispatch(2, 0.5)  # chosen once: in debt, out of the list
    view.candidates = ss.candidates(base, view.capacity)
    assert view.candidates == [0, 1]
    assert action_mask(view, 4).tolist() == [True, True, False, False]
    # it pays back factor x share per decision (0.1 x 1/3): ~30 decisions later it is offered again
    back = next(k for k in range(1, 100) if ss.on_dispatch(0, 0.5))
    assert back == pytest.approx(30, abs=1)
    # at the end of the window it leaves slow start and the list is the base again
    assert ss.on_dispatch(0, 10.0) and not ss.since_s
    assert ss.candidates(base, view.capacity) is base


def test_slow_start_never_empties_the_candidates() -> None:
    ss = SlowStart(window_s=10.0)
    for i in range(2):
        ss.begin(i, 0.0)
    ss.on_dispatch(0, 0.0)
    ss.on_dispatch(1, 0.0)
    assert ss.candidates([0, 1], [1.0, 1.0]) == [0, 1]


# --- retry budget ------------------------------------------------------------------------------------------
def test_retry_budget_is_a_share_of_active_requests_with_a_floor() -> None:
    b = RetryBudget(budget_percent=20.0, min_concurrency=3)
    assert [b.try_acquire(1) for _ in range(4)] == [True, True, True, False]  # the floor: 3
    b.release()
    assert b.try_acquire(1) and not b.try_acquire(1)
    b = RetryBudget(budget_percent=20.0, min_concurrency=3)
    assert sum(b.try_acquire(100) for _ in range(50)) == 20
    for _ in range(25):
        b.release()
    assert b.active == 0
    assert not RetryBudget(0.0, 0).try_acquire(100)


# --- the two callers ---------------------------------------------------------------------------------------
def test_settings_reach_the_pool_config() -> None:
    s = load_settings({"latency_eject_factor": 4.0, "slow_start_window_s": 3.0, "retry_budget_percent": 5.0})
    cfg = pool_config_from(s)
    assert (cfg.latency_eject_factor, cfg.slow_start_window_s, cfg.retry_budget_percent) == (4.0, 3.0, 5.0)
    assert cfg.per_try_timeout_s == s.per_try_timeout_s and cfg.retry_min_concurrency == 3


def test_pool_slow_starts_an_added_backend_and_ejects_latency_outliers() -> None:
    specs = [BackendSpec(url=f"http://127.0.0.1:{9000 + i}") for i in range(3)]
    pool = Pool(specs, PoolConfig(slow_start_window_s=10.0, latency_eject_min_samples=5, latency_eject_completions=3))
    now = [100.0]
    pool.clock = lambda: now[0]
    b = pool.add(BackendSpec(url="http://127.0.0.1:9100"))
    assert pool.view.candidates == [0, 1, 2, 3]
    assert pool.describe(0.0)[3]["slow_start_factor"] == pytest.approx(0.1)
    pool.on_dispatch(b.index)
    assert pool.view.candidates == [0, 1, 2]  # in debt after its one request
    now[0] += 10.0
    pool.on_dispatch(0)  # the window is over: full member again
    assert pool.view.candidates == [0, 1, 2, 3] and pool.describe(0.0)[3]["slow_start_factor"] is None
    for _ in range(12):
        for i in range(4):
            pool.on_dispatch(i)
            pool.on_complete(Outcome(i, 0, 1.0 if i == 1 else 0.01, False), 0.0, failed=False)
    assert pool.backends[1].ejected and pool.backends[1].times_ejected == 1
    assert 1 not in pool.view.candidates


def test_simulator_gains_the_live_rules() -> None:
    base = load_scenario("homogeneous")
    # First ejection always allowed: 1 of 4 servers is 25 % > max_ejection_percent 10 %.
    sc = dataclasses.replace(
        base, faults=(Fault(0.0, 0, error_rate=1.0),), repeat_s=0.0, max_ejection_percent=10.0, eject_base_s=1000.0
    )
    sim = Simulator(sc, 0, start_s=0.0)
    sim.run(make_policy("round_robin"), 200)
    assert sim.outlier.ejected == [True, False, False, False] and sim.view.candidates == [1, 2, 3]
    # The 300 s cap on repeated ejections.
    assert sim.outlier.eject(1, 0.0) is None  # refused: the cap holds after the first
    # Panic mode: three of four crashed and detected -> route over all four.
    crash = tuple(Fault(0.0, i, crash=True) for i in range(3))
    sim = Simulator(dataclasses.replace(base, faults=crash, repeat_s=0.0, eject_consecutive_failures=0), 0, start_s=5.0)
    assert sim.panic and sim.view.candidates == [0, 1, 2, 3] and sim.view.available == [False, False, False, True]
    # Latency ejection: a server slowed 30x is taken out even by a load-blind policy.
    slow = dataclasses.replace(base, faults=(Fault(0.0, 2, slowdown=30.0),), repeat_s=0.0)
    sim = Simulator(slow, 0, phase=0, start_s=0.0)
    sim.run(make_policy("round_robin"), 3000)
    assert sim.outlier.times_ejected == [0, 0, 1, 0]


def test_simulator_slow_starts_a_recovered_server() -> None:
    base = load_scenario("homogeneous")
    faults = (Fault(0.0, 1, crash=True), Fault(10.0, 1, recover=True))
    sc = dataclasses.replace(base, faults=faults, repeat_s=0.0, eject_consecutive_failures=0)
    sim = Simulator(sc, 0, start_s=10.0)  # the recovery was just applied
    assert 1 in sim.slow_start.since_s
    load = np.array(sim.run(make_policy("least_conn"), 400).load)
    assert 0 < load[1] < 0.1 * 400 / 4 * 2  # well under a fair share (factor 0.1 here)
    later = Simulator(sc, 0, start_s=25.0)  # the window (10 s) is over: it leaves at the first dispatch
    assert later.slow_start.factor(1, later.now_s) == 1.0
    later.run(make_policy("least_conn"), 10)
    assert not later.slow_start.since_s


async def test_cut_off_requests_queue_for_retry_slots_and_pass_on_a_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one slot (1 %, floor 1) is taken; two cut-off requests wait for it, oldest first. The first
    is woken and cancelled (its client left) in the same instant: the wake-up goes to the second,
    which gets its retry. A third, never woken, gives up after SLOT_WAIT_S with no retry."""
    from lbproxy.proxy import retry_sweep
    from lbproxy.telemetry import Metrics

    monkeypatch.setattr(retry_sweep, "SLOT_WAIT_S", 0.05)
    loop = asyncio.get_running_loop()
    config = PoolConfig(retry_budget_percent=1.0, retry_min_concurrency=1)
    sweep = retry_sweep.RetrySweep(ClusterView.create(2), None, Metrics(), config, lambda: 10, loop)
    assert sweep.retry_to(0, 0, "disconnect") == 1 and sweep.budget.active == 1
    first = asyncio.ensure_future(sweep.retry_when_allowed(0, 0, "disconnect"))
    second = asyncio.ensure_future(sweep.retry_when_allowed(0, 0, "disconnect"))
    await asyncio.sleep(0)
    sweep.release()  # wakes `first` ...
    first.cancel()  # ... whose client goes away before it runs
    assert await second == 1 and first.cancelled()
    assert sweep.budget.active == 1, "the second took the freed slot"
    assert await sweep.retry_when_allowed(0, 0, "disconnect") is None  # nobody releases: it gives up
    assert not sweep._slot_waiters
