"""State features, reward, Gini and decision accuracy: the ONE implementation shared by the live
proxy and the simulator.

Sim-to-live transfer depends on both sides computing features and rewards with exactly this code,
so neither the proxy nor the simulator keeps per-backend statistics of its own: they drive a
:class:`ClusterView` through :meth:`ClusterView.on_dispatch` / :meth:`ClusterView.on_complete` and
read everything else from here.

A backend is known by how it behaves, never by its slot (DESIGN.md §4): the DQN's state is one row
of behavioural features per backend (:func:`encode_state`) plus a small context, every latency in
units of the cluster's own typical latency, so the same weights route a cluster of any size, in any
order, at any latency scale. Measured 2026-12-01: a flat slot-indexed state learned "slot 2 is fast"
and was 1.8-7x worse than least_conn off its training cluster.

Hot-path note: per-backend state is kept in plain Python lists, not NumPy arrays. Heuristic
policies read a handful of scalars per decision, and scalar indexing of a list costs ~20 ns against
~100 ns for a NumPy element; only the DQN needs dense arrays, built once per loop iteration live.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAX_BACKENDS = 64
"""Most backends one pool (and one state) holds. The Q-network scores each backend from its own row,
so its weights do not depend on this: it only sizes the inference buffers."""

LEARNING_WIDTH_MIN = 16
"""Rows of a learning state (replay buffer) at least; see :func:`learning_width`."""


class RequestClass(IntEnum):
    """Request classes by path; the emulated backends and the simulator use the same three."""

    LIGHT = 0
    HEAVY = 1
    STATIC = 2


NUM_CLASSES = len(RequestClass)


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

LATENCY_EWMA_ALPHA = 0.1
"""Per-completion smoothing of the per-class latency and service-time estimates (~10 completions)."""

TYPICAL_EWMA_ALPHA = 0.01
"""Smoothing of the cluster's typical service time (~100 completions): the unit every latency feature
and the reward are expressed in. Slow on purpose: it is a scale, not a signal."""

SHARE_DECAY = 0.01
"""Per-completion decay of the recent-share counters (~100 completions of memory)."""

CONCURRENCY_RISE = 0.3
CONCURRENCY_FALL = 0.03
"""Asymmetric smoothing of the observed concurrency (below): it rises quickly to evidence of more
parallelism and forgets it slowly, because a lightly loaded backend only shows a lower bound."""

ERROR_PENALTY = 50.0
"""Reward penalty for an error or timeout, in typical latencies (an error costs as much as a response
50 times slower than usual): large enough that the agent never prefers a failing backend for speed,
including a crashed one that refuses connections in a millisecond."""

CLIP_RATIO = 50.0
"""Latency ratios entering the network are clipped here (a stalled backend reads 'very slow', not inf)."""


@dataclass(slots=True)
class Outcome:
    """What became of one routed request; fed to `ClusterView.on_complete` and `Policy.observe`."""

    backend: int
    req_class: int
    latency_s: float
    error: bool
    decision_id: int = -1
    service_time_s: float | None = None  # reported by the backend (header / simulator) when known
    queued_behind: int = -1
    """Requests in flight at the backend when this one was dispatched (-1: unknown). Requests sent to an
    idle backend measure its pure service time even when it reports none (a backend we did not write)."""


def _rows(n: int, value: float) -> list[list[float]]:
    return [[value] * n for _ in range(NUM_CLASSES)]


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
    """EWMA of the per-request service time over all classes (backend-reported, else measured)."""
    latency_s: list[float] = field(default_factory=list)
    """EWMA of end-to-end latency over all classes (from the first completion on, no default in it)."""
    samples: list[int] = field(default_factory=list)
    """Completions seen per backend (capped)."""
    consecutive_errors: list[int] = field(default_factory=list)
    """Errors in a row per backend (reset by a success)."""
    class_latency_s: list[list[float]] = field(default_factory=list)
    """[class][backend] EWMA of end-to-end latency (queueing included)."""
    class_service_s: list[list[float]] = field(default_factory=list)
    """[class][backend] EWMA of the service time: backend-reported, else the latency of requests sent
    while the backend was idle (no queueing in them)."""
    class_samples: list[list[int]] = field(default_factory=list)
    """[class][backend] completions seen (capped): 0 means the class estimates are still the default."""
    concurrency: list[float] = field(default_factory=list)
    """Observed concurrency (how many requests the backend serves in parallel), by Little's law on each
    completion: (queued_behind + 1) x service / latency is the backend's parallelism when the request
    queued, a lower bound when it did not."""
    class_rate: list[list[float]] = field(default_factory=list)
    """[class][backend] estimated requests/s when busy: concurrency / class service time, refreshed by
    each completion of that class at that backend, so per-decision readers (SED, accuracy) allocate
    nothing."""
    share: list[float] = field(default_factory=list)
    """Decayed count of recent completions (lazily scaled, see `shares`)."""
    last_update_s: list[float] = field(default_factory=list)
    """Time of each backend's last completion."""
    typical_s: list[float] = field(default_factory=list)
    """[class] the cluster's typical service time: the unit of every latency feature."""
    typical_all_s: float = DEFAULT_RTT_S
    """The same over all classes: the unit of the reward."""
    typical_samples: list[int] = field(default_factory=list)
    """[class, then all] service-time samples behind `typical_s` / `typical_all_s` (capped): until there
    are 1 / TYPICAL_EWMA_ALPHA of them the estimate is their plain mean, so the default never biases it."""
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
            latency_s=[DEFAULT_RTT_S] * n,
            samples=[0] * n,
            consecutive_errors=[0] * n,
            class_latency_s=_rows(n, DEFAULT_RTT_S),
            class_service_s=_rows(n, DEFAULT_RTT_S),
            class_samples=[[0] * n for _ in range(NUM_CLASSES)],
            concurrency=[1.0] * n,
            class_rate=_rows(n, 1.0 / DEFAULT_RTT_S),
            share=[0.0] * n,
            last_update_s=[0.0] * n,
            typical_s=[DEFAULT_RTT_S] * NUM_CLASSES,
            typical_samples=[0] * (NUM_CLASSES + 1),
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
        self.latency_s.append(DEFAULT_RTT_S)
        self.samples.append(0)
        self.consecutive_errors.append(0)
        for c in range(NUM_CLASSES):
            self.class_latency_s[c].append(self.typical_s[c])
            self.class_service_s[c].append(self.typical_s[c])
            self.class_samples[c].append(0)
            self.class_rate[c].append(1.0 / self.typical_s[c])
        self.concurrency.append(1.0)
        self.share.append(0.0)
        self.last_update_s.append(0.0)
        self.refresh_candidates()
        return self.n - 1

    # --- the two events that change statistics ----------------------------------------------------
    def on_dispatch(self, i: int) -> None:
        self.in_flight[i] += 1
        self.total_in_flight += 1

    def on_complete(self, out: Outcome, now_s: float) -> None:
        i = out.backend
        c = out.req_class
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
        if out.error:
            self.error_rate[i] += ERROR_EWMA_ALPHA * (1.0 - self.error_rate[i])
            self.consecutive_errors[i] += 1
        else:
            self.error_rate[i] -= ERROR_EWMA_ALPHA * self.error_rate[i]
            self.consecutive_errors[i] = 0
        # Lazy exponential decay of completion shares: bump the increment instead of scaling all slots.
        self._share_scale /= 1.0 - SHARE_DECAY
        self.share[i] += self._share_scale
        if self._share_scale > 1e100:
            self.share = [s / self._share_scale for s in self.share]
            self._share_scale = 1.0
        first = self.samples[i] == 0
        if self.samples[i] < 1_000_000:
            self.samples[i] += 1
        self.latency_s[i] = rtt if first else self.latency_s[i] + LATENCY_EWMA_ALPHA * (rtt - self.latency_s[i])
        samples = self.class_samples[c]
        k = samples[i]
        lat = self.class_latency_s[c]
        lat[i] = rtt if k == 0 else lat[i] + LATENCY_EWMA_ALPHA * (rtt - lat[i])
        if k < 1000:
            samples[i] = k + 1
        st = out.service_time_s
        if st is None and out.queued_behind == 0 and not out.error:
            st = rtt  # sent to an idle backend: nothing queued in front of it
        svc = self.class_service_s[c]
        if st is not None:
            svc[i] = st if k == 0 else svc[i] + LATENCY_EWMA_ALPHA * (st - svc[i])
            self.service_time_s[i] = st if first else self.service_time_s[i] + 0.1 * (st - self.service_time_s[i])
            ts = self.typical_samples
            m = ts[c] = ts[c] + 1 if ts[c] < 1_000_000 else ts[c]
            self.typical_s[c] += max(TYPICAL_EWMA_ALPHA, 1.0 / m) * (st - self.typical_s[c])
            m = ts[NUM_CLASSES] = ts[NUM_CLASSES] + 1 if ts[NUM_CLASSES] < 1_000_000 else ts[NUM_CLASSES]
            self.typical_all_s += max(TYPICAL_EWMA_ALPHA, 1.0 / m) * (st - self.typical_all_s)
        else:
            if k == 0:
                svc[i] = rtt  # first word on this class: better than the default until an idle sample comes
            if first:
                self.service_time_s[i] = rtt
        q = out.queued_behind
        if q >= 0 and rtt > 0.0 and not out.error:
            ratio = (st if st is not None else svc[i]) / rtt
            sample = (q + 1) * (ratio if ratio < 1.0 else 1.0)
            conc = self.concurrency[i]
            conc += (CONCURRENCY_RISE if sample > conc else CONCURRENCY_FALL) * (sample - conc)
            self.concurrency[i] = conc if conc > 1.0 else 1.0
        # The completing class's rate only: the others catch up on their own next completion here (one
        # division per request instead of one per class: this runs for every policy).
        s_i = svc[i]
        self.class_rate[c][i] = self.concurrency[i] / (s_i if s_i > 1e-6 else 1e-6)

    def decayed_cost(self, i: int, now_s: float) -> float:
        """Peak-EWMA cost decayed to `now_s` (tower's `PeakEwma` decays the estimate when read)."""
        w = math.exp(-max(0.0, now_s - self.last_update_s[i]) / PEAK_EWMA_TAU_S)
        return self.latency_cost_s[i] * w

    def shares(self) -> list[float]:
        """Each backend's share of recent completions."""
        total = sum(self.share)
        if total <= 0.0:
            return [0.0] * self.n
        return [s / total for s in self.share]


