"""The inference engine: DQN decisions on the event loop, batched.

Two ways to answer, chosen by device:

* Inline (CPU, the default): a NumPy copy of the MLP, run synchronously on the loop by
  :meth:`InferenceEngine.q_now`. A batch-1 NumPy forward costs ~5-8 µs against ~25 µs for torch
  (ANCHORS.md; re-measured in benchmarks/decision_latency.py), and a thread hop would cost more than
  the forward itself. The batch is a loop iteration: the dqn policy (policies/dqn.py) decides all
  the requests whose handlers run in one iteration from one state snapshot per request class and
  one pass over it, without suspending any handler, and moves the Q-values by each dispatch it makes
  so that they do not all go to one backend. Suspending every request on a future instead (the
  off-loop machinery below, run inline) cost ~10 µs of proxy CPU per request and ~17 % of
  throughput (benchmarks/results/dqn_proxy.md), and k rows of one iteration's requests were
  identical anyway. The deadline bounds the pass's own compute time: the wait before it is the loop
  running other handlers, which no fallback could answer sooner. The `torch` CPU backend is the same
  path with a torch forward (benchmarks and tests).
* Off-loop (CUDA, and `thread` on CPU, which exercises the same machinery without a GPU):
  continuous batching. :meth:`InferenceEngine.submit` queues a request (one state, answered with
  its masked-argmax action) and :meth:`InferenceEngine.submit_q` a block of rows (answered with
  their Q-values: what the dqn policy sends, one snapshot per loop iteration and request class).
  While one pass runs in the device thread, new work queues; when it returns, everything queued
  (up to `max_batch` rows) goes into the next pass. A lone request never waits for company: with
  no pass running, one starts on the next loop iteration with whatever is queued. CUDA: pinned host
  buffers, ONE host-to-device copy (state and mask packed in one row), ONE device-to-host copy (the
  masked-argmax actions, with the Q-values beside them when the pass carried a Q-value block), a
  CUDA graph per power-of-two batch bucket. The pass (and its stream sync) runs in a dedicated
  thread, so the loop never blocks on the device; new weights are copied in place into the
  parameters the captured graphs read.

Weights reach the engine through :meth:`publish`: the learner thread prepares a new immutable
weight set (:func:`prepare_weights`), and the loop swaps one reference (atomic under the GIL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from lbproxy.rl.network import NumpyWeights, QNetwork, masked_argmax, numpy_q

Backend = Literal["numpy", "torch", "thread", "cuda"]

PassResult = tuple[np.ndarray, "np.ndarray | None"]
"""What one off-loop pass returns: the (k,) masked-argmax actions, and the (k, n_actions) Q-values
when the pass carried a Q-value block (else None: only the actions are copied back)."""

_Entry = tuple[np.ndarray, "np.ndarray | None", "asyncio.Future[Any]"]
"""Queued work. (state, mask, future): one decision, answered with its masked-argmax action (an int),
or DEADLINE_MISSED. (rows, None, future): a (r, obs_dim) block, answered with its (r, n_actions)
Q-values, or None. A pass that was late or failed gives DEADLINE_MISSED / None."""

DEADLINE_MISSED = -1
"""`decide` returns this when the answer came later than the deadline (the caller falls back)."""


def prepare_weights(state_dict: Mapping[str, torch.Tensor]) -> NumpyWeights:
    """Build a fresh NumPy weight set from a QNetwork state_dict. Safe to call from any thread: it
    allocates new arrays and never touches what the loop is reading."""

    def t(key: str) -> np.ndarray:
        return np.ascontiguousarray(state_dict[key].detach().to("cpu", torch.float32).numpy().T.copy())

    def b(key: str) -> np.ndarray:
        return state_dict[key].detach().to("cpu", torch.float32).numpy().copy()

    dueling = "value.weight" in state_dict
    return NumpyWeights(
        w1=t("body.0.weight"),
        b1=b("body.0.bias"),
        w2=t("body.2.weight"),
        b2=b("body.2.bias"),
        w3=t("head.weight"),
        b3=b("head.bias"),
        wv=t("value.weight") if dueling else None,
        bv=b("value.bias") if dueling else None,
    )


def numpy_masked_argmax(q: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Argmax over valid actions only (invalid -> -inf), row-wise."""
    return np.where(mask, q, -np.inf).argmax(axis=-1)


_BLAS_SET_THREADS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
)


