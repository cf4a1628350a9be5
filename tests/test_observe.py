from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from lbproxy.observe import (
    C_CLASS,
    C_LOG_COUNT,
    C_LOG_SCALE,
    F_LOG_IN_FLIGHT,
    F_VALID,
    ROW_FEATURES,
    STATIC_FEATURES,
    ClusterView,
    DispatchModel,
    Outcome,
    RequestClass,
    WindowStats,
    action_mask,
    classify_path,
    encode_state,
    feature_dim,
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
    # latency in typical latencies of the cluster, minus the error penalty: the same on any scale
    assert reward(0.1, False, typical_s=0.05, error_penalty=20.0) == pytest.approx(-2.0)
    assert reward(0.05, True, typical_s=0.05, error_penalty=20.0) == pytest.approx(-21.0)
    assert reward(10.0, False, typical_s=5.0) == reward(0.01, False, typical_s=0.005)


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


def _busy_view(n: int = 3) -> ClusterView:
    v = ClusterView.create(n, capacity=[1.0] * n)
    for i in range(n):
        for k in range(20):
            v.on_dispatch(i)
            v.on_complete(
                Outcome(i, RequestClass.LIGHT, 0.01 * (i + 1) * (1 + k % 3), False, service_time_s=0.01 * (i + 1)),
                now_s=1.0 + 0.01 * k,
            )
    return v


def test_encode_state_layout_and_mask() -> None:
    v = _busy_view(3)
    v.on_dispatch(0)
    v.on_dispatch(0)
    v.set_available(1, False)
    width = 8
    x = encode_state(v, RequestClass.HEAVY, 2.0, width)
    assert x.shape == (feature_dim(width),) and x.dtype == np.float32
    rows = x[: width * ROW_FEATURES].reshape(width, ROW_FEATURES)
    ctx = x[width * ROW_FEATURES :]
    assert rows[0, F_VALID] == 1.0 and rows[2, F_VALID] == 1.0
    assert np.all(rows[1] == 0.0), "a slot no policy may choose reads as padding"
    assert np.all(rows[3:] == 0.0)
    assert rows[0, F_LOG_IN_FLIGHT] == pytest.approx(math.log1p(2))
    assert ctx[C_CLASS + RequestClass.HEAVY] == 1.0 and ctx[C_CLASS + RequestClass.LIGHT] == 0.0
    assert ctx[C_LOG_COUNT] == pytest.approx(math.log(2))
    assert action_mask(v, width).tolist() == [True, False, True] + [False] * 5
    with pytest.raises(ValueError, match="cannot hold"):
        encode_state(v, 0, 0.0, 2)


def test_encoding_is_scale_free() -> None:
    """The same cluster at 1000x the latency reads the same, except the log-absolute scale term."""
    fast, slow = ClusterView.create(2), ClusterView.create(2)
    for view, scale in ((fast, 0.001), (slow, 1.0)):
        for k in range(300):
            i = k % 2
            view.on_dispatch(i)
            st = scale * (1.0 + i)
            view.on_complete(Outcome(i, 0, st * 1.5, False, service_time_s=st, queued_behind=0), now_s=k * scale)
        view.on_dispatch(1)
    a = encode_state(fast, 0, 300 * 0.001, 4)
    b = encode_state(slow, 0, 300 * 1.0, 4)
    scale_col = 4 * ROW_FEATURES + C_LOG_SCALE
    assert b[scale_col] - a[scale_col] == pytest.approx(3.0, abs=0.05)
    a[scale_col] = b[scale_col] = 0.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_latency_and_service_estimates_are_per_class() -> None:
    v = ClusterView.create(1)
    for k in range(50):
        v.on_dispatch(0)
        v.on_complete(Outcome(0, RequestClass.LIGHT, 0.01, False, service_time_s=0.01), now_s=k)
        v.on_dispatch(0)
        v.on_complete(Outcome(0, RequestClass.HEAVY, 0.2, False, service_time_s=0.2), now_s=k)
    assert v.class_service_s[RequestClass.LIGHT][0] == pytest.approx(0.01)
    assert v.class_service_s[RequestClass.HEAVY][0] == pytest.approx(0.2)
    assert v.class_samples[RequestClass.STATIC][0] == 0
    assert v.class_rate[RequestClass.HEAVY][0] == pytest.approx(v.concurrency[0] / 0.2)


def test_service_time_without_reports_comes_from_requests_sent_to_an_idle_backend() -> None:
    """A backend we did not write reports nothing: only a request sent while it was idle measures its
    service time (nothing queued in front of it); queued ones only count as latency."""
    v = ClusterView.create(1)
    v.on_dispatch(0)
    v.on_complete(Outcome(0, 0, 0.05, False, queued_behind=0), now_s=1.0)
    for k in range(30):
        v.on_dispatch(0)
        v.on_complete(Outcome(0, 0, 0.5, False, queued_behind=9), now_s=2.0 + k)
    assert v.class_service_s[0][0] == pytest.approx(0.05)
    assert v.class_latency_s[0][0] > 0.4


def test_concurrency_estimate_follows_littles_law() -> None:
    """A 4-worker FIFO backend: a request with q ahead waits for (q + 1 - 4) / 4 service times."""
    v = ClusterView.create(1)
    st = 0.01
    for k in range(400):
        q = 2 + k % 10
        latency = st * max(1.0, (q + 1) / 4)
        v.on_dispatch(0)
        v.on_complete(Outcome(0, 0, latency, False, service_time_s=st, queued_behind=q), now_s=k * 0.01)
    assert 3.5 <= v.concurrency[0] <= 5.0


def test_dispatch_changes_only_the_dispatched_row() -> None:
    v = _busy_view(4)
    before = encode_state(v, RequestClass.LIGHT, 3.0, 8)
    v.on_dispatch(2)
    after = encode_state(v, RequestClass.LIGHT, 3.0, 8)
    rows_b = before[: 8 * ROW_FEATURES].reshape(8, ROW_FEATURES)
    rows_a = after[: 8 * ROW_FEATURES].reshape(8, ROW_FEATURES)
    changed = {i for i in range(8) if not np.array_equal(rows_a[i], rows_b[i])}
    assert changed == {2}
    assert np.array_equal(rows_a[2, :STATIC_FEATURES], rows_b[2, :STATIC_FEATURES]), "only dynamic columns move"


@pytest.mark.parametrize("dispatched", [[], [0, 1, 1, 3, 1, 0]])
def test_dispatch_model_is_the_state_after_the_dispatches(dispatched: list[int]) -> None:
    view = _busy_view(4)
    view.set_available(2, False)
    state = encode_state(view, RequestClass.HEAVY, 5.0, 8)
    model = DispatchModel(view, RequestClass.HEAVY, state)
    counts = [0] * 4
    after = copy.deepcopy(view)
    for b in dispatched:
        after.on_dispatch(b)
        counts[b] += 1
    moved = state.copy()
    for b in set(dispatched):
        model.apply(moved, b, counts[b], len(dispatched))
    np.testing.assert_allclose(moved, encode_state(after, RequestClass.HEAVY, 5.0, 8), atol=1e-6)
    cands = np.asarray(view.candidates)
    for k in (1, 3):
        rows = model.rows_after(cands, np.full(len(cands), float(k)))
        for j, b in enumerate(view.candidates):
            one = copy.deepcopy(view)
            for _ in range(k):
                one.on_dispatch(b)
            expect = encode_state(one, RequestClass.HEAVY, 5.0, 8)[: 8 * ROW_FEATURES].reshape(8, ROW_FEATURES)[b]
            np.testing.assert_allclose(rows[j], expect, atol=1e-6)
    assert np.array_equal(encode_state(view, RequestClass.HEAVY, 5.0, 8), state), "the view itself is untouched"


def test_dispatch_model_apply_moves_a_state_one_dispatch_at_a_time() -> None:
    """`apply` (the decision records' path) writes the encoding of the view after the dispatches,
    dispatch by dispatch, into a state an earlier call already moved."""
    view = _busy_view(4)
    state = encode_state(view, RequestClass.LIGHT, 5.0, 8)
    model = DispatchModel(view, RequestClass.LIGHT, state)
    x = state.copy()
    counts = [0] * 4
    after = copy.deepcopy(view)
    for b in [1, 1, 0, 3, 1, 2, 2, 0]:
        counts[b] += 1
        after.on_dispatch(b)
        model.apply(x, b, counts[b], sum(counts))
        np.testing.assert_allclose(x, encode_state(after, RequestClass.LIGHT, 5.0, 8), rtol=1e-6, atol=1e-6)
    assert not np.array_equal(x, state) and np.array_equal(model.state, state), "the snapshot's own state is untouched"


def test_window_stats_summary() -> None:
    w = WindowStats(n=2)
    for i, lat in enumerate([0.01, 0.02, 0.03, 0.04]):
        w.record_decision(i % 2, accurate=i < 3)
        w.record_outcome(Outcome(backend=i % 2, req_class=0, latency_s=lat, error=i == 3), typical_s=0.01)
    s = w.summary(capacity=[1.0, 1.0])
    assert s.decisions == 4 and s.accuracy == 0.75 and s.error_rate == 0.25
    assert s.gini == 0.0 and s.p50_s == 0.02 and s.p99_s == 0.04
    assert s.mean_reward == pytest.approx(-(0.1 / 0.01) / 4 - w.error_penalty / 4)


@pytest.mark.parametrize("n", [1, 3, 9, 16])
def test_the_loop_and_vector_encodings_agree(n: int) -> None:
    """encode_state builds rows in a Python loop for small pools and with NumPy for large ones: the
    same numbers, including imputed classes, never-measured backends and non-candidates."""
    from lbproxy.observe.features import _rows_loop, _rows_vector

    rng = np.random.default_rng(n)
    v = ClusterView.create(n)
    for k in range(15 * n):
        i = int(rng.integers(n))
        v.on_dispatch(i)
        st = 0.01 * (1 + rng.random()) if rng.random() < 0.5 else None
        out = Outcome(
            i, int(rng.integers(2)), 0.02 * rng.random(), bool(rng.random() < 0.1), -1, st, int(rng.integers(3))
        )
        v.on_complete(out, k * 0.001)
    for _ in range(2 * n):
        v.on_dispatch(int(rng.integers(n)))
    if n > 2:
        v.set_available(1, False)
    for c in range(3):  # class 2 was never seen: imputed everywhere
        a, b = np.zeros((n, ROW_FEATURES), np.float32), np.zeros((n, ROW_FEATURES), np.float32)
        typ, typ_all = v.typical_s[c], v.typical_all_s
        _rows_loop(v, c, 1.0, typ, typ_all, a)
        _rows_vector(v, c, 1.0, typ, typ_all, b)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
