"""State features, reward, Gini and decision accuracy: the ONE implementation shared by the live
proxy and the simulator.

Sim-to-live transfer depends on both sides computing features and rewards with exactly this code,
so neither the proxy nor the simulator keeps per-backend statistics of its own: they drive a
:class:`ClusterView` through :meth:`ClusterView.on_dispatch` / :meth:`ClusterView.on_complete` and
read everything else from here.

Hot-path note: per-backend state is kept in plain Python lists, not NumPy arrays. Heuristic
policies read a handful of scalars per decision, and scalar indexing of a list costs ~20 ns against
~100 ns for a NumPy element; only the DQN needs the dense vector (:func:`encode_state`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAX_BACKENDS = 16
"""Width of the state and action space; the pool may hold fewer backends (padded + masked)."""

PER_BACKEND_FEATURES = 5
"""in-flight (normalised), peak-EWMA latency (normalised), EWMA error rate, available bit, recent share."""


class RequestClass(IntEnum):
    """Request classes by path; the emulated backends and the simulator use the same three."""

    LIGHT = 0
    HEAVY = 1
    STATIC = 2


NUM_CLASSES = len(RequestClass)

GLOBAL_FEATURES = NUM_CLASSES + 1  # class one-hot + global in-flight


def feature_dim(max_backends: int = MAX_BACKENDS) -> int:
    return max_backends * PER_BACKEND_FEATURES + GLOBAL_FEATURES


FEATURE_DIM = feature_dim()


def classify_path(path: str) -> RequestClass:
    """Map a request path to its class. Anything not recognisably heavy or static counts as light."""
    if path.startswith("/static/"):
        return RequestClass.STATIC
    if path.startswith("/api/heavy"):
        return RequestClass.HEAVY
    return RequestClass.LIGHT


# --- defaults, with the reason beside each ---------------------------------------------------------
PEAK_EWMA_TAU_S = 10.0
"""Decay time of the peak-EWMA latency cost: Finagle/Linkerd default (tower `PeakEwma`, decay 10 s)."""

DEFAULT_RTT_S = 0.03
"""Initial latency cost of a backend never measured; linkerd2-proxy's default RTT estimate (30 ms)."""

ERROR_EWMA_ALPHA = 0.05
"""Per-completion smoothing of the error rate: ~20 completions of memory, fast enough to see a fault."""

SHARE_DECAY = 0.01
"""Per-decision decay of the recent-share counters (~100 decisions of memory)."""

INFLIGHT_SCALE = 8.0
"""In-flight counts are divided by this before entering the network (keeps features ~[0, 2])."""

LATENCY_SCALE_S = 0.1
"""Latencies are divided by this in features and in the reward (100 ms ~ 1.0)."""

ERROR_PENALTY = 5.0
"""Reward penalty for an error or timeout, in units of `LATENCY_SCALE_S` (an error costs as much as
a 500 ms response): large enough that the agent never prefers a failing backend for speed."""


@dataclass(slots=True)
class Outcome:
    """What became of one routed request; fed to `ClusterView.on_complete` and `Policy.observe`."""

    backend: int
    req_class: int
    latency_s: float
    error: bool
    decision_id: int = -1
    service_time_s: float | None = None  # reported by the backend (header / simulator) when known


