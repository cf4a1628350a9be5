"""The Q-network: permutation-equivariant, one Q-value per backend row, any backend count.

A backend is scored from its own feature row (lbproxy/observe/features.py, ``F_*`` columns), a pooled summary
of all candidate rows and the request context, with weights shared by every row (DeepSets, Zaheer et
al. 2017). So permuting the backends permutes the Q-values, and the same weights route 1 or 64
backends. Layout, with H = `hidden` and S = `summary`:

    z_b = relu(Ws · static(x_b) + bs)                         per row, dispatch-free columns only
    g   = [masked mean_b z_b, masked max_b z_b]                the cluster, pooled
    u   = relu(Wc · [g, static context] + bc)                  (S)
    h_b = relu(W2 · relu(W1x · x_b + W1u · u + b1) + b2)       per row (H)
    A_b = wo · h_b + bo                                        the backend's score
    V   = wv2 · relu(Wv1 · [u, dynamic context] + bv1) + bv2   one action-independent value
    Q_b = V + A_b

The pooled summary reads only the columns a dispatch does not change (observe.STATIC_FEATURES), and
the context columns a dispatch does change (total in-flight) enter only V, which every backend shares.
So a dispatch to b changes exactly A_b: the live policy re-scores one row per decision, exactly
(rl/iteration.py), instead of re-running the network. Small on purpose (~10k parameters): a decision
must cost microseconds on a CPU, and the problem is close to a contextual bandit.

Training runs this torch module on flat states; live inference and the simulator agent run the same
arithmetic in NumPy over `NumpyWeights` (:func:`numpy_q`, :class:`RowScorer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lbproxy.observe import (
    CONTEXT_FEATURES,
    F_VALID,
    ROW_FEATURES,
    STATIC_CONTEXT,
    STATIC_FEATURES,
    state_width,
)

ARCH_NAME = "equivariant/1"
_DYNAMIC_CONTEXT = CONTEXT_FEATURES - STATIC_CONTEXT


class QNetwork(nn.Module):
    """`summary` defaults to half of `hidden`, so that every width is named by `hidden` alone (the
    learner builds its networks from DqnConfig.hidden) and an average of K networks (rl/ensemble.py),
    which is K times as wide in both, is one of them too."""

    def __init__(self, hidden: int = 64, summary: int | None = None) -> None:
        super().__init__()
        summary = summary if summary is not None else max(1, hidden // 2)
        self.hidden = hidden
        self.summary = summary
        self.static = nn.Linear(STATIC_FEATURES, summary)
        self.cluster = nn.Linear(2 * summary + STATIC_CONTEXT, summary)
        self.row_x = nn.Linear(ROW_FEATURES, hidden)
        self.row_u = nn.Linear(summary, hidden, bias=False)
        self.row2 = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1)
        self.value1 = nn.Linear(summary + _DYNAMIC_CONTEXT, summary)
        self.value2 = nn.Linear(summary, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim) flat states -> (B, width) Q-values (rows that are not candidates score too:
        callers mask them: rl/action_selection.py)."""
        width = state_width(obs.shape[-1])
        rows = obs[:, : width * ROW_FEATURES].reshape(obs.shape[0], width, ROW_FEATURES)
        ctx = obs[:, width * ROW_FEATURES :]
        valid = rows[:, :, F_VALID : F_VALID + 1]  # (B, W, 1), 0/1
        z = torch.relu(self.static(rows[:, :, :STATIC_FEATURES])) * valid  # (B, W, S)
        count = valid.sum(dim=1).clamp_min(1.0)
        pooled = torch.cat([z.sum(dim=1) / count, z.amax(dim=1)], dim=1)  # z >= 0: zeroed rows never win
        u = torch.relu(self.cluster(torch.cat([pooled, ctx[:, :STATIC_CONTEXT]], dim=1)))  # (B, S)
        h = torch.relu(self.row_x(rows) + self.row_u(u).unsqueeze(1))
        h = torch.relu(self.row2(h))
        adv: torch.Tensor = self.score(h).squeeze(-1)  # (B, W)
        v: torch.Tensor = self.value2(torch.relu(self.value1(torch.cat([u, ctx[:, STATIC_CONTEXT:]], dim=1))))  # (B, 1)
        return v + adv

    def arch(self) -> dict[str, int | str]:
        """Primitives that describe the shape; stored in checkpoints and checked on load."""
        return {"name": ARCH_NAME, "hidden": self.hidden, "summary": self.summary, "row_features": ROW_FEATURES}


