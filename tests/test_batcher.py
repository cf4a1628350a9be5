"""The inference engine: inline passes, off-loop Q-value batching under concurrency, weight swaps,
deadlines, CUDA graphs."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from lbproxy.observe import F_LOG_IN_FLIGHT, F_VALID, ROW_FEATURES, feature_dim
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.cuda_runner import CudaRunner
from lbproxy.rl.network import QNetwork, RowScorer

WIDTH = 16
OBS = feature_dim(WIDTH)


def make_net(seed: int, hidden: int = 32) -> QNetwork:
    torch.manual_seed(seed)
    return QNetwork(hidden=hidden).eval()


def random_states(n: int, seed: int = 1) -> np.ndarray:
    """Flat states with a random number of valid rows (the rest padding, as encode_state writes them)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, OBS)).astype(np.float32)
    rows = x[:, : WIDTH * ROW_FEATURES].reshape(n, WIDTH, ROW_FEATURES)
    for k in range(n):
        valid = int(rng.integers(1, WIDTH + 1))
        rows[k, :valid, F_VALID] = 1.0
        rows[k, valid:] = 0.0
    return x


def torch_q(net: QNetwork, states: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(states)).numpy()


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, k: int) -> None:
        self.sizes.append(k)


def test_inline_pass_scores_rows_and_what_if_rows_like_the_network() -> None:
    net = make_net(1)
    engine = InferenceEngine(WIDTH)
    engine.load_network(net)
    x = random_states(1, seed=2)[0]
    rows = x[: WIDTH * ROW_FEATURES].reshape(WIDTH, ROW_FEATURES)
    more = rows[:3].copy()
    more[:, F_LOG_IN_FLIGHT] += 1.0
    out = engine.inline_pass(rows, x[WIDTH * ROW_FEATURES :], more)
    assert out is not None
    scorer, scores = out
    q = torch_q(net, x[None])[0]
    valid = rows[:, F_VALID] > 0
    np.testing.assert_allclose((q - scores[:WIDTH])[valid], (q - scores[:WIDTH])[valid][0], atol=1e-4)
    np.testing.assert_allclose(engine.score(scorer, more), scores[WIDTH:], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="off-loop"):
        engine.submit_q(x[None])


async def test_publish_is_visible_to_the_next_pass() -> None:
    engine = InferenceEngine(WIDTH)
    engine.load_network(make_net(10))
    x = random_states(1, seed=3)[0]
    rows = x[: WIDTH * ROW_FEATURES].reshape(WIDTH, ROW_FEATURES)
    for seed in (11, 12):
        net = make_net(seed)
        version = engine.version
        engine.publish(engine.prepare(net.state_dict()))
        assert engine.version == version + 1
        out = engine.inline_pass(rows, x[WIDTH * ROW_FEATURES :], rows[:0])
        assert out is not None
        q = torch_q(net, x[None])[0]
        valid = rows[:, F_VALID] > 0
        assert int(np.argmax(np.where(valid, out[1], -np.inf))) == int(np.argmax(np.where(valid, q, -np.inf)))


class SlowEngine(InferenceEngine):
    def q_values(self, states: np.ndarray) -> np.ndarray:
        time.sleep(0.05)  # 100x the deadline: late however busy the loop is when the timer fires
        return super().q_values(states)

    def row_pass(self, rows: np.ndarray, ctx: np.ndarray, more: np.ndarray) -> tuple[RowScorer, np.ndarray]:
        time.sleep(0.003)
        return super().row_pass(rows, ctx, more)


async def test_late_passes_are_answered_with_none() -> None:
    x = random_states(4, seed=15)
    inline = SlowEngine(WIDTH, deadline_s=0.0005)
    inline.load_network(make_net(14))
    rows = x[0, : WIDTH * ROW_FEATURES].reshape(WIDTH, ROW_FEATURES)
    assert inline.inline_pass(rows, x[0, WIDTH * ROW_FEATURES :], rows[:0]) is None
    off = SlowEngine(WIDTH, deadline_s=0.0005, cpu_backend="thread")
    off.load_network(make_net(14))
    try:
        got = await asyncio.gather(*(off.submit_q(x[i : i + 1]) for i in range(4)))
        assert all(q is None for q in got)
        assert off.late_passes >= 1
    finally:
        off.close()