@dataclass(slots=True)
class ClusterView:
    """Per-backend state that every policy reads; updated in place by the pool or the simulator.

    Index `i` is a backend slot (0 <= i < n). `available[i]` is False for slots that are unhealthy,
    ejected or removed: every policy must choose among `candidates` only.
    """

    n: int
    in_flight: list[int] = field(default_factory=list)
    latency_cost_s: list[float] = field(default_factory=list)
    """Peak-EWMA latency (Finagle): jumps up to a slower sample at once, decays with tau."""
    error_rate: list[float] = field(default_factory=list)
    available: list[bool] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    """Relative capacity (configured weight, or workers x speed in the simulator); 1.0 when unknown."""
    service_time_s: list[float] = field(default_factory=list)
    """EWMA of the per-request service time (backend-reported or simulated), falling back to latency."""
    rate: list[float] = field(default_factory=list)
    """Estimated requests/s each backend completes when busy: capacity / service_time_s. Kept current by
    `on_complete` (one division per completion) so per-decision readers (SED, accuracy) allocate nothing."""
    share: list[float] = field(default_factory=list)
    last_update_s: list[float] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    total_in_flight: int = 0
    _share_scale: float = 1.0

    @classmethod
    def create(cls, n: int, capacity: Sequence[float] | None = None) -> ClusterView:
        if not 1 <= n <= MAX_BACKENDS:
            raise ValueError(f"backend count must be between 1 and {MAX_BACKENDS}, got {n}")
        cap = [float(c) for c in capacity] if capacity is not None else [1.0] * n
        view = cls(
            n=n,
            in_flight=[0] * n,
            latency_cost_s=[DEFAULT_RTT_S] * n,
            error_rate=[0.0] * n,
            available=[True] * n,
            capacity=cap,
            service_time_s=[DEFAULT_RTT_S] * n,
            rate=[c / DEFAULT_RTT_S for c in cap],
            share=[0.0] * n,
            last_update_s=[0.0] * n,
        )
        view.refresh_candidates()
        return view

    def refresh_candidates(self) -> None:
        """Recompute `candidates` after any change to `available` (rare: health events only)."""
        self.candidates = [i for i in range(self.n) if self.available[i]]

    def set_available(self, i: int, available: bool) -> None:
        if self.available[i] != available:
            self.available[i] = available
            self.refresh_candidates()

    def add_backend(self, capacity: float = 1.0) -> int:
        """Append a slot (runtime add through the admin API). Returns its index."""
        if self.n >= MAX_BACKENDS:
            raise ValueError(f"at most {MAX_BACKENDS} backends are supported")
        self.n += 1
        self.in_flight.append(0)
        self.latency_cost_s.append(DEFAULT_RTT_S)
        self.error_rate.append(0.0)
        self.available.append(True)
        self.capacity.append(float(capacity))
        self.service_time_s.append(DEFAULT_RTT_S)
        self.rate.append(float(capacity) / DEFAULT_RTT_S)
        self.share.append(0.0)
        self.last_update_s.append(0.0)
        self.refresh_candidates()
        return self.n - 1

    # --- the two events that change statistics ----------------------------------------------------
    def on_dispatch(self, i: int) -> None:
        self.in_flight[i] += 1
        self.total_in_flight += 1
        # Lazy exponential decay of decision shares: bump the increment instead of scaling all slots.
        self._share_scale /= 1.0 - SHARE_DECAY
        self.share[i] += self._share_scale
        if self._share_scale > 1e100:
            self.share = [s / self._share_scale for s in self.share]
            self._share_scale = 1.0

    def on_complete(self, out: Outcome, now_s: float) -> None:
        i = out.backend
        self.in_flight[i] -= 1
        self.total_in_flight -= 1
        rtt = out.latency_s
        cost = self.latency_cost_s[i]
        if rtt > cost:
            cost = rtt  # peak sensitivity: a slow response is believed at once
        else:
            w = math.exp(-max(0.0, now_s - self.last_update_s[i]) / PEAK_EWMA_TAU_S)
            cost = cost * w + rtt * (1.0 - w)
        self.latency_cost_s[i] = cost
        self.last_update_s[i] = now_s
        self.error_rate[i] += ERROR_EWMA_ALPHA * ((1.0 if out.error else 0.0) - self.error_rate[i])
        st = out.service_time_s if out.service_time_s is not None else rtt
        self.service_time_s[i] += 0.1 * (st - self.service_time_s[i])
        self.rate[i] = self.capacity[i] / max(self.service_time_s[i], 1e-6)

    def decayed_cost(self, i: int, now_s: float) -> float:
        """Peak-EWMA cost decayed to `now_s` (tower's `PeakEwma` decays the estimate when read)."""
        w = math.exp(-max(0.0, now_s - self.last_update_s[i]) / PEAK_EWMA_TAU_S)
        return self.latency_cost_s[i] * w

    def set_service_time(self, i: int, seconds: float) -> None:
        """Set backend i's service-time estimate outright (and the rate derived from it)."""
        self.service_time_s[i] = seconds
        self.rate[i] = self.capacity[i] / max(seconds, 1e-6)

    def estimated_rate(self, i: int) -> float:
        """Requests/s backend i completes when busy: capacity over the smoothed service time."""
        return self.rate[i]

    def shares(self) -> list[float]:
        total = sum(self.share)
        if total <= 0.0:
            return [0.0] * self.n
        return [s / total for s in self.share]


