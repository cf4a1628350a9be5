from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from lbproxy.observe import (
    FEATURE_DIM,
    ClusterView,
    Outcome,
    RequestClass,
    WindowStats,
    action_mask,
    classify_path,
    dispatch_states,
    encode_state,
    gini,
    is_accurate,
    reward,
    sed_choices,
)


def test_gini_hand_computed() -> None:
    assert gini([1, 1, 1, 1]) == 0.0
    # one of four takes everything: sum|xi-xj| = 2*3*4 = 24; 2 n^2 mean = 2*16*1 = 32 -> 0.75
    assert gini([4, 0, 0, 0]) == pytest.approx(0.75)
    # [1, 3]: |1-3|*2 = 4; 2*4*2 = 16 -> 0.25
    assert gini([1, 3]) == pytest.approx(0.25)


def test_gini_is_capacity_normalised() -> None:
    # load exactly proportional to capacity is perfectly fair
    assert gini([100, 200, 400], [1, 2, 4]) == pytest.approx(0.0)
    # equal load on unequal capacity is not
    assert gini([100, 100], [1, 3]) == pytest.approx(gini([100, 100 / 3]))
    assert gini([0, 0]) == 0.0


def test_sed_accuracy_hand_computed() -> None:
    in_flight = [3, 1, 0]
    rate = [4.0, 1.0, 0.5]
    # expected delays: 4/4=1.0, 2/1=2.0, 1/0.5=2.0 -> backend 0
    assert sed_choices(in_flight, rate, [0, 1, 2]) == [0]
    assert is_accurate(0, in_flight, rate, [0, 1, 2])
    assert not is_accurate(1, in_flight, rate, [0, 1, 2])
    # with 0 masked out, 1 and 2 tie: both are accurate
    assert sed_choices(in_flight, rate, [1, 2]) == [1, 2]
    assert is_accurate(2, in_flight, rate, [1, 2])


def test_reward_definition() -> None:
    assert reward(0.1, False, latency_scale_s=0.1, error_penalty=5.0) == pytest.approx(-1.0)
    assert reward(0.05, True, latency_scale_s=0.1, error_penalty=5.0) == pytest.approx(-5.5)


def test_classify_path() -> None:
    assert classify_path("/api/heavy?x=1") is RequestClass.HEAVY
    assert classify_path("/static/app.js") is RequestClass.STATIC
    assert classify_path("/api/light") is RequestClass.LIGHT
    assert classify_path("/anything") is RequestClass.LIGHT


def test_view_peak_ewma_and_counts() -> None:
    v = ClusterView.create(3, capacity=[1, 2, 4])
    v.on_dispatch(1)
    v.on_dispatch(1)
    assert v.in_flight == [0, 2, 0] and v.total_in_flight == 2
    v.on_complete(Outcome(backend=1, req_class=0, latency_s=0.5, error=False), now_s=1.0)
    assert v.latency_cost_s[1] == 0.5  # peak: jumps up at once
    v.on_complete(Outcome(backend=1, req_class=0, latency_s=0.1, error=True), now_s=11.0)
    w = math.exp(-1.0)
    assert v.latency_cost_s[1] == pytest.approx(0.5 * w + 0.1 * (1 - w))
    assert v.error_rate[1] > 0 and v.total_in_flight == 0
    v.set_available(2, False)
    assert v.candidates == [0, 1]


def test_encode_state_layout_and_mask() -> None:
    v = ClusterView.create(2)
    v.on_dispatch(0)
    v.set_available(1, False)
    x = encode_state(v, RequestClass.HEAVY)
    assert x.shape == (FEATURE_DIM,) and x.dtype == np.float32
    assert x[0] == pytest.approx(1 / 8)  # in-flight of backend 0
    assert x[3] == 1.0 and x[5 + 3] == 0.0  # available bits
    assert x[4] == pytest.approx(1.0)  # all recent decisions went to backend 0
    assert np.all(x[10 : 16 * 5] == 0.0)  # padded slots
    assert x[16 * 5 + RequestClass.HEAVY] == 1.0
    mask = action_mask(v)
    assert mask.tolist() == [True] + [False] * 15


def test_window_stats_summary() -> None:
    w = WindowStats(n=2)
    for i, lat in enumerate([0.01, 0.02, 0.03, 0.04]):
        w.record_decision(i % 2, accurate=i < 3)
        w.record_outcome(Outcome(backend=i % 2, req_class=0, latency_s=lat, error=i == 3))
    s = w.summary(capacity=[1.0, 1.0])
    assert s.decisions == 4 and s.accuracy == 0.75 and s.error_rate == 0.25
    assert s.gini == 0.0 and s.p50_s == 0.02 and s.p99_s == 0.04
    assert s.mean_reward == pytest.approx(-(0.1 / 0.1) / 4 - 5.0 / 4)


def test_rate_estimate_follows_completions() -> None:
    v = ClusterView.create(2, capacity=[2.0, 1.0])
    assert v.estimated_rate(0) == pytest.approx(2.0 / 0.03)
    v.on_dispatch(0)
    v.on_complete(Outcome(backend=0, req_class=0, latency_s=0.5, error=False, service_time_s=0.13), now_s=1.0)
    assert v.service_time_s[0] == pytest.approx(0.04)  # 0.03 + 0.1 * (0.13 - 0.03)
    assert v.estimated_rate(0) == pytest.approx(2.0 / 0.04)
    v.set_service_time(1, 0.0)
    assert v.estimated_rate(1) == pytest.approx(1.0 / 1e-6)


@pytest.mark.parametrize("dispatched", [[], [0, 1, 1, 2, 3, 1, 0]])
def test_dispatch_states_are_the_states_after_one_more_dispatch(dispatched: list[int]) -> None:
    view = ClusterView.create(4, [1.0, 2.0, 1.0, 1.0])
    for i in dispatched:
        view.on_dispatch(i)
    view.set_available(2, False)
    state = encode_state(view, RequestClass.HEAVY)
    rows = dispatch_states(view, state)
    assert rows.shape == (1 + len(view.candidates), FEATURE_DIM)
    np.testing.assert_array_equal(rows[0], state)
    for j, b in enumerate(view.candidates):
        after = copy.deepcopy(view)
        after.on_dispatch(b)
        np.testing.assert_allclose(rows[1 + j], encode_state(after, RequestClass.HEAVY), atol=1e-6)
    assert np.array_equal(encode_state(view, RequestClass.HEAVY), state), "the view itself is untouched"
