"""The reward join (rl/reward_join.py): decision table bounds and expiry, the transitions a join
flushes, and the records a simulator checkpoint keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lbproxy.observe import ClusterView, Outcome, action_mask, encode_state, feature_dim, reward
from lbproxy.rl.replay import TransitionBatch
from lbproxy.rl.reward_join import DecisionRecord, DecisionTable, RewardJoin

W = 16


def rec(t_s: float, action: int = 0) -> DecisionRecord:
    return DecisionRecord(np.zeros(feature_dim(W), np.float32), action, 0, t_s)


def test_table_is_bounded_and_counts_what_it_drops() -> None:
    table = DecisionTable(max_entries=10, ttl_s=1e9)
    for i in range(25):
        table.put(i, rec(float(i)))
    assert len(table) == 10
    assert table.expired == 15
    assert table.pop(3) is None  # the oldest went first
    popped = table.pop(24)
    assert popped is not None and popped.t_s == 24.0


def test_table_ttl_expiry_counted() -> None:
    table = DecisionTable(max_entries=100, ttl_s=5.0)
    for i in range(10):
        table.put(i, rec(float(i)))
    # Each insert also drops what its own timestamp puts past the TTL: t < 9 - 5 -> 0..3 are gone.
    assert table.expired == 4 and len(table) == 6
    assert table.expire(now_s=9.5) == 1  # t < 4.5: record 4
    assert table.expired == 5 and len(table) == 5
    assert table.pop(4) is None and table.pop(5) is not None
    table.put(100, rec(20.0))
    assert len(table) == 1
    assert table.expired == 9


def test_join_flushes_one_batch_with_each_class_s_prime_after_the_completions() -> None:
    view = ClusterView.create(3)
    batches: list[TransitionBatch] = []
    join = RewardJoin(W, 50.0, bootstrap=True, sink=batches.append)
    states = {did: encode_state(view, did % 2, 0.0, W) for did in range(3)}
    for did, state in states.items():
        join.record(did, state, did, did % 2, 0.0)
        view.on_dispatch(did)
    for did in range(3):
        out = Outcome(backend=did, req_class=did % 2, latency_s=0.1 * (did + 1), error=did == 2, decision_id=did)
        view.on_complete(out, 0.5)
        assert join.join(out, view) is not None
        assert join.join(out, view) is None, "joined once"
    join.flush(view, 0.5)
    assert join.join(Outcome(0, 0, 0.1, False, decision_id=99), view) is None
    join.flush(view, 0.6)
    assert [b.actions for b in batches] == [[0, 2, 1]], "one batch, class 0 then class 1; nothing more after"
    batch = batches[0]
    np.testing.assert_array_equal(batch.obs, np.stack([states[0], states[2], states[1]]))
    s0, s1 = encode_state(view, 0, 0.5, W), encode_state(view, 1, 0.5, W)
    np.testing.assert_array_equal(batch.next_obs, np.stack([s0, s0, s1]))
    assert batch.next_mask.tolist() == action_mask(view, W).tolist()
    # The reward is observe.reward with the typical latency as the view had it at each completion.
    assert batch.rewards[1] < batch.rewards[0] < 0 and math.isfinite(batch.rewards[1])
    # One class joined: its s' is one row every transition shares.
    join.record(7, states[0], 1, 0, 0.6)
    view.on_dispatch(1)
    out = Outcome(backend=1, req_class=0, latency_s=0.1, error=False, decision_id=7)
    view.on_complete(out, 0.7)
    join.join(out, view)
    join.flush(view, 0.7)
    np.testing.assert_array_equal(batches[1].next_obs, encode_state(view, 0, 0.7, W))


def test_without_bootstrap_s_prime_is_never_encoded() -> None:
    view = ClusterView.create(2)
    batches: list[TransitionBatch] = []
    join = RewardJoin(W, 50.0, bootstrap=False, sink=batches.append)
    join.record(0, encode_state(view, 0, 0.0, W), 1, 0, 0.0)
    out = Outcome(backend=1, req_class=0, latency_s=0.2, error=False, decision_id=0)
    view.on_complete(out, 0.2)
    join.join(out, view)
    join.flush(view, 0.2)
    (batch,) = batches
    assert not batch.next_obs.any() and not batch.next_mask.any()
    assert batch.rewards == [pytest.approx(reward(0.2, False, view.typical_all_s, 50.0))]


def test_pending_records_survive_a_state_dict_round_trip() -> None:
    view = ClusterView.create(2)
    a = RewardJoin(W, 50.0, bootstrap=True, sink=lambda _b: None, table=DecisionTable(ttl_s=math.inf))
    for did in (3, 4):
        a.record(did, encode_state(view, did % 3, 1.0 * did, W), did % 2, did % 3, 1.0 * did)
    b = RewardJoin(W, 50.0, bootstrap=True, sink=lambda _b: None, table=DecisionTable(ttl_s=math.inf))
    b.load_state_dict(a.state_dict())
    for (i, ra), (j, rb) in zip(a.table.items(), b.table.items(), strict=True):
        assert i == j and (ra.action, ra.req_class, ra.t_s) == (rb.action, rb.req_class, rb.t_s)
        np.testing.assert_array_equal(ra.state, rb.state)