# --- state encoding ---------------------------------------------------------------------------------
# One row per backend slot. The last three columns (dynamic) are the only ones a dispatch changes: a
# dispatch to backend b changes row b's in-flight count and nothing else of any row, so the live
# policy can decide a loop iteration's requests one after another with an exact re-score of one row
# each (`dispatch_rows`). Everything else changes on completions only.
F_VALID = 0
"""1 for a candidate slot; 0 for padding and for slots no policy may choose (their row is all zero)."""
F_AVAILABLE = 1
"""1 unless the slot is a candidate only through panic mode (unhealthy or ejected)."""
F_LATENCY = 2
"""Latency EWMA of the request's class / typical latency of the class."""
F_SERVICE = 3
"""Service-time EWMA of the class / typical latency of the class."""
F_LATENCY_ALL = 4
"""Latency EWMA over all classes (the mean of the class EWMAs) / typical latency over all classes."""
F_LOG_CONCURRENCY = 5
"""log(observed concurrency)."""
F_ERROR = 6
"""Error-rate EWMA."""
F_SHARE = 7
"""Share of recent completions x candidate count (1 = a fair share)."""
F_IDLE = 8
"""log1p(time since the last completion / typical latency): a backend that stopped answering."""
F_CONFIDENCE = 9
"""min(1, completions of the class / 10): how much the class estimates can be trusted."""
F_FAILING = 10
"""min(consecutive errors, 5) / 5: a backend that just started failing, seen from its first error (the
error EWMA needs ~20 completions; outlier ejection acts after 5 in a row)."""
STATIC_FEATURES = 11
"""Columns 0..10 do not change on a dispatch: the pooled cluster summary is built from these only."""
F_LOG_IN_FLIGHT = 11
"""log1p(in-flight) (dynamic)."""
F_UTILISATION = 12
"""in-flight / observed concurrency (dynamic)."""
F_EXPECTED = 13
"""Expected latency of one more request of the class: service x max(1, (in-flight + 1) / concurrency),
in typical latencies (dynamic). The queueing model every heuristic approximates, given to the network
outright; it learns where the model is wrong."""
ROW_FEATURES = 14

