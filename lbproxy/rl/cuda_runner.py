"""The off-loop GPU pass of the inference engine (rl/batcher.py): pinned host buffers, ONE
host-to-device copy, ONE device-to-host copy, a CUDA graph per power-of-two batch bucket, and new
weights copied in place into the parameters the captured graphs read.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from lbproxy.observe import feature_dim
from lbproxy.rl.network import QNetwork

__all__ = ["CudaRunner"]


class CudaRunner:
    """The GPU pass: pinned buffers, one copy each way, a CUDA graph per power-of-two bucket.

    Only ever called from the engine's single worker thread, so the graphs, buffers and the in-place
    weight copies are serialised on one CUDA stream without locks. On a CPU device it runs the same
    buffers and offsets eagerly, unpinned and without a stream, so CI tests the layout; the CUDA parts
    (pinning, streams, graphs) are covered by tests/test_batcher.py::test_cuda_* where a GPU exists.
    """

    def __init__(
        self, net: QNetwork, width: int, max_batch: int, device: torch.device, use_graphs: bool = True
    ) -> None:
        self.device = device
        self.width = width
        self.obs_dim = feature_dim(width)
        self.net = net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.buckets = [1 << i for i in range(max(0, max_batch - 1).bit_length() + 1)]  # 1, 2, 4, ... >= max_batch
        top = self.buckets[-1]
        gpu = device.type == "cuda"
        self.host_in = torch.zeros((top, self.obs_dim), dtype=torch.float32)
        self.host_out = torch.zeros((top, width), dtype=torch.float32)
        if gpu:
            self.host_in, self.host_out = self.host_in.pin_memory(), self.host_out.pin_memory()
        self.dev_in = torch.zeros((top, self.obs_dim), dtype=torch.float32, device=device)
        self.dev_out = torch.zeros((top, width), dtype=torch.float32, device=device)
        # torch.cuda.Stream.__new__ is unannotated in torch's own source.
        self.stream = torch.cuda.Stream(device=device) if gpu else None  # type: ignore[no-untyped-call]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs and gpu:
            self._capture()

    def _step(self, b: int) -> None:
        self.dev_out[:b].copy_(self.net(self.dev_in[:b]))

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
    def staging(self) -> np.ndarray:
        """The pinned input buffer as NumPy: the engine writes batch rows straight into it (safe: passes
        never overlap, the next batch is staged after this one returns)."""
        return self.host_in.numpy()

    def run(self, states: np.ndarray) -> np.ndarray:
        """Stage a batch into pinned memory, then `run_staged`."""
        self.staging[: states.shape[0]] = states
        return self.run_staged(states.shape[0])

    def run_staged(self, k: int) -> np.ndarray:
        """The device pass over the first k staged states: one copy in, graph replay, one copy out."""
        b = self.bucket(k)
        if b > k:
            self.host_in.numpy()[k:b] = 0.0  # padding states: all rows invalid; their answers are ignored
        with torch.cuda.stream(self.stream), torch.no_grad():
            self.dev_in[:b].copy_(self.host_in[:b], non_blocking=True)
            g = self.graphs.get(b)
            if g is not None:
                g.replay()
            else:
                self._step(b)
            self.host_out[:k].copy_(self.dev_out[:k], non_blocking=True)
            self._sync()  # in the worker thread, never on the event loop
        return self.host_out.numpy()[:k].copy()

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy new weights IN PLACE: the captured graphs keep reading the same parameter storage."""
        with torch.cuda.stream(self.stream), torch.no_grad():
            params = dict(self.net.named_parameters())
            for name, value in state_dict.items():
                if name in params:
                    params[name].copy_(value, non_blocking=True)
            self._sync()
