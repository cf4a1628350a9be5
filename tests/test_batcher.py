"""The inference engine: batching correctness under concurrency, weight swaps, deadlines, CUDA graphs."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from gated_engine import GatedEngine

from lbproxy.observe import FEATURE_DIM, MAX_BACKENDS
from lbproxy.rl.batcher import (
    DEADLINE_MISSED,
    InferenceEngine,
    _CudaRunner,
    numpy_masked_argmax,
    numpy_q,
    prepare_weights,
)
from lbproxy.rl.network import QNetwork, masked_argmax

OBS, ACT = FEATURE_DIM, MAX_BACKENDS


def make_net(seed: int, dueling: bool = False, hidden: int = 32) -> QNetwork:
    torch.manual_seed(seed)
    return QNetwork(OBS, ACT, hidden=hidden, dueling=dueling).eval()


def torch_actions(net: QNetwork, states: np.ndarray, masks: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return masked_argmax(net(torch.from_numpy(states)), torch.from_numpy(masks)).numpy()


def random_inputs(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(n, OBS)).astype(np.float32)
    masks = rng.random((n, ACT)) < 0.6
    masks[np.arange(n), rng.integers(0, ACT, n)] = True  # at least one valid action per row
    return states, masks


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, k: int) -> None:
        self.sizes.append(k)


@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_forward_matches_torch(dueling: bool) -> None:
    net = make_net(0, dueling)
    states, masks = random_inputs(64)
    w = prepare_weights(net.state_dict())
    with torch.inference_mode():
        q_torch = net(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(numpy_q(w, states), q_torch, rtol=1e-4, atol=1e-5)
    acts = numpy_masked_argmax(numpy_q(w, states), masks)
    assert masks[np.arange(64), acts].all()


@pytest.mark.parametrize("backend", ["numpy", "thread"])
async def test_concurrent_decisions_each_get_their_own_answer(backend: str) -> None:
    """Inline (numpy): each call is its own synchronous pass. Off-loop (thread, the CUDA path's
    plumbing): calls queue while a pass runs and share the next one, each still getting its own row's
    answer."""
    net = make_net(2)
    rec = Recorder()
    engine = InferenceEngine(OBS, ACT, max_batch=64, cpu_backend=backend, on_batch=rec)  # type: ignore[arg-type]
    engine.load_network(net)
    try:
        n = 1000
        states, masks = random_inputs(n, seed=3)
        expected = torch_actions(net, states, masks)
        results = await asyncio.gather(*(engine.decide(states[i], masks[i]) for i in range(n)))
        assert list(results) == expected.tolist()
        assert sum(rec.sizes) == n
        assert engine.passes == len(rec.sizes)
        if backend == "thread":
            assert max(rec.sizes) > 1, "concurrent requests must share forward passes"
            assert max(rec.sizes) <= 64, "a pass never exceeds max_batch"
        else:
            assert set(rec.sizes) == {1}
    finally:
        engine.close()


async def test_interleaved_arrivals_batch_and_stay_correct() -> None:
    """Requests arriving while others wait (staggered tasks) are still answered with their own action."""
    net = make_net(4)
    rec = Recorder()
    engine = InferenceEngine(OBS, ACT, max_batch=16, cpu_backend="thread", on_batch=rec)
    engine.load_network(net)
    states, masks = random_inputs(300, seed=5)
    expected = torch_actions(net, states, masks).tolist()

    async def one(i: int) -> int:
        for _ in range(i % 3):
            await asyncio.sleep(0)
        return await engine.decide(states[i], masks[i])

    try:
        assert await asyncio.gather(*(one(i) for i in range(300))) == expected
        assert max(rec.sizes) > 1
    finally:
        engine.close()


@pytest.mark.parametrize("backend", ["numpy", "thread"])
async def test_lone_call_runs_at_once_in_a_pass_of_one(backend: str) -> None:
    rec = Recorder()
    engine = InferenceEngine(OBS, ACT, max_batch=256, cpu_backend=backend, on_batch=rec)  # type: ignore[arg-type]
    net = make_net(6)
    engine.load_network(net)
    try:
        states, masks = random_inputs(1, seed=7)
        action = await engine.decide(states[0], masks[0])
        assert action == int(torch_actions(net, states, masks)[0])
        assert rec.sizes == [1]
        # And again: a second lone call does not wait for company either.
        await engine.decide(states[0], masks[0])
        assert rec.sizes == [1, 1]
    finally:
        engine.close()


def test_inline_q_values_match_torch_for_one_state_and_a_batch() -> None:
    net = make_net(7, dueling=True)
    engine = InferenceEngine(OBS, ACT)
    engine.load_network(net)
    states, _ = random_inputs(5, seed=8)
    with torch.inference_mode():
        expected = net(torch.from_numpy(states)).numpy()
    batch = engine.q_now(states)
    one = engine.q_now(states[2])
    assert batch is not None and one is not None
    np.testing.assert_allclose(batch, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one, expected[2], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="off-loop"):
        engine.submit(states[0], np.ones(ACT, dtype=bool))


async def test_masked_actions_never_chosen() -> None:
    engine = InferenceEngine(OBS, ACT)
    engine.load_network(make_net(8))
    states, _ = random_inputs(200, seed=9)
    mask = np.zeros(ACT, dtype=bool)
    mask[[3, 11]] = True
    got = await asyncio.gather(*(engine.decide(states[i], mask) for i in range(200)))
    assert set(got) <= {3, 11}


async def test_publish_is_visible_to_the_next_decision() -> None:
    engine = InferenceEngine(OBS, ACT)
    engine.load_network(make_net(10))
    state = np.zeros(OBS, dtype=np.float32)
    mask = np.ones(ACT, dtype=bool)
    for target in (5, 12, 0):
        # A network whose head makes `target` the best action for every state.
        net = make_net(11)
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.zero_()
            net.head.bias[target] = 1.0
        version = engine.version
        engine.publish(engine.prepare(net.state_dict()))
        assert engine.version == version + 1
        assert await engine.decide(state, mask) == target


async def test_torch_cpu_backend_agrees_with_numpy() -> None:
    net = make_net(12, dueling=True)
    a = InferenceEngine(OBS, ACT, cpu_backend="numpy")
    b = InferenceEngine(OBS, ACT, cpu_backend="torch")
    a.load_network(net)
    b.load_network(net)
    states, masks = random_inputs(100, seed=13)
    ra = await asyncio.gather(*(a.decide(states[i], masks[i]) for i in range(100)))
    rb = await asyncio.gather(*(b.decide(states[i], masks[i]) for i in range(100)))
    assert ra == rb == torch_actions(net, states, masks).tolist()


class SlowEngine(InferenceEngine):
    def q_values(self, states: np.ndarray) -> np.ndarray:
        time.sleep(0.003)
        return super().q_values(states)


@pytest.mark.parametrize("backend", ["numpy", "thread"])
async def test_late_answers_are_reported_as_deadline_missed(backend: str) -> None:
    engine = SlowEngine(OBS, ACT, deadline_s=0.0005, cpu_backend=backend)  # type: ignore[arg-type]
    engine.load_network(make_net(14))
    try:
        states, masks = random_inputs(4, seed=15)
        got = await asyncio.gather(*(engine.decide(states[i], masks[i]) for i in range(4)))
        assert got == [DEADLINE_MISSED] * 4
        if engine.inline:
            assert engine.q_now(states[0]) is None
    finally:
        engine.close()


def test_shape_mismatch_rejected() -> None:
    engine = InferenceEngine(OBS, 8)
    with pytest.raises(ValueError, match="n_actions=16"):
        engine.load_network(make_net(0))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_runner_layout_on_cpu() -> None:
    """The GPU runner's buffers, buckets, padding and output offsets, run eagerly on CPU tensors:
    actions alone, or Q-values beside them, for every bucket size and a partial bucket."""
    net = make_net(25, hidden=32)
    runner = _CudaRunner(net, 16, torch.device("cpu"))
    assert runner.buckets == [1, 2, 4, 8, 16] and not runner.graphs
    for k in (1, 3, 4, 5, 11, 16):
        states, masks = random_inputs(k, seed=40 + k)
        with torch.inference_mode():
            expected_q = net(torch.from_numpy(states)).numpy()
        actions, q = runner.run(states, masks, with_q=True)
        assert actions.tolist() == torch_actions(net, states, masks).tolist()
        assert q is not None and q.shape == (k, ACT)
        np.testing.assert_allclose(q, expected_q, rtol=1e-5, atol=1e-6)
        only, none = runner.run(states, masks)
        assert none is None and only.tolist() == actions.tolist()
    biased = make_net(26, hidden=32)
    with torch.no_grad():
        biased.head.bias.zero_()
        biased.head.weight.zero_()
        biased.head.bias[5] = 1.0
    runner.load(biased.state_dict())  # in place: the parameters a captured graph would read
    states, _ = random_inputs(3, seed=50)
    assert runner.run(states, np.ones((3, ACT), dtype=bool))[0].tolist() == [5, 5, 5]


@pytest.mark.gpu
@needs_cuda
async def test_cuda_graph_batches_match_eager_cpu() -> None:
    net = make_net(20, hidden=64)
    engine = InferenceEngine(OBS, ACT, max_batch=128, device="cuda")
    engine.load_network(net)
    try:
        for k in (1, 3, 64, 100, 128):
            states, masks = random_inputs(k, seed=k)
            assert engine.forward_sync(states, masks).tolist() == torch_actions(net, states, masks).tolist()
        states, masks = random_inputs(500, seed=21)
        got = await asyncio.gather(*(engine.decide(states[i], masks[i]) for i in range(500)))
        assert got == torch_actions(net, states, masks).tolist()
        # Q-value blocks (the dqn policy's snapshots) come back from the same packed output row.
        blocks = [engine.submit_q(states[i : i + 5]) for i in range(0, 50, 5)]
        with torch.inference_mode():
            expected_q = net(torch.from_numpy(states[:50])).numpy()
        for i, fut in enumerate(blocks):
            q = await fut
            assert q is not None
            np.testing.assert_allclose(q, expected_q[5 * i : 5 * i + 5], rtol=1e-3, atol=1e-4)
    finally:
        engine.close()


@pytest.mark.gpu
@needs_cuda
async def test_cuda_publish_reaches_captured_graphs() -> None:
    engine = InferenceEngine(OBS, ACT, max_batch=32, device="cuda")
    engine.load_network(make_net(22))
    try:
        states, masks = random_inputs(32, seed=23)
        masks[:] = True
        for target in (2, 9):
            net = make_net(24)
            with torch.no_grad():
                net.head.weight.zero_()
                net.head.bias.zero_()
                net.head.bias[target] = 1.0
            engine.publish(engine.prepare(net.state_dict()))
            for k in (1, 7, 32):  # different captured buckets
                assert set(engine.forward_sync(states[:k], masks[:k]).tolist()) == {target}
            assert await engine.decide(states[0], masks[0]) == target
    finally:
        engine.close()


async def test_threaded_path_batches_and_answers_correctly() -> None:
    """The off-loop pass (the CUDA path's plumbing, run on CPU): requests queue while a pass runs."""
    net = make_net(30)
    rec = Recorder()
    engine = InferenceEngine(OBS, ACT, max_batch=32, cpu_backend="thread", on_batch=rec)
    engine.load_network(net)
    try:
        states, masks = random_inputs(500, seed=31)
        got = await asyncio.gather(*(engine.decide(states[i], masks[i]) for i in range(500)))
        assert got == torch_actions(net, states, masks).tolist()
        assert max(rec.sizes) > 1 and max(rec.sizes) <= 32
    finally:
        engine.close()


async def test_stalled_threaded_pass_expires_running_and_queued_requests() -> None:
    engine = GatedEngine(OBS, ACT, cpu_backend="thread", deadline_s=0.001)
    engine.load_network(make_net(32))
    engine.gate.clear()  # the device stalls
    try:
        states, masks = random_inputs(6, seed=33)
        first = asyncio.ensure_future(engine.decide(states[0], masks[0]))
        await asyncio.sleep(0.0005)  # the first pass is now running in the worker
        rest = [engine.decide(states[i], masks[i]) for i in range(1, 6)]
        got = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=5.0)
        assert got == [DEADLINE_MISSED] * 6, "nobody waits for a stalled pass beyond ~2 deadlines"
    finally:
        engine.gate.set()
        engine.close()