def limit_blas_threads(n: int = 1) -> bool:
    """Cap NumPy's OpenBLAS thread pool (process-wide). From batch ~64 up, OpenBLAS splits a matmul
    across threads that spin-wait; on 2 shared cores they fight the event loop: measured 256 µs per
    decision at 64 concurrent decide() calls vs 10 µs single-threaded. Returns True if applied.
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


class _CudaRunner:
    """The GPU pass: pinned buffers, one copy each way, a CUDA graph per power-of-two bucket.

    Only ever called from the engine's single worker thread, so the graphs, buffers and the in-place
    weight copies are serialised on one CUDA stream without locks. On a CPU device it runs the same
    buffers and offsets eagerly, unpinned and without a stream, so CI tests the layout; the CUDA parts
    (pinning, streams, graphs) are covered by tests/test_batcher.py::test_cuda_* where a GPU exists.
    """

    def __init__(self, net: QNetwork, max_batch: int, device: torch.device, use_graphs: bool = True) -> None:
        self.device = device
        self.obs_dim = net.obs_dim
        self.n_actions = net.n_actions
        self.net = net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.buckets = [1 << i for i in range(max(0, max_batch - 1).bit_length() + 1)]  # 1, 2, 4, ... >= max_batch
        width = self.obs_dim + self.n_actions
        top = self.buckets[-1]
        gpu = device.type == "cuda"
        # State and mask packed in one row so each pass makes exactly one host-to-device copy.
        self.host_in = torch.zeros((top, width), dtype=torch.float32)
        # Out: for a bucket of b rows, its Q-values (b x n_actions) then its b actions (as floats: exact
        # below 2**24), adjacent in one buffer, so either the actions alone or both are ONE copy back.
        self.host_out = torch.zeros(top * (self.n_actions + 1), dtype=torch.float32)
        if gpu:
            self.host_in, self.host_out = self.host_in.pin_memory(), self.host_out.pin_memory()
        self.dev_in = torch.zeros((top, width), dtype=torch.float32, device=device)
        self.dev_out = torch.zeros(top * (self.n_actions + 1), dtype=torch.float32, device=device)
        self.stream = torch.cuda.Stream(device=device) if gpu else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs and gpu:
            self._capture()

    def _step(self, b: int) -> None:
        inp = self.dev_in[:b]
        q = self.net(inp[:, : self.obs_dim])
        n = self.n_actions
        self.dev_out[: b * n].view(b, n).copy_(q)
        self.dev_out[b * n : b * (n + 1)].copy_(masked_argmax(q, inp[:, self.obs_dim :] > 0.5))

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _capture(self) -> None:
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # buffers were zeroed on the default stream
        with torch.cuda.stream(self.stream), torch.no_grad():
            for b in self.buckets:  # warm-up on the side stream, as torch.cuda.graphs docs require
                for _ in range(3):
                    self._step(b)
            self.stream.synchronize()
            for b in self.buckets:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=self.stream):
                    self._step(b)
                self.graphs[b] = g
        self.stream.synchronize()

    def bucket(self, k: int) -> int:
        for b in self.buckets:
            if b >= k:
                return b
        return self.buckets[-1]

    @property
    def staging(self) -> tuple[np.ndarray, np.ndarray]:
        """(states, masks) views of the pinned input buffer: the engine writes batch rows straight
        into pinned memory (safe: passes never overlap, the next batch is staged after this returns)."""
        hin = self.host_in.numpy()
        return hin[:, : self.obs_dim], hin[:, self.obs_dim :]

    def run(self, states: np.ndarray, masks: np.ndarray, with_q: bool = False) -> PassResult:
        """Stage a batch into pinned memory, then `run_staged`."""
        k = states.shape[0]
        hs, hm = self.staging
        hs[:k] = states
        hm[:k] = masks
        return self.run_staged(k, with_q)

    def run_staged(self, k: int, with_q: bool = False) -> PassResult:
        """The device pass over the first k staged rows: one copy in, graph replay, one copy out (the
        actions, or Q-values and actions when `with_q`)."""
        b = self.bucket(k)
        n = self.n_actions
        if b > k:
            self.host_in.numpy()[k:b] = 1.0  # padding rows: any valid mask; their answers are ignored
        lo = 0 if with_q else b * n
        hi = b * (n + 1)
        with torch.cuda.stream(self.stream), torch.no_grad():
            self.dev_in[:b].copy_(self.host_in[:b], non_blocking=True)
            g = self.graphs.get(b)
            if g is not None:
                g.replay()
            else:
                self._step(b)
            self.host_out[lo:hi].copy_(self.dev_out[lo:hi], non_blocking=True)
            self._sync()  # in the worker thread, never on the event loop
        out = self.host_out.numpy()
        actions = out[b * n : b * n + k].astype(np.int64)
        return actions, (out[: b * n].reshape(b, n)[:k].copy() if with_q else None)

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy new weights IN PLACE: the captured graphs keep reading the same parameter storage."""
        with torch.cuda.stream(self.stream), torch.no_grad():
            params = dict(self.net.named_parameters())
            for name, value in state_dict.items():
                if name in params:
                    params[name].copy_(value, non_blocking=True)
            self._sync()


