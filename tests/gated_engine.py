"""An off-loop inference engine whose passes the test controls: the CUDA path's plumbing, on CPU."""

from __future__ import annotations

import threading

import numpy as np

from lbproxy.rl.batcher import InferenceEngine


class GatedEngine(InferenceEngine):
    """Passes wait for `gate` (open unless a test closes it: a device still busy) and record their
    row counts in `rows` (one entry per pass, appended by the device thread)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.gate.set()
        self.rows: list[int] = []

    def q_values(self, states: np.ndarray) -> np.ndarray:
        self.gate.wait(5.0)
        self.rows.append(states.shape[0])
        return super().q_values(states)
