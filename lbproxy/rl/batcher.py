"""The inference engine: backend scores on the event loop (NumPy), or Q-values from an off-loop pass.

Two ways to answer, chosen by device:

* Inline (CPU, the default): the NumPy arithmetic of rl/network.py, run synchronously on the loop.
  The live dqn policy (rl/iteration.py) decides all the requests whose handlers run in one loop iteration
  from one encoded state per request class: :meth:`InferenceEngine.inline_pass` computes the pooled
  cluster summary once and scores every backend row (and each row as it will read after one more
  dispatch); a decision that dispatches to b then re-scores only row b (:meth:`score`), exactly,
  because nothing else of any row changed (observe/features.py, rl/network.py). No handler is suspended:
  suspending every request on a future cost ~10 µs of proxy CPU per request and ~17 % of throughput
  (benchmarks/results/dqn_proxy.md). The deadline bounds the pass's own compute time: the wait
  before it is the loop running other handlers, which no fallback could answer sooner.
* Off-loop (CUDA, and `thread` on CPU, which exercises the same machinery without a GPU):
  continuous batching of Q-value blocks. :meth:`InferenceEngine.submit_q` queues a block of flat
  states (what the dqn policy sends: one snapshot per loop iteration and request class, a few states
  for its dispatch lookahead) and is answered with their Q-values. While one pass runs in the device
  thread, new blocks queue; when it returns, everything queued (up to `max_batch` states) goes into
  the next pass. CUDA (rl/cuda_runner.py): pinned host buffers, ONE host-to-device copy, ONE
  device-to-host copy, a CUDA graph per power-of-two batch bucket. The pass (and its stream sync)
  runs in a dedicated thread, so the loop never blocks on the device; new weights are copied in
  place into the parameters the captured graphs read.

Weights reach the engine through :meth:`publish`: the learner thread prepares a new immutable
weight set (:meth:`prepare`), and the loop swaps one reference (atomic under the GIL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from lbproxy.observe import feature_dim
from lbproxy.rl.cuda_runner import CudaRunner
from lbproxy.rl.network import NumpyWeights, QNetwork, RowScorer, numpy_q, row_scores

Backend = Literal["numpy", "thread", "cuda"]

_Entry = tuple[np.ndarray, "asyncio.Future[np.ndarray | None]"]
"""Queued work: a (r, obs_dim) block of flat states and the future of its (r, width) Q-values (None
when the pass was late or failed)."""

_BLAS_SET_THREADS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
)


def limit_blas_threads(n: int = 1) -> bool:
    """Cap NumPy's OpenBLAS thread pool (process-wide). From batch ~64 up, OpenBLAS splits a matmul
    across threads that spin-wait; on 2 shared cores they fight the event loop: measured 256 µs per
    decision at 64 concurrent decisions vs 10 µs single-threaded. Returns True if applied.
    (threadpoolctl does this generically; it is not a dependency, so look the symbol up directly.)"""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return False
    done = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _BLAS_SET_THREADS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


class InferenceEngine:
    """Backend scores over the current Q-network weights: inline passes on the loop (`inline_pass`,
    `score`), or continuously batched Q-value passes in a device thread (`submit_q`).

    Everything is called from the event loop thread; `publish` too (the learner thread uses
    `loop.call_soon_threadsafe(engine.publish, weights)`).
    """

    def __init__(
        self,
        width: int,
        *,
        max_batch: int = 256,
        device: str | torch.device = "cpu",
        cpu_backend: Literal["numpy", "thread"] = "numpy",
        deadline_s: float | None = None,
        use_graphs: bool = True,
        on_batch: Any = None,
    ) -> None:
        self.width = width
        """Rows of the flat states an off-loop pass takes (inline passes take any row count)."""
        self.obs_dim = feature_dim(width)
        self.max_batch = max(1, max_batch)
        self.device = torch.device(device)
        self.backend: Backend = "cuda" if self.device.type == "cuda" else cpu_backend
        self.deadline_s = deadline_s
        self.use_graphs = use_graphs
        self.on_batch = on_batch  # e.g. metrics.batch_size.observe; called once per pass
        self.passes = 0
        self.decisions = 0
        self._weights: NumpyWeights | None = None
        self._cuda: CudaRunner | None = None
        self._queue: list[_Entry] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        staged = self.max_batch if self.backend == "thread" else 0
        self._xbuf = np.zeros((staged, self.obs_dim), dtype=np.float32)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._version = 0
        limit_blas_threads(1)
        self._timer: asyncio.TimerHandle | None = None
        self.late_passes = 0
        self.last_error: BaseException | None = None

    # --- weights ----------------------------------------------------------------------------------
    @property
    def has_model(self) -> bool:
        return self._version > 0

    @property
    def version(self) -> int:
        """How many weight sets have been published (0 = no model yet)."""
        return self._version

    @property
    def weights(self) -> NumpyWeights | None:
        """The NumPy weights inline passes use (None on the CUDA backend or before a model)."""
        return self._weights

    def load_network(self, net: QNetwork, *, routable: bool = True) -> None:
        """Install a network (start-up). For CUDA this captures the graphs: call it before serving.
        `routable=False`: the weights are installed (graphs captured) but not served: `has_model`
        stays False, so the policy routes by its fallback until the first `publish` (live training
        from scratch: a network that has not been updated once routes at random, DESIGN.md §4)."""
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if self.backend == "cuda":
            clone = QNetwork(net.hidden, net.summary)
            clone.load_state_dict(sd)
            self._ensure_executor()
            assert self._executor is not None
            self._cuda = self._executor.submit(
                CudaRunner, clone, self.width, self.max_batch, self.device, self.use_graphs
            ).result()
            self._version += 1
        else:
            if self.backend == "thread":
                self._ensure_executor()
            self.publish(NumpyWeights.from_state_dict(sd))
        if not routable:
            self._version = 0

    def prepare(self, state_dict: Mapping[str, torch.Tensor]) -> Any:
        """What `publish` wants for this backend, built OFF the loop (in the learner thread)."""
        if self.backend == "cuda":
            return {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
        return NumpyWeights.from_state_dict(state_dict)

    def publish(self, weights: Any) -> None:
        """Make new weights visible to the next pass. NumPy: one reference assignment of a freshly
        built weight set (a pass in progress keeps the old one). CUDA: in-place copy, ordered with
        the passes on the worker thread, so captured graphs see it."""
        if self.backend == "cuda":
            if self._cuda is None or self._executor is None:
                raise RuntimeError("load_network() first: the CUDA path captures graphs from a network")
            self._executor.submit(self._cuda.load, weights).result()
        else:
            if not isinstance(weights, NumpyWeights):
                weights = NumpyWeights.from_state_dict(weights)
            self._weights = weights
        self._version += 1

    # --- inline passes ------------------------------------------------------------------------------
    @property
    def inline(self) -> bool:
        """True when passes run synchronously on the loop (`inline_pass`); else `submit_q` and await."""
        return self.backend == "numpy"

    def record_pass(self, decisions: int) -> None:
        """Account one forward pass that answered `decisions` requests (the batch-size histogram)."""
        self.passes += 1
        self.decisions += decisions
        if self.on_batch is not None:
            self.on_batch(decisions)

    def inline_pass(self, rows: np.ndarray, ctx: np.ndarray, more: np.ndarray) -> tuple[RowScorer, np.ndarray] | None:
        """One state's pass on the loop: the scorer (pooled summary) of `rows` (k, ROW_FEATURES) with
        context `ctx`, and the scores of `rows` followed by `more` (hypothetical rows of the same state).
        None when the pass itself took longer than the deadline (the machine is too slow for the
        model: the caller falls back). The caller accounts the pass with `record_pass`."""
        t0 = time.perf_counter()
        out = self.row_pass(rows, ctx, more)
        if self.deadline_s is not None and time.perf_counter() - t0 > self.deadline_s:
            return None
        return out

    def row_pass(self, rows: np.ndarray, ctx: np.ndarray, more: np.ndarray) -> tuple[RowScorer, np.ndarray]:
        """The computation `inline_pass` times (tests subclass this to stand for a slow machine)."""
        w = self._weights
        if w is None:
            raise RuntimeError("no model loaded")
        scorer = RowScorer(w, rows, ctx)
        return scorer, scorer.scores(np.concatenate([rows, more]) if more.shape[0] else rows)

    @staticmethod
    def score(scorer: RowScorer, rows: np.ndarray) -> np.ndarray:
        """Scores of more hypothetical rows of a state already passed (one row pass, no summary)."""
        return row_scores(scorer.weights, rows, scorer.bias)

    # --- off-loop passes ------------------------------------------------------------------------------
    def q_values(self, states: np.ndarray) -> np.ndarray:
        """Q-values of a (k, obs_dim) batch on the CPU, synchronously: the `thread` backend's pass
        (tests subclass this to hold a pass back)."""
        w = self._weights
        if w is None:
            raise RuntimeError("no model loaded")
        return numpy_q(w, states)

    def submit_q(self, states: np.ndarray) -> asyncio.Future[np.ndarray | None]:
        """Queue a (r, obs_dim) block for the next off-loop pass; the future gives its (r, width)
        Q-values, or None when the pass was late or failed (the caller falls back; a failure is kept
        in `last_error`)."""
        if self.inline:
            raise RuntimeError("the off-loop path; the numpy backend answers with inline_pass()")
        if states.ndim != 2 or states.shape[1] != self.obs_dim or not 1 <= states.shape[0] <= self.max_batch:
            raise ValueError(
                f"submit_q takes 1 to {self.max_batch} states of {self.obs_dim} features, got shape {states.shape}"
            )
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray | None] = loop.create_future()
        self._queue.append((states, fut))
        if not self._running:
            self._running = True
            loop.call_soon(self._start_pass)
        return fut

    def _take_batch(self) -> tuple[list[_Entry], int]:
        """Entries for the next pass, up to max_batch states (always at least one entry), staged."""
        queue = self._queue
        xb = self._cuda.staging if self._cuda is not None else self._xbuf  # CUDA: straight into pinned memory
        k = taken = 0
        for states, _f in queue:
            r = states.shape[0]
            if k + r > self.max_batch and taken:
                break
            xb[k : k + r] = states
            k += r
            taken += 1
        batch, self._queue = queue[:taken], queue[taken:]
        return batch, k

    def _start_pass(self) -> None:
        """Hand everything queued (up to max_batch states) to the device thread.

        The deadline runs from submission, one timer per pass: when it fires and the worker has not
        finished, the pass's blocks and everything queued behind it are answered with None.
        """
        if not self._queue:
            self._running = False
            return
        batch, k = self._take_batch()
        loop = self._loop
        assert loop is not None and self._executor is not None
        # Rows are already staged (pinned memory on CUDA); nothing stages the next batch before this
        # pass returns, so the worker reads them without a copy.
        if self._cuda is not None:
            cfut = self._executor.submit(self._cuda.run_staged, k)
        else:
            cfut = self._executor.submit(self.q_values, self._xbuf[:k])
        if self.deadline_s is not None:
            self._timer = loop.call_later(self.deadline_s, self._expire, batch, cfut)

        def done(f: concurrent.futures.Future[np.ndarray]) -> None:
            if not loop.is_closed():  # shutting down: nobody is waiting any more
                loop.call_soon_threadsafe(self._finish, batch, f)

        cfut.add_done_callback(done)

    @staticmethod
    def _deliver(batch: list[_Entry], q: np.ndarray) -> None:
        k = 0
        for states, f in batch:
            r = states.shape[0]
            if not f.done():
                f.set_result(q[k : k + r])
            k += r

    @staticmethod
    def _give_up(entries: list[_Entry]) -> None:
        """Answer entries that will get no pass with None."""
        for _states, f in entries:
            if not f.done():
                f.set_result(None)

    def _expire(self, batch: list[_Entry], cfut: concurrent.futures.Future[np.ndarray]) -> None:
        """The running off-loop pass is late: its blocks get None, and so does everything queued behind
        it (a stalled device must not hold requests); re-armed until the pass returns. A pass that
        finished but whose completion callback has not run yet (loop busy) is not late."""
        if cfut.done():
            return
        queued, self._queue = self._queue, []
        self.late_passes += 1
        self._give_up(batch + queued)
        if self.deadline_s is not None and self._loop is not None:
            self._timer = self._loop.call_later(self.deadline_s, self._expire, [], cfut)

    def _finish(self, batch: list[_Entry], cfut: concurrent.futures.Future[np.ndarray]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        exc = cfut.exception()
        if exc is not None:  # routing must not fail because inference did: answered as a late pass
            self.last_error = exc
            self._give_up(batch)
        else:
            self._deliver(batch, cfut.result())
        self._start_pass()

    def _ensure_executor(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lbproxy-infer")

    def close(self) -> None:
        """Stop the device thread (if any); pending blocks get None so nobody hangs."""
        self._give_up(self._queue)
        self._queue = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


__all__ = ["InferenceEngine", "limit_blas_threads"]
