"""The permutation-equivariant Q-network: the properties that make one model route any cluster."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lbproxy.observe import (
    MAX_BACKENDS,
    ROW_FEATURES,
    STATIC_FEATURES,
    ClusterView,
    DispatchModel,
    Outcome,
    encode_state,
    feature_dim,
)
from lbproxy.rl.network import NumpyWeights, QNetwork, RowScorer, numpy_q


def random_net(seed: int = 0, hidden: int = 32) -> QNetwork:
    torch.manual_seed(seed)
    net = QNetwork(hidden=hidden, summary=16).eval()
    with torch.no_grad():  # larger weights than the default init, so rows differ clearly in score
        for p in net.parameters():
            p.mul_(3.0)
    return net


def random_view(n: int, seed: int) -> ClusterView:
    """A view with distinct per-backend behaviour: speeds, concurrency, errors, in-flight counts."""
    rng = np.random.default_rng(seed)
    view = ClusterView.create(n)
    t = 0.0
    for _ in range(30 * n):
        i = int(rng.integers(n))
        c = int(rng.integers(3))
        st = 0.01 * (1 + i % 5) * (1 + c)
        q = int(rng.integers(0, 6))
        view.on_dispatch(i)
        t += 0.001
        view.on_complete(
            Outcome(i, c, st * (1 + q * rng.random()), bool(rng.random() < 0.05 * (i % 3)), -1, st, q), now_s=t
        )
    for i in range(n):
        for _ in range(int(rng.integers(0, 5))):
            view.on_dispatch(i)
    return view


def torch_q(net: QNetwork, states: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(np.atleast_2d(states))).numpy()


def permuted(view: ClusterView, order: list[int]) -> ClusterView:
    """The same cluster with its slots listed in another order."""
    out = copy.deepcopy(view)
    for name in (
        "in_flight",
        "latency_cost_s",
        "error_rate",
        "available",
        "capacity",
        "service_time_s",
        "latency_s",
        "samples",
        "concurrency",
        "share",
        "last_update_s",
    ):
        src = getattr(view, name)
        setattr(out, name, [src[j] for j in order])
    for name in ("class_latency_s", "class_service_s", "class_samples", "class_rate"):
        setattr(out, name, [[row[j] for j in order] for row in getattr(view, name)])
    out.refresh_candidates()
    return out


@pytest.mark.parametrize("seed", range(5))
def test_permuting_the_backends_permutes_the_q_values_exactly(seed: int) -> None:
    net = random_net(seed)
    view = random_view(7, seed)
    order = list(np.random.default_rng(seed).permutation(7))
    x = encode_state(view, 1, 1.0, 8)
    xp = encode_state(permuted(view, order), 1, 1.0, 8)
    q, qp = torch_q(net, x)[0], torch_q(net, xp)[0]
    np.testing.assert_allclose(qp[:7], q[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33, MAX_BACKENDS])
def test_any_backend_count_and_any_width_with_the_same_weights(n: int) -> None:
    """1 to MAX_BACKENDS backends, and padding rows change nothing: a state of width n and one of width
    MAX_BACKENDS score the same backends the same."""
    net = random_net(1)
    view = random_view(n, n)
    narrow = torch_q(net, encode_state(view, 0, 2.0, n))[0]
    wide = torch_q(net, encode_state(view, 0, 2.0, MAX_BACKENDS))[0]
    assert narrow.shape == (n,) and wide.shape == (MAX_BACKENDS,)
    np.testing.assert_allclose(wide[:n], narrow, rtol=1e-5, atol=1e-5)


def test_numpy_forward_matches_torch() -> None:
    net = random_net(2)
    w = NumpyWeights.from_state_dict(net.state_dict())
    states = np.stack([encode_state(random_view(6, s), s % 3, 1.0, 16) for s in range(6)])
    np.testing.assert_allclose(numpy_q(w, states), torch_q(net, states), rtol=1e-4, atol=1e-4)


def test_row_scorer_is_the_forward_pass_without_the_shared_value() -> None:
    """Scores from a RowScorer over the view's own rows equal the Q-values minus one constant (the
    action-independent V), so the argmax is the network's."""
    net = random_net(3)
    w = NumpyWeights.from_state_dict(net.state_dict())
    view = random_view(9, 3)
    x = encode_state(view, 2, 1.0, 16)
    rows = x[: 9 * ROW_FEATURES].reshape(9, ROW_FEATURES)
    scores = RowScorer(w, rows, x[16 * ROW_FEATURES :]).scores(rows)
    diff = torch_q(net, x)[0][:9] - scores
    np.testing.assert_allclose(diff, diff[0], atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_a_dispatch_changes_exactly_one_score_and_the_rescore_is_exact(seed: int) -> None:
    """After a dispatch to b, a full forward pass of the new state changes Q_b and shifts every Q by
    the same constant (the value's total-in-flight term) and nothing else; re-scoring row b alone from
    the what-if row gives exactly the new relative score."""
    net = random_net(seed + 10)
    w = NumpyWeights.from_state_dict(net.state_dict())
    view = random_view(6, seed + 20)
    state = encode_state(view, 1, 3.0, 8)
    model = DispatchModel(view, 1, state)
    scorer = RowScorer(w, model.rows, model.ctx)
    before = torch_q(net, state)[0][:6]
    for b in view.candidates:
        after_view = copy.deepcopy(view)
        after_view.on_dispatch(b)
        after = torch_q(net, encode_state(after_view, 1, 3.0, 8))[0][:6]
        shift = after - before
        others = [i for i in range(6) if i != b]
        np.testing.assert_allclose(shift[others], shift[others[0]], atol=1e-4)  # one common constant
        row = model.rows_after(np.array([b]), np.array([1.0]))
        rescored = scorer.scores(row)[0] - scorer.scores(model.rows[[b]])[0]
        assert rescored == pytest.approx(shift[b] - shift[others[0]], abs=1e-4)


def test_the_pooled_summary_reads_no_dispatch_dependent_column() -> None:
    """The construction that makes the exact re-score possible: the static encoder's input stops at
    STATIC_FEATURES, and the dynamic columns follow it."""
    net = random_net(4)
    assert net.static.in_features == STATIC_FEATURES < ROW_FEATURES
    x = torch.zeros(1, feature_dim(4))
    assert net(x).shape == (1, 4)
