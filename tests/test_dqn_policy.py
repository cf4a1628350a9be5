"""The live dqn policy: one pass per loop iteration and request class, decisions that see the
iteration's own dispatches, and a state that is fresh every iteration. Inline (NumPy on the loop) and
off-loop (the CUDA path's plumbing, run on CPU by the `thread` backend)."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from gated_engine import GatedEngine

from lbproxy.config import Settings
from lbproxy.observe import FEATURE_DIM, MAX_BACKENDS, PER_BACKEND_FEATURES, ClusterView, Outcome, encode_state
from lbproxy.policies.base import resolve
from lbproxy.policies.dqn import DqnPolicy, DqnRuntime, create_dqn_runtime
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


# --- off-loop: passes in a device thread (CUDA; `thread` runs the same machinery on CPU) ------------------
def off_loop_policy(
    net: QNetwork, metrics: Metrics | None = None, deadline_s: float | None = None, device: str = "cpu"
) -> DqnPolicy:
    engine = GatedEngine(FEATURE_DIM, MAX_BACKENDS, cpu_backend="thread", deadline_s=deadline_s, device=device)
    engine.load_network(net)
    assert not engine.inline
    return DqnPolicy(engine, metrics=metrics)


async def routed(
    policy: DqnPolicy, net: QNetwork, view: ClusterView, req_class: int, log: list[tuple[int, int]]
) -> None:
    """One request as the proxy makes it: decide, then dispatch. Logs (decision, what one exact pass
    on the view at that moment says)."""
    action, _ = await resolve(policy.decide(req_class, view, now_s=0.0))
    log.append((action, exact_choice(net, view, req_class)))
    view.on_dispatch(action)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
async def test_off_loop_iteration_is_one_snapshot_and_does_not_herd(device: str) -> None:
    net = least_in_flight_net()
    policy = off_loop_policy(net, device=device)
    view = ClusterView.create(4)
    log: list[tuple[int, int]] = []
    try:
        await asyncio.gather(*(routed(policy, net, view, 0, log) for _ in range(12)))
        assert [a for a, _ in log] == [e for _, e in log], "linear network: the correction is exact"
        assert sorted(a for a, _ in log) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        await asyncio.sleep(0)
        assert (policy.engine.passes, policy.engine.decisions) == (1, 12)
    finally:
        policy.engine.close()


async def test_off_loop_passes_in_flight_see_each_others_dispatches() -> None:
    """While the device is busy, later iterations queue their own snapshots (taken before the earlier
    requests were dispatched); each lands with the dispatches made meanwhile applied."""
    net = least_in_flight_net()
    policy = off_loop_policy(net)
    engine = policy.engine
    assert isinstance(engine, GatedEngine)
    view = ClusterView.create(4)
    for b in (0, 0, 0, 2):
        view.on_dispatch(b)
    log: list[tuple[int, int]] = []
    try:
        engine.gate.clear()
        tasks = []
        for batch, req_class in ((3, 0), (5, 1), (4, 0)):  # three loop iterations, one snapshot each
            tasks += [asyncio.ensure_future(routed(policy, net, view, req_class, log)) for _ in range(batch)]
            await asyncio.sleep(0.005)  # the first pass is in the device thread, the others queue
        assert log == [], "nothing is decided while the device is busy"
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5.0)
        assert len(log) == 12
        assert [a for a, _ in log] == [e for _, e in log]
        assert view.in_flight == [4, 4, 4, 4]
    finally:
        engine.gate.set()
        engine.close()


async def test_off_loop_late_pass_falls_back_and_counts() -> None:
    metrics = Metrics()
    net = least_in_flight_net()
    policy = off_loop_policy(net, metrics, deadline_s=0.002)
    engine = policy.engine
    assert isinstance(engine, GatedEngine)
    view = ClusterView.create(2)
    view.on_dispatch(1)
    view.on_complete(Outcome(backend=1, req_class=0, latency_s=5.0, error=False), now_s=1.0)  # peak_ewma: 0
    view.on_dispatch(0)  # the network: 1
    log: list[tuple[int, int]] = []
    try:
        engine.gate.clear()
        await asyncio.wait_for(asyncio.gather(*(routed(policy, net, view, 0, log) for _ in range(3))), timeout=5.0)
        assert [a for a, _ in log] == [0, 0, 0], "peak_ewma answered, not the stalled network"
        assert metrics.registry.get_sample_value("lbproxy_decision_fallbacks_total", {"reason": "deadline"}) == 3
    finally:
        engine.gate.set()
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_learns_on_the_gpu_and_decides_inline() -> None:
    settings = Settings(mode="train", device="auto", hidden=16)
    rt = create_dqn_runtime(settings, None, None, train=True, total_decisions=100)
    try:
        assert rt.engine.inline, "live inference stays on the loop"
        assert rt.core is not None and rt.core.device.type == "cuda"
    finally:
        rt.engine.close()
