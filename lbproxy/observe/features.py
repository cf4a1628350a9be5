"""The DQN's state: one row of behavioural features per backend (columns F_*) plus a small context
(C_*), built from a :class:`ClusterView` by :func:`encode_state`, and :class:`DispatchModel`, how
dispatches change an encoded state without re-encoding the view.

A backend is known by how it behaves, never by its slot (DESIGN.md §4), and every latency is in units
of the cluster's own typical latency, so the same weights route a cluster of any size, in any order,
at any latency scale.
"""

from __future__ import annotations

import math

import numpy as np

from lbproxy.observe.request_class import NUM_CLASSES
from lbproxy.observe.view import MAX_BACKENDS, ClusterView

LEARNING_WIDTH_MIN = 16
"""Rows of a learning state (replay buffer) at least; see :func:`learning_width`."""

CLIP_RATIO = 50.0
"""Latency ratios entering the network are clipped here (a stalled backend reads 'very slow', not inf)."""

# One row per backend slot. The last three columns (dynamic) are the only ones a dispatch changes: a
# dispatch to backend b changes row b's in-flight count and nothing else of any row, so the live
# policy can decide a loop iteration's requests one after another with an exact re-score of one row
# each (`DispatchModel`). Everything else changes on completions only.
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
    exactly what `apply` writes, one dispatched row at a time, and row b alone reads
    `rows_after([b], [k])` after k more. So each decision is taken on the state as it truly is,
    re-scoring one row, never re-encoding the view.
    (Completions within the iteration are seen by the next iteration's state.)
    """

    __slots__ = (
        "_arrays",
        "_concurrency",
        "_in_flight",
        "_scalars",
        "ctx",
        "n",
        "rows",
        "state",
        "total_in_flight",
    )

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
        self._scalars: tuple[list[float], float] | None = None
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
        out: np.ndarray = self.rows[slots].copy()
        cols = np.empty((3, len(slots)))
        dynamic_columns(in_flight[slots] + extra, concurrency[slots], service[slots], cols)
        out[:, F_LOG_IN_FLIGHT:] = cols.T
        return out

    def apply(self, x: np.ndarray, b: int, k: int, total_extra: int) -> None:
        """Write into `x` (a copy of this state, already moved by the earlier dispatches) row b and the
        context as they read after k dispatches to b and `total_extra` to all slots, in scalar
        arithmetic (the live policy's decision records: a dozen NumPy calls per decision became one
        array copy). Same formulas as `dynamic_columns`."""
        scalars = self._scalars
        if scalars is None:
            scalars = self._scalars = (self.rows[:, F_SERVICE].tolist(), self._total_concurrency())
        service, total_concurrency = scalars
        in_flight = float(self._in_flight[b] + k)
        concurrency = self._concurrency[b]
        row = b * ROW_FEATURES
        x[row + F_LOG_IN_FLIGHT] = math.log1p(in_flight)
        x[row + F_UTILISATION] = min(in_flight / concurrency, CLIP_RATIO)
        x[row + F_EXPECTED] = min(max((in_flight + 1.0) / concurrency, 1.0) * service[b], CLIP_RATIO)
        total = self.total_in_flight + float(total_extra)
        ctx = x.shape[0] - self.ctx.shape[0]
        x[ctx + C_LOAD] = min(total / total_concurrency, CLIP_RATIO)
        x[ctx + C_LOG_TOTAL] = math.log1p(total)

    def _total_concurrency(self) -> float:
        """The candidates' (valid rows') total concurrency: the load ratio's denominator in encode_state."""
        valid = self.rows[:, F_VALID] > 0.0
        return float(np.asarray(self._concurrency)[valid].sum()) if valid.any() else 1.0
