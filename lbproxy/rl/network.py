"""The Q-network: a small MLP over the fixed-width state, optionally with a dueling head.

Kept deliberately small (2 hidden layers of 128): a decision must cost microseconds on a CPU, and
the problem is close to a contextual bandit, so depth buys little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 128, dueling: bool = False) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.hidden = hidden
        self.dueling = dueling
        self.body = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, n_actions)
        # Dueling (Wang et al. 2016): Q = V + A - mean(A); the value stream learns load level once.
        self.value = nn.Linear(hidden, 1) if dueling else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        a = self.head(h)
        if self.value is None:
            return a
        return self.value(h) + a - a.mean(dim=-1, keepdim=True)

    def arch(self) -> dict[str, int | bool]:
        """Primitives that describe the shape; stored in checkpoints and checked on load."""
        return {"obs_dim": self.obs_dim, "n_actions": self.n_actions, "hidden": self.hidden, "dueling": self.dueling}


def masked_argmax(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Argmax over valid actions only; invalid actions get -inf."""
    return q.masked_fill(~mask, float("-inf")).argmax(dim=-1)


@dataclass(frozen=True, slots=True)
class NumpyWeights:
    """A QNetwork's parameters as float32 NumPy arrays laid out for `x @ W` (weights transposed): fresh
    copies for the live engine (rl/batcher.prepare_weights), or views of CPU parameters for the
    simulator agent (rl/agent.NumpyQ)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    wv: np.ndarray | None
    bv: np.ndarray | None

    @property
    def obs_dim(self) -> int:
        return int(self.w1.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.w3.shape[1])


def numpy_q(w: NumpyWeights, x: np.ndarray) -> np.ndarray:
    """Q-values for a (batch, obs_dim) float32 array: the same MLP as QNetwork.forward."""
    h = x @ w.w1
    h += w.b1
    np.maximum(h, 0.0, out=h)
    h2 = h @ w.w2
    h2 += w.b2
    np.maximum(h2, 0.0, out=h2)
    q = h2 @ w.w3
    q += w.b3
    if w.wv is not None and w.bv is not None:
        v = h2 @ w.wv + w.bv
        q = v + q - q.mean(axis=-1, keepdims=True)
    return q