C_CLASS = 0
"""Context: request-class one-hot (NUM_CLASSES columns)."""
C_LOG_COUNT = NUM_CLASSES
"""log(candidate count)."""
C_LOG_SCALE = NUM_CLASSES + 1
"""log10(typical latency of the class / 1 s): the log-absolute term (about -2 for a 10 ms service)."""
C_LOAD = NUM_CLASSES + 2
"""Total in-flight / total observed concurrency (dynamic: enters only the action-independent value)."""
C_LOG_TOTAL = NUM_CLASSES + 3
"""log1p(total in-flight) (dynamic, ditto)."""
CONTEXT_FEATURES = NUM_CLASSES + 4
STATIC_CONTEXT = NUM_CLASSES + 2
"""Context columns before C_LOAD: the ones the per-backend scores may read."""


def feature_dim(width: int = MAX_BACKENDS) -> int:
    """Length of a flat state: `width` rows of ROW_FEATURES, then the context."""
    return width * ROW_FEATURES + CONTEXT_FEATURES


def state_width(obs_dim: int) -> int:
    """Rows in a flat state of length `obs_dim` (the inverse of feature_dim)."""
    width, rest = divmod(obs_dim - CONTEXT_FEATURES, ROW_FEATURES)
    if rest or width < 1:
        raise ValueError(f"{obs_dim} is not a state length ({ROW_FEATURES} x rows + {CONTEXT_FEATURES})")
    return width


