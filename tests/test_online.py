"""The live reward join through the dqn runtime, and the background learner thread and process."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lbproxy.config import Settings
from lbproxy.observe import C_CLASS, ROW_FEATURES, ClusterView, Outcome, action_mask, encode_state, reward
from lbproxy.policies.dqn_runtime import create_dqn_runtime
from lbproxy.policy import resolve
from lbproxy.rl.network import QNetwork
from lbproxy.rl.online import BackgroundLearner
from lbproxy.telemetry import Metrics
from lbproxy.train.run_dir import ERROR_LOG, RunDir


def small_settings(**kw: object) -> Settings:
    base: dict[str, object] = {
        "mode": "train",
        "device": "cpu",
        "hidden": 16,
        "gamma": 0.5,
        "batch_size": 8,
        "learning_starts": 16,
        "updates_per_decision": 0.2,
        "weight_sync_every": 4,
        "buffer_size": 1000,
        "eps_start": 0.0,
        "eps_end": 0.0,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


async def test_reward_join_builds_the_right_transition() -> None:
    view = ClusterView.create(3)
    rt = create_dqn_runtime(small_settings(), view, None, train=True, total_decisions=1000)
    policy = rt.policy
    width = rt.policy.width
    state_before = encode_state(view, 1, 0.0, width)
    action, did = await resolve(policy.decide(1, view, now_s=0.0))
    assert did >= 0 and action in view.candidates
    # The pool dispatches, then completes and updates the view BEFORE observe.
    view.on_dispatch(action)
    out = Outcome(backend=action, req_class=1, latency_s=0.25, error=False, decision_id=did)
    view.on_complete(out, now_s=0.3)
    policy.observe(out, view, now_s=0.3)
    assert rt.learner is not None
    replay = rt.learner.replay
    assert len(replay) == 0, "joined at the end of the loop iteration"
    await asyncio.sleep(0)
    assert len(replay) == 1
    s = replay.sample(1)
    np.testing.assert_allclose(s.obs[0].numpy(), state_before)
    assert int(s.actions.reshape(-1)[0]) == action
    assert float(s.rewards.reshape(-1)[0]) == pytest.approx(reward(0.25, False, view.typical_all_s, 50.0))
    np.testing.assert_allclose(s.next_obs[0].numpy(), encode_state(view, 1, 0.3, width))
    assert s.next_mask[0].numpy().astype(bool).tolist() == action_mask(view, width).tolist()
    # A second outcome for the same id (or an unknown id) adds nothing.
    policy.observe(out, view, now_s=0.4)
    policy.observe(Outcome(backend=0, req_class=0, latency_s=0.1, error=True, decision_id=12345), view, 0.4)
    await asyncio.sleep(0)
    assert len(replay) == 1
    rt.engine.close()


async def test_one_iterations_outcomes_join_together_with_the_state_after_them() -> None:
    """Outcomes of one loop iteration enter the replay together, each class's s' encoded once from
    the view after all of them (the state the next decisions start from); a later iteration's
    outcome gets the view of its own iteration. Nothing joined is lost when the runtime stops."""
    view = ClusterView.create(3)
    rt = create_dqn_runtime(small_settings(), view, None, train=True, total_decisions=1000)
    assert rt.learner is not None
    policy, replay = rt.policy, rt.learner.replay
    routed = []
    for req_class in (0, 2, 0, 0):
        action, did = await resolve(policy.decide(req_class, view, now_s=0.0))
        view.on_dispatch(action)
        routed.append((req_class, action, did))
    await asyncio.sleep(0)
    for req_class, action, did in routed[:3]:  # one iteration: three completions, two classes
        out = Outcome(backend=action, req_class=req_class, latency_s=0.1, error=False, decision_id=did)
        view.on_complete(out, now_s=0.1)
        policy.observe(out, view, now_s=0.1)
    width = policy.width
    after = {c: encode_state(view, c, 0.1, width) for c in (0, 2)}
    await asyncio.sleep(0)
    assert len(replay) == 3
    got = {(int(replay.actions[i]), tuple(replay.obs[i])): replay.next_obs[i] for i in range(3)}
    assert sorted(int(replay.actions[i]) for i in range(3)) == sorted(a for _c, a, _d in routed[:3])
    for i in range(3):
        c = int(np.argmax(replay.obs[i][width * ROW_FEATURES + C_CLASS : width * ROW_FEATURES + C_CLASS + 3]))
        np.testing.assert_array_equal(replay.next_obs[i], after[c])
    assert len(got) == 3
    req_class, action, did = routed[3]
    out = Outcome(backend=action, req_class=req_class, latency_s=0.2, error=False, decision_id=did)
    view.on_complete(out, now_s=0.2)
    policy.observe(out, view, now_s=0.2)
    await rt.stop()  # flushes what the last iteration joined
    assert len(replay) == 4
    np.testing.assert_array_equal(replay.next_obs[3], encode_state(view, 0, 0.2, width))
    assert not np.array_equal(replay.next_obs[3], after[0])


async def test_error_outcome_is_penalised() -> None:
    view = ClusterView.create(2)
    rt = create_dqn_runtime(small_settings(), view, None, train=True, total_decisions=1000)
    action, did = await resolve(rt.policy.decide(0, view, now_s=0.0))
    view.on_dispatch(action)
    out = Outcome(backend=action, req_class=0, latency_s=0.05, error=True, decision_id=did)
    view.on_complete(out, 0.05)
    rt.policy.observe(out, view, 0.05)
    await asyncio.sleep(0)
    assert rt.learner is not None
    s = rt.learner.replay.sample(1)
    assert float(s.rewards.reshape(-1)[0]) == pytest.approx(reward(0.05, True, view.typical_all_s, 50.0))
    rt.engine.close()


def owed(lrn: BackgroundLearner) -> int:
    """Updates the learner owes now (before the debt cap)."""
    p = lrn.pacer
    return int(lrn.fed * p.ratio) - p.consumed - p.forgiven


async def test_background_learner_updates_and_publishes_weights() -> None:
    """Real learner thread: decisions earn updates, updates run, new weights reach the engine (every
    update publishes here, so after the last one the engine holds the learner's final weights)."""
    view = ClusterView.create(2)
    rt = create_dqn_runtime(small_settings(weight_sync_every=1), view, None, train=True, total_decisions=1000)
    await rt.start()
    try:
        version0 = rt.engine.version
        lrn = rt.learner
        assert isinstance(lrn, BackgroundLearner)
        n = 0
        for _chunk in range(10):  # 10 bursts of 20 decisions, letting the learner catch up between them
            for _ in range(20):
                a, did = await resolve(rt.policy.decide(n % 3, view, now_s=n * 0.01))
                view.on_dispatch(a)
                out = Outcome(backend=a, req_class=n % 3, latency_s=0.01 + 0.1 * a, error=False, decision_id=did)
                view.on_complete(out, n * 0.01 + 0.005)
                rt.policy.observe(out, view, n * 0.01 + 0.005)
                n += 1
            await asyncio.sleep(0)  # the loop iteration ends: its outcomes join the replay
            deadline = time.monotonic() + 10.0
            pacer = lrn.pacer
            while owed(lrn) > 0 and len(lrn.replay) >= pacer.learning_starts and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        assert lrn.error is None
        # 0.2 updates per decision over 200 decisions, less what fell in the 16-transition warm-up.
        assert 30 <= lrn.updates <= 40
        assert rt.engine.version > version0, "weights were published to the inference engine"
    finally:
        await rt.stop()
    assert "lbproxy-learner" not in {t.name for t in threading.enumerate()}
    # The engine answers exactly as the learner's online network does.
    for _ in range(3):
        await asyncio.sleep(0)
    state = encode_state(view, 0, 3.0, rt.policy.width)
    rows = state[: view.n * ROW_FEATURES].reshape(view.n, ROW_FEATURES)
    passed = rt.engine.inline_pass(rows, state[rt.policy.width * ROW_FEATURES :], rows[:0])
    assert passed is not None
    with torch.inference_mode():
        expected = lrn.learner.online(torch.from_numpy(state)[None])[0, : view.n].numpy()
    np.testing.assert_allclose(passed[1] - passed[1][0], expected - expected[0], atol=1e-4)


async def test_training_from_scratch_routes_by_the_fallback_until_the_first_published_update() -> None:
    """A network no update has touched routes at random: from scratch, every exploiting decision goes
    to the fallback (counted as no_model) and is still recorded for learning, until the learner
    publishes its first weights; from then on the network routes. With --init-model it routes at once."""
    view = ClusterView.create(2)
    metrics = Metrics()
    rt = create_dqn_runtime(
        small_settings(weight_sync_every=1, control_share=0.0), view, metrics, train=True, total_decisions=1000
    )
    lrn = rt.learner
    assert isinstance(lrn, BackgroundLearner)
    assert not rt.engine.has_model
    await rt.start()
    try:
        n = 0
        deadline = time.monotonic() + 20.0
        while not rt.engine.has_model and time.monotonic() < deadline:
            a, did = await resolve(rt.policy.decide(n % 3, view, now_s=n * 0.01))
            assert did >= 0, "decisions routed by the fallback are recorded for learning too"
            view.on_dispatch(a)
            out = Outcome(backend=a, req_class=n % 3, latency_s=0.01 + 0.1 * a, error=False, decision_id=did)
            view.on_complete(out, n * 0.01 + 0.005)
            rt.policy.observe(out, view, n * 0.01 + 0.005)
            n += 1
            await asyncio.sleep(0.001 if len(lrn.replay) >= lrn.pacer.learning_starts else 0)
        assert rt.engine.has_model and lrn.updates >= 1
        assert rt.policy.fallback_counts["no_model"] == n >= lrn.pacer.learning_starts
        before = rt.policy.fallback_counts["no_model"]
        for k in range(5):
            await resolve(rt.policy.decide(0, view, now_s=10.0 + k))
            await asyncio.sleep(0)
        assert rt.policy.fallback_counts["no_model"] == before, "the published network routes"
    finally:
        await rt.stop()
    init = create_dqn_runtime(small_settings(), view, None, train=True, net=QNetwork(16), total_decisions=1000)
    assert init.engine.has_model, "--init-model: the given network routes from the first request"
    init.engine.close()


@pytest.mark.slow
async def test_process_learner_updates_and_publishes_weights() -> None:
    """`--learner-process`: shared-memory replay in, weights back through the double buffer."""
    view = ClusterView.create(2)
    rt = create_dqn_runtime(small_settings(learner_process=True), view, None, train=True, total_decisions=1000)
    await rt.start()
    try:
        version0 = rt.engine.version
        lrn = rt.learner
        assert lrn is not None
        for n in range(200):
            a, did = await resolve(rt.policy.decide(n % 3, view, now_s=n * 0.01))
            view.on_dispatch(a)
            out = Outcome(backend=a, req_class=n % 3, latency_s=0.01 + 0.1 * a, error=False, decision_id=did)
            view.on_complete(out, n * 0.01 + 0.005)
            rt.policy.observe(out, view, n * 0.01 + 0.005)
        deadline = time.monotonic() + 25.0  # includes the child's torch import
        while (lrn.updates < 20 or rt.engine.version <= version0) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert lrn.error is None
        assert 20 <= lrn.updates <= 40
        assert rt.engine.version > version0
        # The child may still be spending its update budget (200 decisions x 0.2 = 40) meanwhile.
        before = lrn.updates
        snap = await asyncio.to_thread(lrn.snapshot)
        assert before <= int(snap["updates"]) <= lrn.updates
    finally:
        await rt.stop()
    assert not multiprocessing.active_children()


def test_a_dead_learner_is_reported_once_where_the_runtime_reports(tmp_path: Path) -> None:
    """Live training points the runtime's report at its run's error log (lbproxy/train/live.py)."""
    rt = create_dqn_runtime(small_settings(), ClusterView.create(2), None, train=True, total_decisions=100)
    log = RunDir(tmp_path).log
    rt.report = log.error
    assert rt.learner is not None and not rt.check_learner()
    rt.learner.error = RuntimeError("injected learner fault")
    assert rt.check_learner() and rt.check_learner()
    lines = (tmp_path / ERROR_LOG).read_text().splitlines()
    assert len(lines) == 1 and "ERROR lbproxy: learner stopped (RuntimeError: injected learner fault)" in lines[0]
    rt.engine.close()


async def test_training_workers_run_one_epsilon_schedule_on_their_decisions_together(tmp_path: Path) -> None:
    """`--mode train --workers N` (lbproxy/train/live_workers.py): each worker writes its decision count
    in its slot and puts ε at the run's start plus every slot's count; a restarted worker counts on
    from its predecessor's. The shared learner is made, not started: only its blocks are used here."""
    from lbproxy.policies.dqn_parts import epsilon_schedule, shared_learner_host
    from lbproxy.rl.shared_replay import H_EPISODE, S_DECISIONS, Attachment

    settings = small_settings(eps_start=1.0, eps_end=0.0, eps_fraction=1.0)
    host = shared_learner_host(settings, 2, str(tmp_path), 0)
    schedule = epsilon_schedule(settings, 1000)
    view = ClusterView.create(2)

    async def worker(slot: int, decisions: int) -> Any:
        rt = create_dqn_runtime(
            settings,
            None,
            Metrics(),
            train=True,
            total_decisions=1000,
            epsilon_start_step=100,
            attach=Attachment(host.shm.names, host.layout, slot),
        )
        await rt.start()
        for n in range(decisions):
            await resolve(rt.policy.decide(n % 3, view, now_s=n * 0.01))
        return rt

    try:
        host.shm.arrays["head"][H_EPISODE] = 7
        a = await worker(0, 30)
        b = await worker(1, 20)
        a.sync_training()  # what the gauge task does once a second: a's 30 are in its slot now
        assert a.policy.explorer is not None and a.policy.explorer.step == 100 + 30
        b.sync_training()
        assert b.policy.explorer is not None and b.policy.explorer.step == 100 + 30 + 20
        assert b.policy.epsilon == pytest.approx(schedule.value(150))
        assert b.metrics is not None and b.metrics.registry.get_sample_value("lbproxy_episode") == 7  # the supervisor's
        a.sync_training()
        assert a.policy.explorer.step == 150
        await a.stop()
        successor = await worker(0, 5)  # worker 0 restarted: its predecessor's 30 still count
        successor.sync_training()
        assert successor.policy.explorer is not None and successor.policy.explorer.step == 100 + 35 + 20
        for rt in (b, successor):
            await rt.stop()
        assert int(host.shm.arrays["slots"][:, S_DECISIONS].sum()) == 55
    finally:
        from multiprocessing import resource_tracker

        for name in host.shm.names.values():  # the workers' attach took the names off THIS process's tracker
            resource_tracker.register("/" + name, "shared_memory")
        host.close()
