"""The live dqn policy: one pass per loop iteration and request class, decisions that see the
iteration's own dispatches exactly, and a state that is fresh every iteration. Inline (NumPy on the
loop) and off-loop (the CUDA path's plumbing, run on CPU by the `thread` backend)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from gated_engine import GatedEngine
from nets import column_net

from lbproxy.config import Settings
from lbproxy.observe import F_LOG_IN_FLIGHT, MAX_BACKENDS, ClusterView, Outcome, encode_state
from lbproxy.policies.dqn import DqnPolicy
from lbproxy.policies.dqn_runtime import DqnRuntime, create_dqn_runtime
from lbproxy.policy import resolve
from lbproxy.rl.network import QNetwork
from lbproxy.rl.online import BackgroundLearner
from lbproxy.telemetry import Metrics


def least_in_flight_net(noise_seed: int | None = None) -> QNetwork:
    """Score = -log1p(in-flight) (spreads load like least-connections); with `noise_seed`, plus random
    weights of the same order, so the score is a non-linear function of every feature."""
    net = QNetwork(hidden=32)
    with torch.no_grad():
        if noise_seed is None:
            for p in net.parameters():
                p.zero_()
        else:
            torch.manual_seed(noise_seed)
            for p in net.parameters():
                p.mul_(2.0)
        net.row_x.weight[0, F_LOG_IN_FLIGHT] += 1.0
        net.row_x.bias[0] += 0.5  # keep the ReLU open
        net.row2.weight[0, 0] += 1.0
        net.score.weight[0, 0] -= 1.0
    return net


def runtime(net: QNetwork, metrics: Metrics | None = None, **kw: object) -> DqnRuntime:
    kw.setdefault("control_share", 0.0)  # these tests check the DQN's own decisions: no control arm
    settings = Settings(mode="serve", device="cpu", decision_deadline_us=1e6, **kw)  # type: ignore[arg-type]
    return create_dqn_runtime(settings, None, metrics, net=net)


def exact_scores(net: QNetwork, view: ClusterView, req_class: int) -> np.ndarray:
    """What the network says for the view as it is now (one full forward pass), -inf off the candidates."""
    with torch.inference_mode():
        q = net(torch.from_numpy(encode_state(view, req_class, 0.0, MAX_BACKENDS))[None])[0, : view.n].numpy()
    out = np.full(view.n, -np.inf)
    out[view.candidates] = q[view.candidates]
    return out


def exact_choice(net: QNetwork, view: ClusterView, req_class: int) -> int:
    return int(exact_scores(net, view, req_class).argmax())


def is_exact(net: QNetwork, view: ClusterView, req_class: int, action: int) -> bool:
    """The action is the best one of a full forward pass on the live view (ties within float noise)."""
    q = exact_scores(net, view, req_class)
    return bool(q[action] >= q.max() - 1e-4)


async def test_one_pass_per_iteration_and_no_herding() -> None:
    metrics = Metrics()
    net = least_in_flight_net()
    rt = runtime(net, metrics)
    view = ClusterView.create(4)
    chosen = []
    for _ in range(12):  # one loop iteration: no await in between
        action, _did = await resolve(rt.policy.decide(0, view, now_s=0.0))
        assert action == exact_choice(net, view, 0)
        view.on_dispatch(action)
        chosen.append(action)
    assert sorted(chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], "each dispatch is seen by the next decision"
    await asyncio.sleep(0)  # the iteration ends
    rt.update_gauges()
    assert rt.engine.passes == 1
    assert metrics.registry.get_sample_value("lbproxy_inference_batch_size_sum") == 12


@pytest.mark.parametrize("seed", range(12))
async def test_every_decision_of_an_iteration_is_the_networks_on_the_live_view(seed: int) -> None:
    """A non-linear network, a cluster with history, a whole iteration of decisions (the same backend
    is often chosen several times, which needs further what-if rows): each decision is the one a full
    forward pass of the view at that moment takes. The re-score of one row per dispatch is exact."""
    net = least_in_flight_net(noise_seed=seed)
    rt = runtime(net)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    view = ClusterView.create(n)
    for k in range(20 * n):
        i = int(rng.integers(n))
        view.on_dispatch(i)
        st = 0.005 * (1 + i)
        view.on_complete(Outcome(i, k % 3, st * (1 + rng.random()), False, -1, st, int(rng.integers(4))), 0.0)
    for _ in range(int(rng.integers(0, 3 * n))):
        view.on_dispatch(int(rng.integers(n)))
    repeats = 0
    for iteration in range(2):  # the second iteration's pass scores what-if rows up front (LOOKAHEAD_ROWS)
        last = -1
        for _ in range(30):
            req_class = int(rng.integers(0, 3))
            action, _ = await resolve(rt.policy.decide(req_class, view, now_s=0.0))
            assert is_exact(net, view, req_class, action)
            repeats += action == last
            last = action
            view.on_dispatch(action)
        await asyncio.sleep(0)
        if iteration == 0:
            assert rt.policy.iteration.demand > 0, "the next pass is sized from this iteration's dispatches"
    assert repeats > 0 or n > 6, "the same backend twice in a row happens (the extension path is exercised)"
    rt.engine.close()


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
    assert (await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] != 0
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
    view.on_dispatch(0)
    busiest = column_net(F_LOG_IN_FLIGHT, 1.0, hidden=32)  # prefers the busiest backend
    rt.engine.publish(rt.engine.prepare(busiest.state_dict()))
    await asyncio.sleep(0)
    got = [(await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] for _ in range(3)]
    for action in got:
        view.on_dispatch(action)
    assert got == [0, 0, 0]


@pytest.mark.parametrize("classes", [[2] * 5, [2, 0, 0, 2, 1, 2, 0]], ids=["one class", "classes mixed"])
async def test_learning_records_the_state_each_decision_was_taken_in(classes: list[int]) -> None:
    """Within one loop iteration each class decides from its own snapshot, which every dispatch (of
    any class) moves: each record holds the state the view was in at its decision."""
    settings = Settings(
        mode="train", device="cpu", hidden=32, eps_start=0.0, eps_end=0.0, learning_starts=10**6, control_share=0.0
    )
    rt = create_dqn_runtime(settings, None, None, train=True, net=least_in_flight_net(), total_decisions=100)
    view = ClusterView.create(3)
    kept = []
    for c in classes:  # one loop iteration: one snapshot per class, moved by each dispatch
        expected = encode_state(view, c, 0.0, rt.policy.width)
        action, did = await resolve(rt.policy.decide(c, view, now_s=0.0))
        view.on_dispatch(action)
        rec = rt.policy.join.table.pop(did) if rt.policy.join is not None else None
        assert rec is not None
        np.testing.assert_allclose(rec.state, expected, atol=1e-6)
        kept.append((rec.state, expected))
    for state, expected in kept:  # later dispatches never wrote into an earlier record's state
        np.testing.assert_allclose(state, expected, atol=1e-6)
    rt.engine.close()


async def test_safe_exploration_routes_like_the_fallback() -> None:
    """ε = 1 (live training's start): every decision is the fallback heuristic's (P2C on peak-EWMA),
    never a uniformly random backend, and it is recorded for learning like any other."""
    from lbproxy.policies import make_policy

    settings = Settings(mode="train", device="cpu", hidden=32, eps_start=1.0, eps_end=1.0, seed=3, control_share=0.0)
    rt = create_dqn_runtime(settings, None, None, train=True, net=least_in_flight_net(), total_decisions=100)
    twin = make_policy("peak_ewma", 3)
    view, twin_view = ClusterView.create(4), ClusterView.create(4)
    for v in (view, twin_view):
        v.on_dispatch(0)
        v.on_complete(Outcome(0, 0, 2.0, False), now_s=1.0)  # backend 0 looks very slow to peak-EWMA
    for _ in range(40):
        action, did = await resolve(rt.policy.decide(0, view, now_s=1.0))
        assert action == twin.choose(0, twin_view, 1.0)
        assert rt.policy.join is not None and rt.policy.join.table.pop(did) is not None
        view.on_dispatch(action)
        twin_view.on_dispatch(action)
    assert rt.policy.explored == 40
    rt.engine.close()


async def test_max_batch_bounds_the_decisions_one_pass_answers() -> None:
    net = least_in_flight_net()
    rt = runtime(net, max_batch=4)
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
    engine = GatedEngine(MAX_BACKENDS, cpu_backend="thread", deadline_s=deadline_s, device=device)
    engine.load_network(net)
    assert not engine.inline
    return DqnPolicy(engine, metrics=metrics, width=MAX_BACKENDS)


async def routed(
    policy: DqnPolicy, net: QNetwork, view: ClusterView, req_class: int, log: list[tuple[int, int]]
) -> None:
    """One request as the proxy makes it: decide, then dispatch. Logs (decision, what one exact pass
    on the view at that moment says)."""
    action, _ = await resolve(policy.decide(req_class, view, now_s=0.0))
    log.append((action, action if is_exact(net, view, req_class, action) else exact_choice(net, view, req_class)))
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
        assert [a for a, _ in log] == [e for _, e in log], "every decision is exact"
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
    for _ in range(3):
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
    settings = Settings(mode="train", device="auto", hidden=32)
    rt = create_dqn_runtime(settings, None, None, train=True, total_decisions=100)
    try:
        assert rt.engine.inline, "live inference stays on the loop"
        assert isinstance(rt.learner, BackgroundLearner) and torch.device(rt.learner.device).type == "cuda"
    finally:
        rt.engine.close()


# --- the guardrail's control arm ------------------------------------------------------------------------
async def test_control_arm_routes_a_share_by_the_fallback_and_tells_the_guardrail() -> None:
    """5 % of decisions go to the control arm (the fallback's choice, id CONTROL_ARM when serving),
    their outcomes are recorded in the control window and the rest in the DQN's; a tripped guardrail
    routes all but its probe share by the fallback."""
    from lbproxy.policies.dqn import CONTROL_ARM

    rt = runtime(least_in_flight_net(), control_share=0.05)
    policy = rt.policy
    guard = policy.guardrail
    assert guard is not None
    view = ClusterView.create(3)
    control = 0
    for k in range(4000):
        action, did = await resolve(policy.decide(k % 3, view, now_s=0.0))
        control += did == CONTROL_ARM
        view.on_dispatch(action)
        out = Outcome(action, k % 3, 0.01, False, did)
        view.on_complete(out, 0.001 * k)
        policy.observe(out, view, 0.001 * k)
        if k % 16 == 0:
            await asyncio.sleep(0)
    assert 120 <= control <= 290, control  # 5 % of 4000 = 200
    windows = [[len(arm.values) for arm in pair] for pair in guard._windows]
    assert sum(w[1] for w in windows) == control and sum(w[0] for w in windows) == 4000 - control
    guard._switch(True, 4.0)  # as evaluate() does when the DQN arm is worse
    routed = [(await resolve(policy.decide(0, view, now_s=4.0)))[1] for _ in range(1000)]
    assert 975 <= routed.count(CONTROL_ARM) <= 999, "all but the 1 % probe share by the fallback"
    rt.engine.close()