def learning_width(n: int) -> int:
    """Rows a replay buffer stores per state for a cluster of n slots: the next power of two from
    LEARNING_WIDTH_MIN up. Replay memory grows with the width, and the network does not care."""
    w = LEARNING_WIDTH_MIN
    while w < n:
        w *= 2
    return min(w, MAX_BACKENDS)


def action_mask(view: ClusterView, width: int = MAX_BACKENDS, out: np.ndarray | None = None) -> np.ndarray:
    mask = out if out is not None else np.zeros(width, dtype=bool)
    mask[:] = False
    for i in view.candidates:
        mask[i] = True
    return mask


LOOP_ENCODE_MAX = 16
"""encode_state builds rows in a Python loop up to this many backends, with NumPy above (measured
2026-12-01: 12 vs 46 µs at 1-4 backends, 41 vs 49 at 16, 236 vs 119 at 64)."""

_RATIO_ROWS = [3, 2, 4]
"""Rows of encode_state's raw block that F_LATENCY, F_SERVICE, F_LATENCY_ALL divide (class latency,
class service, all-class latency)."""
_COUNT_ROWS = [9, 12]
_COUNT_SCALE = np.array([[0.1], [0.2]])
"""F_CONFIDENCE = class completions / 10 and F_FAILING = consecutive errors / 5, both capped at 1."""