@dataclass(frozen=True, slots=True)
class NumpyWeights:
    """A QNetwork's parameters as float32 NumPy arrays laid out for `x @ W` (weights transposed), fresh
    copies (safe to hand from the learner thread to the event loop).

    The static encoder's bias is folded into the F_VALID row of `ws` (F_VALID is 1 on every valid row
    and the whole row is 0 otherwise), which also zeroes invalid rows' encodings for free: two NumPy
    calls fewer per state than `relu(x @ W + b) * valid`, the same numbers.
    """

    ws: np.ndarray
    wc: np.ndarray
    bc: np.ndarray
    w1x: np.ndarray
    w1u: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    wo: np.ndarray
    bo: float
    wv1: np.ndarray
    bv1: np.ndarray
    wv2: np.ndarray
    bv2: float

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> NumpyWeights:
        def get(key: str) -> np.ndarray:
            return sd[key].detach().to("cpu", torch.float32).numpy()

        def t(key: str) -> np.ndarray:
            return np.ascontiguousarray(get(key).T)

        ws = t("static.weight")
        ws[F_VALID] += get("static.bias")
        return cls(
            ws=ws,
            wc=t("cluster.weight"),
            bc=get("cluster.bias").copy(),
            w1x=t("row_x.weight"),
            w1u=t("row_u.weight"),
            b1=get("row_x.bias").copy(),
            w2=t("row2.weight"),
            b2=get("row2.bias").copy(),
            wo=np.ascontiguousarray(t("score.weight")[:, 0]),
            bo=float(get("score.bias")[0]),
            wv1=t("value1.weight"),
            bv1=get("value1.bias").copy(),
            wv2=np.ascontiguousarray(t("value2.weight")[:, 0]),
            bv2=float(get("value2.bias")[0]),
        )


def cluster_summary(w: NumpyWeights, rows: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """u for one state: `rows` (k, ROW_FEATURES) are the state's rows (padding may be left out: zero
    rows change neither the masked mean nor the max), `ctx` its CONTEXT_FEATURES."""
    z = rows[:, :STATIC_FEATURES] @ w.ws
    np.maximum(z, 0.0, out=z)
    s = z.shape[1]
    pooled = np.empty(2 * s + STATIC_CONTEXT, dtype=np.float32)
    # ufunc.reduce directly: np.sum / np.max add a Python wrapper (~1 µs each) to a 16 x 32 reduction.
    np.add.reduce(z, axis=0, out=pooled[:s])
    pooled[:s] *= 1.0 / max(1.0, float(np.add.reduce(rows[:, F_VALID])))
    np.maximum.reduce(z, axis=0, out=pooled[s : 2 * s])
    pooled[2 * s :] = ctx[:STATIC_CONTEXT]
    u: np.ndarray = pooled @ w.wc
    u += w.bc
    np.maximum(u, 0.0, out=u)
    return u


def row_scores(w: NumpyWeights, rows: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A_b for each of `rows` (k, ROW_FEATURES), given `bias` = u @ w1u + b1 of their state."""
    h = rows @ w.w1x
    h += bias
    np.maximum(h, 0.0, out=h)
    h2 = h @ w.w2
    h2 += w.b2
    np.maximum(h2, 0.0, out=h2)
    a: np.ndarray = h2 @ w.wo
    a += w.bo
    return a


def state_value(w: NumpyWeights, u: np.ndarray, ctx: np.ndarray) -> float:
    """V of one state (the action-independent part of every Q-value)."""
    hv = np.concatenate([u, ctx[STATIC_CONTEXT:]]).astype(np.float32) @ w.wv1
    hv += w.bv1
    np.maximum(hv, 0.0, out=hv)
    return float(hv @ w.wv2) + w.bv2


def numpy_q(w: NumpyWeights, x: np.ndarray) -> np.ndarray:
    """Q-values for a (batch, obs_dim) float32 array: the same function as QNetwork.forward."""
    width = state_width(x.shape[-1])
    out = np.empty((x.shape[0], width), dtype=np.float32)
    for k in range(x.shape[0]):
        rows = x[k, : width * ROW_FEATURES].reshape(width, ROW_FEATURES)
        ctx = x[k, width * ROW_FEATURES :]
        u = cluster_summary(w, rows, ctx)
        out[k] = row_scores(w, rows, u @ w.w1u + w.b1) + state_value(w, u, ctx)
    return out


class RowScorer:
    """The backend scores A_b of one state, and of the same state after more dispatches, without
    re-running the network: the pooled summary does not depend on in-flight counts (module docstring),
    so `bias` is computed once per state and each hypothetical row costs one row pass."""

    __slots__ = ("bias", "weights")

    def __init__(self, w: NumpyWeights, rows: np.ndarray, ctx: np.ndarray) -> None:
        self.weights = w
        bias = cluster_summary(w, rows, ctx) @ w.w1u
        bias += w.b1
        self.bias = bias

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return row_scores(self.weights, rows, self.bias)