class InferenceEngine:
    """Q-values and masked-argmax decisions over the current Q-network weights: inline passes on the
    loop (`q_now`), or continuously batched passes in a device thread (`submit`, `submit_q`).

    `decide` must be called from the event loop thread; `publish` too (the learner thread uses
    `loop.call_soon_threadsafe(engine.publish, weights)`).
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        *,
        max_batch: int = 256,
        device: str | torch.device = "cpu",
        cpu_backend: Literal["numpy", "torch", "thread"] = "numpy",
        deadline_s: float | None = None,
        use_graphs: bool = True,
        on_batch: Any = None,
    ) -> None:
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.max_batch = max(1, max_batch)
        self.device = torch.device(device)
        self.backend: Backend = "cuda" if self.device.type == "cuda" else cpu_backend
        self.deadline_s = deadline_s
        self.use_graphs = use_graphs
        self.on_batch = on_batch  # e.g. metrics.batch_size.observe; called once per pass
        self.passes = 0
        self.decisions = 0
        self._weights: NumpyWeights | None = None
        self._torch_net: QNetwork | None = None
        self._cuda: _CudaRunner | None = None
        self._queue: list[_Entry] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rows = max(self.max_batch, n_actions + 1)
        """Rows one off-loop pass can hold: max_batch, and at least a snapshot with its dispatch rows."""
        # Staging rows for the off-loop `thread` pass (CUDA stages into pinned memory; inline needs none).
        staged = self._rows if self.backend == "thread" else 0
        self._xbuf = np.zeros((staged, obs_dim), dtype=np.float32)
        self._mbuf = np.zeros((staged, n_actions), dtype=bool)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._version = 0
        if self.backend in ("numpy", "thread"):
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

    def load_network(self, net: QNetwork) -> None:
        """Install a network (start-up). For CUDA this captures the graphs: call it before serving."""
        if net.obs_dim != self.obs_dim or net.n_actions != self.n_actions:
            raise ValueError(
                f"network shape obs_dim={net.obs_dim}, n_actions={net.n_actions} does not match the engine's "
                f"obs_dim={self.obs_dim}, n_actions={self.n_actions}"
            )
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if self.backend == "cuda":
            clone = QNetwork(net.obs_dim, net.n_actions, net.hidden, net.dueling)
            clone.load_state_dict(sd)
            self._ensure_executor()
            assert self._executor is not None
            self._cuda = self._executor.submit(_CudaRunner, clone, self._rows, self.device, self.use_graphs).result()
            self._version += 1
        elif self.backend == "torch":
            clone = QNetwork(net.obs_dim, net.n_actions, net.hidden, net.dueling).eval()
            clone.load_state_dict(sd)
            self._torch_net = clone
            self._version += 1
        else:
            if self.backend == "thread":
                self._ensure_executor()
            self.publish(prepare_weights(sd))

    def prepare(self, state_dict: Mapping[str, torch.Tensor]) -> Any:
        """What `publish` wants for this backend, built OFF the loop (in the learner thread)."""
        if self.backend in ("numpy", "thread"):
            return prepare_weights(state_dict)
        return {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}

    def publish(self, weights: Any) -> None:
        """Make new weights visible to the next pass. NumPy: one reference assignment of a freshly
        built weight set (a pass in progress keeps the old one). torch/CUDA: in-place copy, ordered
        with the passes (CUDA: on the worker thread, so captured graphs see it)."""
        if self.backend in ("numpy", "thread"):
            if not isinstance(weights, NumpyWeights):
                weights = prepare_weights(weights)
            if weights.obs_dim != self.obs_dim or weights.n_actions != self.n_actions:
                raise ValueError("published weights do not match the engine's shape")
            self._weights = weights
        elif self.backend == "torch":
            if self._torch_net is None:
                raise RuntimeError("load_network() first: the torch path needs the architecture")
            with torch.no_grad():
                self._torch_net.load_state_dict(weights)
        else:
            if self._cuda is None or self._executor is None:
                raise RuntimeError("load_network() first: the CUDA path captures graphs from a network")
            self._executor.submit(self._cuda.load, weights).result()
        self._version += 1

    # --- the pass ---------------------------------------------------------------------------------
    def q_values(self, states: np.ndarray) -> np.ndarray:
        """Q-values of a (k, obs_dim) batch or of one (obs_dim,) state, synchronously, on a CPU
        backend (a vector product is ~1 µs cheaper than a batch of one). Tests subclass this."""
        if self.backend == "torch":
            assert self._torch_net is not None
            with torch.inference_mode():
                return self._torch_net(torch.from_numpy(states)).numpy()
        w = self._weights
        if w is None:
            raise RuntimeError("no model loaded")
        return numpy_q(w, states)

    def forward_pass(self, states: np.ndarray, masks: np.ndarray, with_q: bool = False) -> PassResult:
        """One synchronous pass over a (k, obs_dim) batch: what an off-loop pass returns."""
        if self._cuda is not None:
            return self._cuda.run(states, masks, with_q)
        q = self.q_values(states)
        return numpy_masked_argmax(q, masks), (q if with_q else None)

    def forward(self, states: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """One synchronous pass: masked argmax actions for a (k, obs_dim) batch."""
        return self.forward_pass(states, masks)[0]

    def forward_sync(self, states: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """A pass outside the loop (benchmarks, tests), on whichever thread owns the device."""
        if self.backend == "cuda":
            self._ensure_executor()
            assert self._executor is not None
            return self._executor.submit(self.forward, states, masks).result()
        return self.forward(states, masks)

    # --- answering ----------------------------------------------------------------------------------
    @property
    def inline(self) -> bool:
        """True when passes run synchronously on the loop (`q_now`); else `submit` and await."""
        return self.backend in ("numpy", "torch")

    def record_pass(self, decisions: int) -> None:
        """Account one forward pass that answered `decisions` requests (the batch-size histogram)."""
        self.passes += 1
        self.decisions += decisions
        if self.on_batch is not None:
            self.on_batch(decisions)

    def q_now(self, states: np.ndarray) -> np.ndarray | None:
        """Inline path: `q_values` in one pass on the loop, or None when the pass itself took longer
        than the deadline (the machine is too slow for the model: the caller falls back). The caller
        accounts the pass with `record_pass` once it knows how many requests it answered."""
        t0 = time.perf_counter()
        q = self.q_values(states)
        if self.deadline_s is not None and time.perf_counter() - t0 > self.deadline_s:
            return None
        return q

    async def decide(self, state: np.ndarray, mask: np.ndarray) -> int:
        """The action for one state (masked argmax), or DEADLINE_MISSED when the engine was too slow (or,
        off-loop, its pass failed), on either path (benchmarks and tests; the dqn policy calls
        `q_now`/`submit_q` itself). The caller keeps ownership of `state`/`mask` but must not mutate
        them until this returns."""
        if self.inline:
            q = self.q_now(state)
            self.record_pass(1)
            return DEADLINE_MISSED if q is None else int(numpy_masked_argmax(q, mask))
        return await self.submit(state, mask)

    # --- continuous batching (off-loop path) ---------------------------------------------------------
    def submit(self, state: np.ndarray, mask: np.ndarray) -> asyncio.Future[int]:
        """Queue one state for the next off-loop pass; the future gives its masked-argmax action, or
        DEADLINE_MISSED when the pass was late or failed. No coroutine frame per decision."""
        return self._enqueue(state, mask)

    def submit_q(self, rows: np.ndarray) -> asyncio.Future[np.ndarray | None]:
        """Queue a (r, obs_dim) block for the next off-loop pass; the future gives its (r, n_actions)
        Q-values, or None when the pass was late or failed (the caller falls back; a failure is kept
        in `last_error`)."""
        if rows.ndim != 2 or not 1 <= rows.shape[0] <= self._rows:
            raise ValueError(f"submit_q takes 1 to {self._rows} rows of obs_dim, got shape {rows.shape}")
        return self._enqueue(rows, None)

    def _enqueue(self, rows: np.ndarray, mask: np.ndarray | None) -> asyncio.Future[Any]:
        if self.inline:
            raise RuntimeError(f"the off-loop path; the {self.backend} backend answers with q_now()")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((rows, mask, fut))
        if not self._running:
            self._running = True
            loop.call_soon(self._start_pass)
        return fut

    def _take_batch(self) -> tuple[list[_Entry], int]:
        """Entries for the next pass, up to max_batch rows (always at least one entry), staged."""
        queue = self._queue
        if self._cuda is not None:
            xb, mb = self._cuda.staging  # straight into pinned memory (bool -> 0/1 float)
        else:
            xb, mb = self._xbuf, self._mbuf
        k = taken = 0
        for rows, mask, _f in queue:
            r = 1 if mask is not None else rows.shape[0]
            if k + r > self.max_batch and taken:
                break
            xb[k : k + r] = rows
            mb[k : k + r] = True if mask is None else mask  # Q-value rows: any valid mask
            k += r
            taken += 1
        batch, self._queue = queue[:taken], queue[taken:]
        return batch, k

    def _start_pass(self) -> None:
        """Hand everything queued (up to max_batch rows) to the device thread.

        The deadline runs from submission, one timer per pass: when it fires and the worker has not
        finished, the pass's requests and everything queued behind it fall back.
        """
        if not self._queue:
            self._running = False
            return
        batch, k = self._take_batch()
        decisions = sum(1 for e in batch if e[1] is not None)
        if decisions:  # a Q-value block's decisions are accounted by its caller (record_pass)
            self.record_pass(decisions)
        loop = self._loop
        assert loop is not None and self._executor is not None
        # Rows are already staged (pinned memory on CUDA); nothing stages the next batch before this
        # pass returns, so the worker reads them without a copy.
        with_q = decisions < len(batch)
        if self._cuda is not None:
            cfut = self._executor.submit(self._cuda.run_staged, k, with_q)
        else:
            cfut = self._executor.submit(self.forward_pass, self._xbuf[:k], self._mbuf[:k], with_q)
        if self.deadline_s is not None:
            self._timer = loop.call_later(self.deadline_s, self._expire, batch, cfut)

        def done(f: concurrent.futures.Future[PassResult]) -> None:
            if not loop.is_closed():  # shutting down: nobody is waiting any more
                loop.call_soon_threadsafe(self._finish, batch, f)

        cfut.add_done_callback(done)

    @staticmethod
    def _deliver(batch: list[_Entry], result: PassResult) -> None:
        actions = result[0].tolist()
        q = result[1]
        k = 0
        for rows, mask, f in batch:
            if mask is not None:
                if not f.done():
                    f.set_result(actions[k])
                k += 1
            else:
                r = rows.shape[0]
                if not f.done():
                    f.set_result(q[k : k + r] if q is not None else None)
                k += r

    @staticmethod
    def _give_up(entries: list[_Entry]) -> None:
        """Answer entries that will get no pass: decisions fall back, Q-value blocks get None."""
        for _rows, mask, f in entries:
            if not f.done():
                f.set_result(DEADLINE_MISSED if mask is not None else None)

    def _expire(self, batch: list[_Entry], cfut: concurrent.futures.Future[PassResult]) -> None:
        """The running off-loop pass is late: its requests fall back, and so does everything queued
        behind it (a stalled device must not hold requests); re-armed until the pass returns. A pass
        that finished but whose completion callback has not run yet (loop busy) is not late."""
        if cfut.done():
            return
        queued, self._queue = self._queue, []
        self.late_passes += 1
        self._give_up(batch + queued)
        if self.deadline_s is not None and self._loop is not None:
            self._timer = self._loop.call_later(self.deadline_s, self._expire, [], cfut)

    def _finish(self, batch: list[_Entry], cfut: concurrent.futures.Future[PassResult]) -> None:
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
        """Stop the device thread (if any); pending decisions get DEADLINE_MISSED so nobody hangs."""
        self._give_up(self._queue)
        self._queue = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


__all__ = [
    "DEADLINE_MISSED",
    "InferenceEngine",
    "NumpyWeights",
    "cuda_available",
    "numpy_masked_argmax",
    "numpy_q",
    "prepare_weights",
]
