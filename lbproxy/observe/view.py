"""`ClusterView`: the per-backend statistics every policy reads, changed only through
:meth:`ClusterView.on_dispatch` / :meth:`ClusterView.on_complete` by the pool or the simulator.

Hot-path note: per-backend state is kept in plain Python lists, not NumPy arrays. Heuristic
policies read a handful of scalars per decision, and scalar indexing of a list costs ~20 ns against
~100 ns for a NumPy element; only the DQN needs dense arrays, built once per loop iteration live
(features.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lbproxy.observe.request_class import NUM_CLASSES

MAX_BACKENDS = 64
"""Most backends one pool (and one state) holds. The Q-network scores each backend from its own row,
so its weights do not depend on this: it only sizes the inference buffers."""


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
        i, c = out.backend, out.req_class
        self.in_flight[i] -= 1
        self.total_in_flight -= 1
        rtt, cost = out.latency_s, self.latency_cost_s[i]
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
            self._rescale_shares()  # once in ~23 000 completions
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
        # This class's rate only: the others catch up at their own next completion (one division per request).
        s_i = svc[i]
        self.class_rate[c][i] = self.concurrency[i] / (s_i if s_i > 1e-6 else 1e-6)

    def _rescale_shares(self) -> None:
        """Fold the lazy decay's growing increment into the counters before it overflows (on_complete)."""
        self.share = [s / self._share_scale for s in self.share]
        self._share_scale = 1.0

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