async def test_q_value_blocks_and_decisions_share_passes_and_get_their_own_rows() -> None:
    """submit_q (the dqn policy's off-loop request: a snapshot and its dispatch rows) queues beside
    single decisions; each gets exactly its own rows back, and a pass holds at most max_batch rows."""
    net = make_net(34)
    rec = Recorder()
    engine = GatedEngine(OBS, ACT, max_batch=8, cpu_backend="thread", on_batch=rec)
    engine.load_network(net)
    try:
        states, masks = random_inputs(40, seed=35)
        blocks = [states[i : i + 3] for i in range(0, 12, 3)]
        q_futs = [engine.submit_q(b) for b in blocks]
        a_futs = [engine.submit(states[i], masks[i]) for i in range(12, 40)]
        qs = await asyncio.gather(*q_futs)
        actions = await asyncio.gather(*a_futs)
        with torch.inference_mode():
            expected_q = net(torch.from_numpy(states[:12])).numpy()
        for i, q in enumerate(qs):
            assert q is not None and q.shape == (3, ACT)
            np.testing.assert_allclose(q, expected_q[3 * i : 3 * i + 3], rtol=1e-5, atol=1e-5)
        assert actions == torch_actions(net, states[12:], masks[12:]).tolist()
        assert sum(rec.sizes) == 28, "only single decisions are accounted by the engine"
        assert sum(engine.rows) == 40 and max(engine.rows) <= 8, engine.rows
        with pytest.raises(ValueError, match="rows"):
            engine.submit_q(np.zeros((ACT + 2, OBS), dtype=np.float32))
    finally:
        engine.close()


class FailingThreadEngine(InferenceEngine):
    def q_values(self, states: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")


async def test_failed_pass_answers_like_a_late_one() -> None:
    engine = FailingThreadEngine(OBS, ACT, cpu_backend="thread")
    engine.load_network(make_net(36))
    try:
        states, masks = random_inputs(2, seed=37)
        assert await engine.submit_q(states) is None, "the caller falls back; routing does not fail"
        assert isinstance(engine.last_error, RuntimeError)
        assert await engine.submit(states[0], masks[0]) == DEADLINE_MISSED
    finally:
        engine.close()