# --- state encoding ---------------------------------------------------------------------------------
def action_mask(view: ClusterView, max_backends: int = MAX_BACKENDS, out: np.ndarray | None = None) -> np.ndarray:
    mask = out if out is not None else np.zeros(max_backends, dtype=bool)
    mask[:] = False
    for i in view.candidates:
        mask[i] = True
    return mask


def encode_state(
    view: ClusterView,
    req_class: int,
    max_backends: int = MAX_BACKENDS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Fixed-width float32 state: per-backend block then class one-hot then global in-flight.

    Layout (documented because the checkpoint's meaning depends on it):
    ``[b0: inflight/8, latency/0.1s, error, available, share, b1: ..., ..., onehot(3), total/(8*n)]``.
    Padded slots are all zero (and masked out of the action space).
    """
    dim = feature_dim(max_backends)
    x = out if out is not None else np.empty(dim, dtype=np.float32)
    x[:] = 0.0
    total = sum(view.share)
    inv_total = 1.0 / total if total > 0.0 else 0.0
    k = 0
    for i in range(view.n):
        x[k] = view.in_flight[i] / INFLIGHT_SCALE
        x[k + 1] = min(view.latency_cost_s[i] / LATENCY_SCALE_S, 50.0)
        x[k + 2] = view.error_rate[i]
        x[k + 3] = 1.0 if view.available[i] else 0.0
        x[k + 4] = view.share[i] * inv_total
        k += PER_BACKEND_FEATURES
    base = max_backends * PER_BACKEND_FEATURES
    x[base + int(req_class)] = 1.0
    x[base + NUM_CLASSES] = view.total_in_flight / (INFLIGHT_SCALE * max(1, view.n))
    return x


def dispatch_states(view: ClusterView, state: np.ndarray, max_backends: int = MAX_BACKENDS) -> np.ndarray:
    """`state` (what `encode_state` gives for `view`) followed by one row per slot in
    `view.candidates`: the state as it will read after one more request is dispatched to that slot
    (`ClusterView.on_dispatch`), computed without touching the view.

    The live dqn policy decides a whole loop iteration's requests from one state; Q of these rows
    minus Q of `state` is how each dispatch it makes moves the Q-values of the next decision.
    """
    cands = view.candidates
    k = len(cands)
    rows = np.empty((k + 1, state.shape[0]), dtype=np.float32)
    rows[:] = state
    if k == 0:
        return rows
    n = view.n
    slots = np.asarray(cands, dtype=np.intp) * PER_BACKEND_FEATURES
    below = np.arange(1, k + 1)
    total = sum(view.share)
    step = view._share_scale / (1.0 - SHARE_DECAY)  # the increment on_dispatch will add
    share_cols = slice(4, n * PER_BACKEND_FEATURES, PER_BACKEND_FEATURES)
    rows[1:, share_cols] *= total / (total + step)
    rows[below, slots + 4] += step / (total + step)
    rows[below, slots] += 1.0 / INFLIGHT_SCALE
    rows[1:, max_backends * PER_BACKEND_FEATURES + NUM_CLASSES] += 1.0 / (INFLIGHT_SCALE * max(1, n))
    return rows


# --- reward -----------------------------------------------------------------------------------------
def reward(
    latency_s: float,
    error: bool,
    latency_scale_s: float = LATENCY_SCALE_S,
    error_penalty: float = ERROR_PENALTY,
) -> float:
    """r = -latency / latency_scale - error_penalty * [error or timeout].

    Latency is end-to-end at the proxy (queueing included), so the agent pays for sending work to a
    backend that is already busy. Gini and accuracy are measured, not rewarded: rewarding fairness
    would fight the latency objective on heterogeneous clusters.
    """
    return -latency_s / latency_scale_s - (error_penalty if error else 0.0)


# --- fairness and accuracy --------------------------------------------------------------------------
def gini(load: Sequence[float], capacity: Sequence[float] | None = None) -> float:
    """Gini coefficient of load/capacity: 0 when load is in proportion to capacity, ->1 when one
    backend takes everything. Mean absolute difference formulation: sum|xi-xj| / (2 n^2 mean)."""
    n = len(load)
    if n == 0:
        return 0.0
    if capacity is None:
        xs = [float(v) for v in load]
    else:
        xs = [float(v) / c if c > 0 else 0.0 for v, c in zip(load, capacity, strict=True)]
    mean = sum(xs) / n
    if mean <= 0.0:
        return 0.0
    xs.sort()
    # sorted form: sum_i (2i - n + 1) x_i  ==  (1/2) sum_i sum_j |x_i - x_j|
    acc = sum((2 * i - n + 1) * x for i, x in enumerate(xs))
    return acc / (n * n * mean)


def sed_choices(in_flight: Sequence[int], rate: Sequence[float], candidates: Sequence[int]) -> list[int]:
    """Backends the shortest-expected-delay oracle would pick: argmin (in_flight + 1) / rate (ties kept)."""
    best = math.inf
    chosen: list[int] = []
    for i in candidates:
        d = (in_flight[i] + 1) / rate[i] if rate[i] > 0 else math.inf
        if d < best * (1 - 1e-9):
            best = d
            chosen = [i]
        elif d <= best * (1 + 1e-9):
            chosen.append(i)
    return chosen


def is_accurate(action: int, in_flight: Sequence[int], rate: Sequence[float], candidates: Sequence[int]) -> bool:
    """Decision accuracy: did `action` match (one of) the SED oracle's choices?"""
    return action in sed_choices(in_flight, rate, candidates)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


@dataclass(slots=True)
class WindowSummary:
    decisions: int
    mean_reward: float
    gini: float
    accuracy: float
    mean_latency_s: float
    p50_s: float
    p99_s: float
    p999_s: float
    error_rate: float


@dataclass(slots=True)
class WindowStats:
    """Accumulates one window (an episode, or a live reporting interval) of decisions and outcomes.

    Used by the simulator's episodes, the live proxy's gauges and evaluation tables, so that
    "Gini" or "accuracy" means the same everywhere.
    """

    n: int
    latency_scale_s: float = LATENCY_SCALE_S
    error_penalty: float = ERROR_PENALTY
    decisions: int = 0
    accurate: int = 0
    load: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    reward_sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.load:
            self.load = [0] * self.n

    def record_decision(self, action: int, accurate: bool) -> None:
        self.decisions += 1
        self.accurate += accurate
        if action >= len(self.load):
            self.load.extend([0] * (action + 1 - len(self.load)))
        self.load[action] += 1

    def record_outcome(self, out: Outcome) -> float:
        r = reward(out.latency_s, out.error, self.latency_scale_s, self.error_penalty)
        self.reward_sum += r
        self.latencies.append(out.latency_s)
        self.errors += out.error
        return r

    def summary(
        self, capacity: Sequence[float] | None = None, candidates: Sequence[int] | None = None
    ) -> WindowSummary:
        """Gini over `candidates` (default all slots) so ejected backends do not count as unfair."""
        idx = list(candidates) if candidates is not None else list(range(len(self.load)))
        load = [self.load[i] for i in idx]
        cap = [capacity[i] for i in idx] if capacity is not None else None
        lat = sorted(self.latencies)
        m = len(lat)
        return WindowSummary(
            decisions=self.decisions,
            mean_reward=self.reward_sum / m if m else 0.0,
            gini=gini(load, cap),
            accuracy=self.accurate / self.decisions if self.decisions else 0.0,
            mean_latency_s=sum(lat) / m if m else 0.0,
            p50_s=percentile(lat, 50),
            p99_s=percentile(lat, 99),
            p999_s=percentile(lat, 99.9),
            error_rate=self.errors / m if m else 0.0,
        )