def encode_state(
    view: ClusterView,
    req_class: int,
    now_s: float,
    width: int = MAX_BACKENDS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Flat float32 state: `width` rows of ROW_FEATURES (columns F_*), then CONTEXT_FEATURES (C_*).

    Rows of slots that are not candidates, and padding rows beyond `view.n`, are all zero (F_VALID = 0:
    masked out of the pooled summary and of the action space). Every latency is divided by the
    cluster's own typical latency (`view.typical_s`), so a 5 ms and a 500 ms application with the same
    shape of load read the same; C_LOG_SCALE alone says which one it is.
    """
    if width < view.n:
        raise ValueError(f"a state of {width} rows cannot hold {view.n} backends")
    x = out if out is not None else np.empty(feature_dim(width), dtype=np.float32)
    x[:] = 0.0
    n = view.n
    c = int(req_class)
    cands = view.candidates
    typ = max(view.typical_s[c], 1e-6)
    typ_all = max(view.typical_all_s, 1e-6)
    rows = x[: width * ROW_FEATURES].reshape(width, ROW_FEATURES)
    if n <= LOOP_ENCODE_MAX:
        _rows_loop(view, c, now_s, typ, typ_all, rows)
    else:
        _rows_vector(view, c, now_s, typ, typ_all, rows)
    ctx = x[width * ROW_FEATURES :]
    ctx[C_CLASS + c] = 1.0
    ctx[C_LOG_COUNT] = math.log(max(1, len(cands)))
    ctx[C_LOG_SCALE] = math.log10(typ)
    total_conc = sum(view.concurrency[i] for i in cands) if cands else 1.0
    ctx[C_LOAD] = min(view.total_in_flight / total_conc, CLIP_RATIO)
    ctx[C_LOG_TOTAL] = math.log1p(view.total_in_flight)
    return x


def _rows_loop(view: ClusterView, c: int, now_s: float, typ: float, typ_all: float, rows: np.ndarray) -> None:
    """encode_state's rows, one candidate at a time in plain Python: 3-4x cheaper than the vector form
    for a few backends (the usual pool), the same numbers (tests/test_observe.py checks both agree).
    Non-candidate rows stay zero."""
    cands = view.candidates
    if not cands:
        return
    inv, inv_all = 1.0 / typ, 1.0 / typ_all
    ratio = typ / typ_all
    total_share = sum(view.share)
    share_scale = len(cands) / total_share if total_share > 0.0 else 0.0
    conc_l, inf_l = view.concurrency, view.in_flight
    svc_l, lat_l, csamp = view.class_service_s[c], view.class_latency_s[c], view.class_samples[c]
    lat_all, svc_all, samples = view.latency_s, view.service_time_s, view.samples
    err, share, last, avail, cons = (
        view.error_rate,
        view.share,
        view.last_update_s,
        view.available,
        view.consecutive_errors,
    )
    log, log1p, clip = math.log, math.log1p, CLIP_RATIO
    vals: list[float] = []
    ext = vals.extend
    for i in cands:
        k = csamp[i]
        if k:
            svc, lat = svc_l[i], lat_l[i]
        elif samples[i]:  # imputed as in _class_estimates
            svc, lat = svc_all[i] * ratio, lat_all[i] * ratio
        else:
            svc = lat = typ
        sv = min(svc * inv, clip)
        la = min(lat_all[i] * inv_all, clip) if samples[i] else 1.0
        idle = now_s - last[i]
        q = inf_l[i]
        w = conc_l[i]
        expected = max(1.0, (q + 1.0) / w) * sv
        ext(
            (
                i,
                1.0,
                1.0 if avail[i] else 0.0,
                min(lat * inv, clip),
                sv,
                la,
                log(w),
                err[i],
                share[i] * share_scale,
                log1p((idle if idle > 0.0 else 0.0) * inv),
                min(k * 0.1, 1.0),
                min(cons[i] * 0.2, 1.0),
                log1p(q),
                min(q / w, clip),
                min(expected, clip),
            )
        )
    block = np.array(vals, dtype=np.float64).reshape(len(cands), ROW_FEATURES + 1)
    rows[block[:, 0].astype(np.intp)] = block[:, 1:]


def _rows_vector(view: ClusterView, c: int, now_s: float, typ: float, typ_all: float, rows: np.ndarray) -> None:
    """encode_state's rows with NumPy over all backends at once: fewer interpreter steps than the loop
    from about 16 backends up (each NumPy call costs ~1 µs at this size, whatever the size)."""
    n = view.n
    cands = view.candidates
    raw = np.array(  # one list -> array conversion for everything per backend
        (
            view.concurrency,
            view.in_flight,
            view.class_service_s[c],
            view.class_latency_s[c],
            view.latency_s,
            view.service_time_s,
            view.error_rate,
            view.share,
            view.last_update_s,
            view.class_samples[c],
            view.available,
            view.samples,
            view.consecutive_errors,
        ),
        dtype=np.float64,
    )
    conc, inf = raw[0], raw[1]
    cols = np.empty((ROW_FEATURES, n))
    cols[F_VALID] = 1.0
    cols[F_AVAILABLE] = raw[10]
    # The three latency ratios in one gather, one multiply (each NumPy call costs ~1 µs at this size).
    cols[F_LATENCY : F_LATENCY_ALL + 1] = raw[_RATIO_ROWS] * np.array([[1.0 / typ], [1.0 / typ], [1.0 / typ_all]])
    if 0 in view.class_samples[c]:
        svc, lat_c = _class_estimates(raw, typ, typ_all)
        cols[F_LATENCY] = lat_c / typ
        cols[F_SERVICE] = svc / typ
        cols[F_LATENCY_ALL][raw[11] == 0] = 1.0  # never measured: reads as typical
    np.log(conc, out=cols[F_LOG_CONCURRENCY])
    cols[F_ERROR] = raw[6]
    total_share = sum(view.share)
    cols[F_SHARE] = raw[7] * (len(cands) / total_share) if total_share > 0.0 else 0.0
    idle = cols[F_IDLE]
    np.subtract(now_s, raw[8], out=idle)
    np.maximum(idle, 0.0, out=idle)
    idle *= 1.0 / typ
    np.log1p(idle, out=idle)
    np.multiply(raw[_COUNT_ROWS], _COUNT_SCALE, out=cols[F_CONFIDENCE : F_FAILING + 1])
    np.minimum(cols[:F_LOG_IN_FLIGHT], CLIP_RATIO, out=cols[:F_LOG_IN_FLIGHT])
    np.minimum(cols[F_CONFIDENCE : F_FAILING + 1], 1.0, out=cols[F_CONFIDENCE : F_FAILING + 1])
    dynamic_columns(inf, conc, cols[F_SERVICE], cols[F_LOG_IN_FLIGHT:])
    rows[:n] = cols.T
    if len(cands) < n:
        keep = np.zeros(n, dtype=bool)
        keep[cands] = True
        rows[:n][~keep] = 0.0


def _class_estimates(raw: np.ndarray, typical_s: float, typical_all_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(service, latency) in seconds of the request's class per backend, from `encode_state`'s raw block.
    A backend with no completion of the class yet is imputed from its all-class estimates times the
    cluster's class-to-all ratio (assumed as fast, relative to the others, as it is overall), or as
    typical when it has no completion at all: the 30 ms default never enters a feature, so the
    encoding stays scale-free from the first request on."""
    svc, lat_c = raw[2].copy(), raw[3].copy()
    unseen = raw[9] == 0
    if unseen.any():
        never = raw[11] == 0
        ratio = typical_s / typical_all_s
        svc[unseen] = (np.where(never, typical_all_s, raw[5]) * ratio)[unseen]
        lat_c[unseen] = (np.where(never, typical_all_s, raw[4]) * ratio)[unseen]
    return svc, lat_c


def dynamic_columns(in_flight: np.ndarray, concurrency: np.ndarray, service: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The columns F_LOG_IN_FLIGHT, F_UTILISATION, F_EXPECTED (rows of `out`, shape (3, k)) of k backends
    at the given in-flight counts, `service` being their F_SERVICE column: the only part of a state a
    dispatch changes, defined once for `encode_state` and for the live policy's what-if rows
    (`DispatchModel`). Clipped at CLIP_RATIO."""
    np.log1p(in_flight, out=out[0])
    np.divide(in_flight, concurrency, out=out[1])
    np.divide(in_flight + 1.0, concurrency, out=out[2])
    np.maximum(out[2], 1.0, out=out[2])
    out[2] *= service
    np.minimum(out[1:], CLIP_RATIO, out=out[1:])
    return out


class DispatchModel:
    """How dispatches change one encoded state, computed without touching the view.

    The live dqn policy decides a whole loop iteration's requests of one class from one state
    (`encode_state`); after it dispatched `counts[b]` more requests to each backend b, the state reads
    exactly `state_after(counts)`, and row b alone reads `rows_after([b], [k])` after k more. So each
    decision is taken on the state as it truly is, re-scoring one row, never re-encoding the view.
    (Completions within the iteration are seen by the next iteration's state.)
    """

    __slots__ = ("_arrays", "_concurrency", "_in_flight", "ctx", "n", "rows", "state", "total_in_flight")

    def __init__(self, view: ClusterView, req_class: int, state: np.ndarray) -> None:
        width = state_width(state.shape[0])
        self.n = view.n
        self.state = state
        self.rows = state[: width * ROW_FEATURES].reshape(width, ROW_FEATURES)[: self.n]
        self.ctx = state[width * ROW_FEATURES :]
        # Copies of the two lists, NumPy only when a what-if row is asked for: most snapshots (one
        # request per loop iteration) never need one, and the conversions are a third of the cost.
        self._in_flight = view.in_flight[:]
        self._concurrency = view.concurrency[:]
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.total_in_flight = view.total_in_flight

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (
                np.asarray(self._in_flight, dtype=np.float64),
                np.asarray(self._concurrency),
                self.rows[:, F_SERVICE].astype(np.float64),
            )
        return self._arrays

    def rows_after(self, slots: np.ndarray, extra: np.ndarray) -> np.ndarray:
        """Rows `slots` (all valid) as they read after `extra` more dispatches to each."""
        in_flight, concurrency, service = self._columns()
        out = self.rows[slots].copy()
        cols = np.empty((3, len(slots)))
        dynamic_columns(in_flight[slots] + extra, concurrency[slots], service[slots], cols)
        out[:, F_LOG_IN_FLIGHT:] = cols.T
        return out

    def state_after(self, counts: Sequence[int]) -> np.ndarray:
        """A new flat state: this one after counts[b] more dispatches to every slot b (context included)."""
        x = self.state.copy()
        slots = np.flatnonzero(np.asarray(counts[: self.n]))
        if len(slots):
            extra = np.asarray(counts, dtype=np.float64)[slots]
            width = state_width(x.shape[0])
            x[: width * ROW_FEATURES].reshape(width, ROW_FEATURES)[slots] = self.rows_after(slots, extra)
            total = self.total_in_flight + float(extra.sum())
            x[width * ROW_FEATURES + C_LOAD] = min(total / self._total_concurrency(), CLIP_RATIO)
            x[width * ROW_FEATURES + C_LOG_TOTAL] = math.log1p(total)
        return x

    def _total_concurrency(self) -> float:
        """The candidates' (valid rows') total concurrency: the load ratio's denominator in encode_state."""
        valid = self.rows[:, F_VALID] > 0.0
        return float(np.asarray(self._concurrency)[valid].sum()) if valid.any() else 1.0


# --- reward -----------------------------------------------------------------------------------------
def reward(latency_s: float, error: bool, typical_s: float, error_penalty: float = ERROR_PENALTY) -> float:
    """r = -latency / typical latency - error_penalty * [error or timeout].

    The unit is the cluster's own typical service time (`ClusterView.typical_all_s`), so the reward
    means the same on a 5 ms and a 500 ms application: "how many typical requests long did this one
    take". Latency is end-to-end at the proxy (queueing included), so the agent pays for sending work
    to a backend that is already busy. Gini and accuracy are measured, not rewarded: rewarding
    fairness would fight the latency objective on heterogeneous clusters.
    """
    return -latency_s / max(typical_s, 1e-9) - (error_penalty if error else 0.0)


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
    """Decision accuracy: did `action` match (one of) the SED oracle's choices? `rate` is the request
    class's rates: true ones in the simulator, `view.class_rate[c]` live.

    Exactly `action in sed_choices(...)`, without building the list: the simulator calls it once per
    decision, where the allocation would cost more than the rest of the step.
    """
    best = math.inf
    chosen = False
    for i in candidates:
        d = (in_flight[i] + 1) / rate[i] if rate[i] > 0 else math.inf
        if d < best * (1 - 1e-9):
            best = d
            chosen = i == action
        elif d <= best * (1 + 1e-9) and i == action:
            chosen = True
    return chosen


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

    def record_outcome(self, out: Outcome, typical_s: float) -> float:
        """Count one outcome; `typical_s` is the view's reward unit at its completion (`typical_all_s`)."""
        r = reward(out.latency_s, out.error, typical_s, self.error_penalty)
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