def test_device_runner_layout_on_cpu() -> None:
    """The GPU runner's buffers, buckets, padding and output offsets, run eagerly on CPU tensors, for
    every bucket size and a partial bucket, and its in-place weight load."""
    net = make_net(25)
    runner = CudaRunner(net, WIDTH, 16, torch.device("cpu"))
    assert runner.buckets == [1, 2, 4, 8, 16] and not runner.graphs
    for k in (1, 3, 4, 5, 11, 16):
        states = random_states(k, seed=40 + k)
        q = runner.run(states)
        assert q.shape == (k, WIDTH)
        np.testing.assert_allclose(q, torch_q(net, states), rtol=1e-5, atol=1e-5)
    other = make_net(26)
    runner.load(other.state_dict())  # in place: the parameters a captured graph would read
    states = random_states(3, seed=50)
    np.testing.assert_allclose(runner.run(states), torch_q(other, states), rtol=1e-5, atol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
async def test_cuda_graph_blocks_match_eager_cpu() -> None:
    net = make_net(20, hidden=64)
    engine = InferenceEngine(WIDTH, max_batch=128, device="cuda")
    engine.load_network(net)
    try:
        states = random_states(200, seed=21)
        blocks = [engine.submit_q(states[i : i + 8]) for i in range(0, 200, 8)]
        expected = torch_q(net, states)
        for i, fut in enumerate(blocks):
            q = await fut
            assert q is not None
            np.testing.assert_allclose(q, expected[8 * i : 8 * i + 8], rtol=1e-3, atol=1e-3)
    finally:
        engine.close()


@pytest.mark.gpu
@needs_cuda
async def test_cuda_publish_reaches_captured_graphs() -> None:
    engine = InferenceEngine(WIDTH, max_batch=32, device="cuda")
    engine.load_network(make_net(22))
    try:
        states = random_states(32, seed=23)
        for seed in (24, 25):
            net = make_net(seed)
            engine.publish(engine.prepare(net.state_dict()))
            for k in (1, 7, 32):  # different captured buckets
                q = await engine.submit_q(states[:k])
                assert q is not None
                np.testing.assert_allclose(q, torch_q(net, states[:k]), rtol=1e-3, atol=1e-3)
    finally:
        engine.close()


async def test_threaded_blocks_queue_share_passes_and_get_their_own_rows() -> None:
    """The off-loop pass (the CUDA path's plumbing, run on CPU): blocks queue while a pass runs, share
    the next one up to max_batch states, and each gets exactly its own rows' Q-values."""
    net = make_net(30)
    rec = Recorder()
    engine = InferenceEngine(WIDTH, max_batch=16, cpu_backend="thread", on_batch=rec)
    engine.load_network(net)
    engine.on_batch = None
    try:
        states = random_states(120, seed=31)
        sizes = [1 + k % 5 for k in range(40)]
        starts = np.cumsum([0, *sizes])[:-1]
        futs = [engine.submit_q(states[s : s + r]) for s, r in zip(starts, sizes, strict=True) if s + r <= 120]
        expected = torch_q(net, states)
        for fut, s, r in zip(futs, starts, sizes, strict=False):
            q = await fut
            assert q is not None and q.shape == (r, WIDTH)
            np.testing.assert_allclose(q, expected[s : s + r], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="submit_q takes 1 to 16 states"):
            engine.submit_q(states[:17])
    finally:
        engine.close()


async def test_failed_pass_answers_like_a_late_one() -> None:
    class Broken(InferenceEngine):
        def q_values(self, states: np.ndarray) -> np.ndarray:
            raise RuntimeError("device lost")

    engine = Broken(WIDTH, cpu_backend="thread")
    engine.load_network(make_net(40))
    try:
        assert await engine.submit_q(random_states(2, seed=41)) is None
        assert isinstance(engine.last_error, RuntimeError)
    finally:
        engine.close()
