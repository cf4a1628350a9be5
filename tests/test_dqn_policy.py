"""The live dqn policy's inline path: one pass per loop iteration and request class, decisions that
see the iteration's own dispatches, and a state that is fresh every iteration."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import torch

from lbproxy.config import Settings
from lbproxy.observe import FEATURE_DIM, MAX_BACKENDS, PER_BACKEND_FEATURES, ClusterView, Outcome, encode_state
from lbproxy.policies.base import resolve
from lbproxy.policies.dqn import DqnRuntime, create_dqn_runtime
from lbproxy.rl.network import QNetwork
from lbproxy.telemetry import Metrics


def least_in_flight_net(noise_seed: int | None = None) -> QNetwork:
    """Q_i = -in-flight_i through both hidden layers (spreads load like least-connections); with
    `noise_seed`, plus small random weights, so Q is no longer linear in the state."""
    net = QNetwork(FEATURE_DIM, MAX_BACKENDS, hidden=32)
    with torch.no_grad():
        if noise_seed is None:
            for p in net.parameters():
                p.zero_()
        else:
            torch.manual_seed(noise_seed)
            for p in net.parameters():
                p.mul_(0.3)
        for i in range(MAX_BACKENDS):
            net.body[0].weight[i, i * PER_BACKEND_FEATURES] += 1.0
            net.body[0].bias[i] += 0.5  # keep the ReLUs open
            net.body[2].weight[i, i] += 1.0
            net.head.weight[i, i] -= 1.0
    return net


def runtime(net: QNetwork, metrics: Metrics | None = None) -> DqnRuntime:
    settings = Settings(mode="serve", device="cpu", decision_deadline_us=1e6)
    return create_dqn_runtime(settings, None, metrics, net=net)


def exact_choice(net: QNetwork, view: ClusterView, req_class: int) -> int:
    """What the network says for the view as it is now (one forward pass per decision)."""
    with torch.inference_mode():
        q = net(torch.from_numpy(encode_state(view, req_class)))[: view.n]
    allowed = torch.full_like(q, float("-inf"))
    allowed[view.candidates] = 0.0
    return int((q + allowed).argmax())


async def test_one_pass_per_iteration_and_no_herding() -> None:
    metrics = Metrics()
    net = least_in_flight_net()
    rt = runtime(net, metrics)
    view = ClusterView.create(4)
    chosen = []
    for _ in range(12):  # one loop iteration: no await in between
        action, _did = await resolve(rt.policy.decide(0, view, now_s=0.0))
        assert action == exact_choice(net, view, 0), "the network is linear in in-flight: first order is exact"
        view.on_dispatch(action)
        chosen.append(action)
    assert sorted(chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], "each dispatch is seen by the next decision"
    await asyncio.sleep(0)  # the iteration ends
    rt.update_gauges()
    assert rt.engine.passes == 1
    assert metrics.registry.get_sample_value("lbproxy_inference_batch_size_sum") == 12


async def test_the_first_dispatch_of_an_iteration_is_seen_exactly() -> None:
    """With a non-linear network the correction is first order: exact for the first dispatch, which is
    what makes the second decision of an iteration the one the network would take on the live view."""
    moved = 0
    for seed in range(40):
        net = least_in_flight_net(noise_seed=seed)
        rt = runtime(net)
        rng = np.random.default_rng(seed)
        view = ClusterView.create(4, rng.uniform(0.5, 2.0, 4).tolist())
        for _ in range(int(rng.integers(0, 12))):
            view.on_dispatch(int(rng.integers(0, 4)))
        req_class = int(rng.integers(0, 3))
        first, _ = await resolve(rt.policy.decide(req_class, view, now_s=0.0))
        assert first == exact_choice(net, view, req_class)
        view.on_dispatch(first)
        second, _ = await resolve(rt.policy.decide(req_class, view, now_s=0.0))
        assert second == exact_choice(net, view, req_class)
        moved += second != first
        await asyncio.sleep(0)
    assert moved > 5, "the dispatches changed the answer often enough for this to test something"


async def test_a_new_iteration_sees_what_completed_meanwhile() -> None:
    net = least_in_flight_net()
    rt = runtime(net)
    view = ClusterView.create(2)
    for _ in range(3):
        view.on_dispatch(0)
    view.on_dispatch(1)
    assert (await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] == 1
    view.on_dispatch(1)
    for _ in range(3):  # backend 0 drains; within this iteration the snapshot does not see it
        view.on_complete(Outcome(0, 0, 0.01, False), now_s=0.01)
    await asyncio.sleep(0)
    assert (await resolve(rt.policy.decide(0, view, now_s=0.02)))[0] == 0


async def test_health_change_within_an_iteration_is_respected() -> None:
    rt = runtime(least_in_flight_net())
    view = ClusterView.create(3)
    view.on_dispatch(1)
    view.on_dispatch(2)
    assert (await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] == 0
    view.set_available(0, False)  # same iteration: the snapshot is rebuilt for the new candidates
    got = {(await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] for _ in range(10)}
    assert 0 not in got


async def test_new_weights_reach_the_next_iteration() -> None:
    rt = runtime(least_in_flight_net())
    view = ClusterView.create(3)
    assert (await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] == 0
    biased = copy.deepcopy(least_in_flight_net())
    with torch.no_grad():
        biased.head.bias[2] = 10.0
    rt.engine.publish(rt.engine.prepare(biased.state_dict()))
    await asyncio.sleep(0)
    got = [(await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] for _ in range(3)]
    assert got == [2, 2, 2], "a bias of 10 outweighs three dispatches (1/8 each)"


async def test_learning_records_the_state_each_decision_was_taken_in() -> None:
    settings = Settings(mode="train", device="cpu", hidden=16, eps_start=0.0, eps_end=0.0, learning_starts=10**6)
    rt = create_dqn_runtime(settings, None, None, train=True, net=least_in_flight_net(), total_decisions=100)
    view = ClusterView.create(3)
    expected = []
    for _ in range(4):
        expected.append(encode_state(view, 2))
        action, did = await resolve(rt.policy.decide(2, view, now_s=0.0))
        view.on_dispatch(action)
        rec = rt.policy.table.pop(did) if rt.policy.table is not None else None
        assert rec is not None
        np.testing.assert_array_equal(rec.state, expected[-1])
    rt.engine.close()


async def test_max_batch_bounds_the_decisions_one_pass_answers() -> None:
    settings = Settings(mode="serve", device="cpu", decision_deadline_us=1e6, max_batch=4)
    net = least_in_flight_net()
    rt = create_dqn_runtime(settings, None, None, net=net)
    view = ClusterView.create(3)
    classes = [0] + [1] * 10 + [0] * 3  # class 1's snapshot is replaced while class 0's stays live
    for req_class in classes:
        action, _ = await resolve(rt.policy.decide(req_class, view, now_s=0.0))
        assert action == exact_choice(net, view, req_class)
        view.on_dispatch(action)
    await asyncio.sleep(0)
    assert (rt.engine.passes, rt.engine.decisions) == (4, 14), "class 0: one pass of 4; class 1: 4, 4 and 2"
