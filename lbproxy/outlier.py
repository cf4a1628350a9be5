"""Which backends a policy may choose: outlier ejection, panic mode and slow start, as pure rules.

One implementation for the live pool (lbproxy/upstream.py) and the simulator (lbproxy/sim/servers.py):
no I/O, no clock, no event loop; every call that depends on time takes `now_s`, and the caller owns
timers (the pool's `call_later`, the simulator's control heap). The rules:

- **Outlier ejection** (Envoy `outlier_detection`): a backend is ejected after
  `eject_consecutive_failures` failures in a row (5xx, connect error, timeout; Envoy's
  `consecutive_5xx`), or when its latency stays far above its peers' (below). An ejection lasts
  `eject_base_s` x the times the backend was ejected, capped at `MAX_EJECTION_S`; never more than
  `max_ejection_percent` of the backends are out at once, except that the first ejection is always
  allowed (Envoy ejects one host even when that alone exceeds the percentage).
- **Latency ejection** (the latency analogue of Envoy's success-rate detector; Envoy and Linkerd
  only steer around slow hosts, which leaves a 20x-slow backend a share of the traffic under every
  load-blind policy): a backend whose latency EWMA for a request class exceeds
  `latency_eject_factor` x the median of the available backends' EWMAs for that class, for
  `latency_eject_completions` completions in a row, is ejected like one that errors (samples are
  clipped at `LATENCY_CLIP` x the threshold first, so that takes sustained slowness). It needs
  `latency_eject_min_samples` completions of the class since the backend was (re)admitted, and at
  least `latency_eject_min_backends` available backends with that many (a median of two is no
  consensus; Envoy's success-rate detector needs 5 hosts). The median includes the backend
  itself: with 3 or more backends one outlier cannot move it far, and it is one sort per refresh
  instead of one per backend.
- **Panic mode** (Envoy `healthy_panic_threshold`): when fewer than `panic_threshold_percent` of the
  backends are available, route over all of them: overloading a few survivors usually turns a
  partial outage into a total one, and health verdicts are often wrong in bulk.
- **Slow start** (Envoy `slow_start_config`): a backend added at runtime or recovered by active
  health checks gets at most factor x its capacity share of the decisions, factor =
  max(min_weight_percent / 100, (max(t, 1 s) / window) ^ (1 / aggression)) at t seconds into the
  window. Envoy scales the weight of two of its balancers; here ONE mechanism covers every policy,
  the DQN included: the slow-starting backend is left out of the candidate list while it is "in
  debt". Each dispatch to it costs it one request; each decision (to any backend) pays back factor x
  its capacity share. So its long-run share is capped at factor x its fair share whatever the policy
  does when it is offered (a load-aware policy would pick an idle newcomer every time), the list
  changes only when the debt crosses zero (twice per 1 / (factor x share) decisions: policies'
  per-candidate-list caches stay valid in between), and nothing is drawn at random. Envoy does not
  slow-start hosts returning from an outlier ejection (they must prove themselves at full share, and
  one that still fails is ejected again within a few requests); neither does this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lbproxy.observe import LATENCY_EWMA_ALPHA, NUM_CLASSES

MAX_EJECTION_S = 300.0
"""Cap on one ejection (Envoy outlier detection `max_ejection_time` default: 300 s)."""

LATENCY_EJECT_FACTOR = 10.0
"""A backend is a latency outlier above this multiple of the median latency of its class. Far above
the speed spread a healthy heterogeneous cluster shows (weighted backends of 1x-4x capacity), well
below a hung or 20x-degraded backend; 0 disables latency ejection."""
LATENCY_EJECT_COMPLETIONS = 10
"""Completions in a row above the threshold before ejecting: one slow response (a GC pause, a cold
cache) is not an outlier; ~1 EWMA memory (LATENCY_EWMA_ALPHA = 0.1) of sustained slowness is."""
LATENCY_EJECT_MIN_SAMPLES = 20
"""Completions of a class since admission before a backend's latency of that class is judged or
counts in the median: two EWMA memories, so the estimate no longer remembers its first samples."""
LATENCY_EJECT_MIN_BACKENDS = 3
"""Available backends (with MIN_SAMPLES of the class) needed for a median that means "the peers"."""
LATENCY_CLIP = 3.0
"""A sample enters the rule's EWMA as at most this multiple of the threshold, so a few huge responses (a
GC pause) cannot hold the EWMA above the threshold for a whole streak (3 x decays below it within ~10
completions), while sustained slowness still lifts it above."""
LATENCY_REFRESH_COMPLETIONS = 64
"""The per-class thresholds are recomputed every this many completions: EWMAs move by ~10 % per
completion, and a median per completion would cost more than the rest of the rule."""

SLOW_START_WINDOW_S = 10.0
"""Envoy's default is 0 (off); 10 s covers what a restarted web process warms up (connection pools,
caches, lazy imports) while a recovered backend still carries its full share within five health-check
intervals (2 s each); 0 disables."""
SLOW_START_AGGRESSION = 1.0
"""Envoy `aggression` default: a linear ramp (> 1 ramps faster at first)."""
SLOW_START_MIN_WEIGHT_PERCENT = 10.0
"""Envoy `min_weight_percent` default: the ramp starts at 10 % of the backend's share."""


@dataclass(slots=True)
class OutlierConfig:
    """The rules' settings; the names are Settings' (lbproxy/config.py) and the scenario file's."""

    eject_consecutive_failures: int = 5
    """Envoy `consecutive_5xx` default; 0 disables (the simulator's scenarios allow it)."""
    eject_base_s: float = 30.0
    """Envoy `base_ejection_time` default."""
    max_ejection_percent: float = 50.0
    """Envoy's default is 10 %, which with the 2-8 backends this proxy usually has allows exactly the
    one first ejection; 50 % lets a second bad backend of four go too."""
    panic_threshold_percent: float = 50.0
    """Envoy `healthy_panic_threshold` default."""
    latency_eject_factor: float = LATENCY_EJECT_FACTOR
    latency_eject_completions: int = LATENCY_EJECT_COMPLETIONS
    latency_eject_min_samples: int = LATENCY_EJECT_MIN_SAMPLES
    latency_eject_min_backends: int = LATENCY_EJECT_MIN_BACKENDS
    slow_start_window_s: float = SLOW_START_WINDOW_S
    slow_start_aggression: float = SLOW_START_AGGRESSION
    slow_start_min_weight_percent: float = SLOW_START_MIN_WEIGHT_PERCENT


def route_candidates(
    available: Sequence[bool], present: Sequence[bool], panic_threshold_percent: float
) -> tuple[list[int], bool]:
    """(the slots policies may choose, panic): the available present slots, or in panic mode (fewer
    than the threshold share of the present ones available) every present slot."""
    active = [i for i, p in enumerate(present) if p]
    healthy = [i for i in active if available[i]]
    panic = bool(active) and len(healthy) * 100.0 < panic_threshold_percent * len(active)
    return (active if panic else healthy), panic


class OutlierDetector:
    """Per-slot ejection state (struct of arrays, like ClusterView) and the two ejection rules.

    `available` is the caller's availability list (the ClusterView's, mutated in place): the peers
    whose latencies make the median. The caller reports every completion to `record`, ejects when it
    returns True (`eject` applies the percentage cap and gives the duration), and calls `uneject`
    when that duration has passed (`expired` lists the slots due).
    """

    def __init__(self, config: OutlierConfig, available: list[bool]) -> None:
        self.config = config
        self.available = available
        n = len(available)
        self.present = [True] * n
        self.consecutive_failures = [0] * n
        self.times_ejected = [0] * n
        self.ejected = [False] * n
        self.ejected_until_s = [0.0] * n
        """Time the current ejection ends; 0 when not ejected."""
        self._eject_after = config.eject_consecutive_failures or math.inf
        self._latency_on = config.latency_eject_factor > 0.0
        self._min_samples = max(1, config.latency_eject_min_samples)
        self._completions = config.latency_eject_completions
        self._latency = [[0.0] * n for _ in range(NUM_CLASSES)]
        """[class][slot] latency EWMA of successful requests since the slot was (re)admitted."""
        self._seen = [[0] * n for _ in range(NUM_CLASSES)]
        """[class][slot] completions behind `_latency` (capped at the minimum sample count)."""
        self._streak = [0] * n
        self._threshold = [math.inf] * NUM_CLASSES
        self._clip = [math.inf] * NUM_CLASSES
        self._until_refresh = LATENCY_REFRESH_COMPLETIONS

    def add_slot(self) -> int:
        """A new slot (runtime add through the admin API); the caller appended it to `available`."""
        self.present.append(True)
        self.consecutive_failures.append(0)
        self.times_ejected.append(0)
        self.ejected.append(False)
        self.ejected_until_s.append(0.0)
        self._streak.append(0)
        for c in range(NUM_CLASSES):
            self._latency[c].append(0.0)
            self._seen[c].append(0)
        return len(self.present) - 1

    def remove(self, i: int) -> None:
        """The slot left for good: it no longer counts towards the ejection percentage."""
        self.present[i] = False
        self.ejected[i] = False
        self.ejected_until_s[i] = 0.0

    # --- the two rules -------------------------------------------------------------------------------
    def record(self, i: int, req_class: int, latency_s: float, failed: bool) -> bool:
        """Count one completion. True when slot i is due for ejection (call `eject`); stays True on
        every further qualifying completion while an ejection is refused by the percentage cap.
        Runs once per request, live and simulated: written for the interpreter, not for beauty."""
        if failed:
            n = self.consecutive_failures[i] + 1
            self.consecutive_failures[i] = n
            return n >= self._eject_after and not self.ejected[i] and self.present[i]
        cf = self.consecutive_failures
        if cf[i]:
            cf[i] = 0
        if not self._latency_on:
            return False
        clip = self._clip[req_class]
        if latency_s > clip:
            latency_s = clip
        lat = self._latency[req_class]
        need = self._min_samples
        seen = self._seen[req_class]
        k = seen[i]
        if k >= need:
            x = lat[i] = lat[i] + LATENCY_EWMA_ALPHA * (latency_s - lat[i])
        else:
            x = lat[i] = latency_s if k == 0 else lat[i] + LATENCY_EWMA_ALPHA * (latency_s - lat[i])
            seen[i] = k = k + 1
            if k == need:  # one more peer for the median: refresh at once
                self._until_refresh = 1
        left = self._until_refresh - 1
        if left > 0:
            self._until_refresh = left
        else:
            self._refresh()
        streak = self._streak
        if k >= need and x > self._threshold[req_class]:
            s = streak[i] + 1
            streak[i] = s
            return s >= self._completions and not self.ejected[i] and self.present[i]
        if streak[i]:
            streak[i] = 0
        return False

    def _refresh(self) -> None:
        """Per class: factor x the median latency EWMA of the available slots with enough samples."""
        self._until_refresh = LATENCY_REFRESH_COMPLETIONS
        cfg = self.config
        need = self._min_samples
        avail = self.available
        for c in range(NUM_CLASSES):
            seen = self._seen[c]
            lat = self._latency[c]
            vals = sorted(lat[j] for j in range(len(seen)) if seen[j] >= need and avail[j])
            m = len(vals)
            if m < max(cfg.latency_eject_min_backends, 1):
                self._threshold[c] = self._clip[c] = math.inf
                continue
            median = vals[m // 2] if m % 2 else 0.5 * (vals[m // 2 - 1] + vals[m // 2])
            self._threshold[c] = cfg.latency_eject_factor * median
            self._clip[c] = LATENCY_CLIP * self._threshold[c]

    # --- ejection and re-admission ------------------------------------------------------------------
    def eject(self, i: int, now_s: float) -> float | None:
        """Eject slot i now; the duration in seconds, or None when the percentage cap refuses it."""
        if self.ejected[i] or not self.present[i]:
            return None
        active = sum(self.present)
        out = sum(1 for j, e in enumerate(self.ejected) if e and self.present[j])
        # Envoy: never exceed max_ejection_percent, but always allow ejecting at least one host.
        if out >= 1 and (out + 1) * 100.0 > self.config.max_ejection_percent * active:
            return None
        self.times_ejected[i] += 1
        base = self.config.eject_base_s
        duration = min(base * self.times_ejected[i], max(MAX_EJECTION_S, base))
        self.ejected[i] = True
        self.ejected_until_s[i] = now_s + duration
        self.consecutive_failures[i] = 0
        self._streak[i] = 0
        return duration

    def expired(self, now_s: float) -> list[int]:
        """Ejected slots whose ejection has ended by now_s (the caller un-ejects them)."""
        return [i for i, e in enumerate(self.ejected) if e and now_s >= self.ejected_until_s[i]]

    def uneject(self, i: int) -> None:
        """The ejection ended: the slot is judged afresh (its latency history is dropped)."""
        self.ejected[i] = False
        self.ejected_until_s[i] = 0.0
        self.readmit(i)

    def readmit(self, i: int) -> None:
        """Forget slot i's latency estimate (after an ejection or a health-check recovery: the backend
        that comes back is not the one that left)."""
        self._streak[i] = 0
        for c in range(NUM_CLASSES):
            self._seen[c][i] = 0


class SlowStart:
    """Envoy's slow-start ramp applied through the candidate list (see the module docstring)."""

    def __init__(self, window_s: float, aggression: float = 1.0, min_weight_percent: float = 10.0) -> None:
        self.window_s = window_s
        self._inv_aggression = 1.0 / aggression if aggression > 0 else 1.0
        self._min_factor = min_weight_percent / 100.0
        self.since_s: dict[int, float] = {}
        """Slots in slow start and when it began; empty (falsy) when none: callers test it first."""
        self._debt: dict[int, float] = {}
        self._share: dict[int, float] = {}

    def begin(self, i: int, now_s: float) -> None:
        if self.window_s > 0.0:
            self.since_s[i] = now_s
            self._debt[i] = 0.0

    def end(self, i: int) -> None:
        self.since_s.pop(i, None)
        self._debt.pop(i, None)

    def factor(self, i: int, now_s: float) -> float:
        """Envoy's weight factor: max(min_weight, (max(t, 1) / window) ^ (1 / aggression)); 1 outside."""
        t0 = self.since_s.get(i)
        if t0 is None:
            return 1.0
        t = now_s - t0
        if t >= self.window_s:
            return 1.0
        f = (max(t, 1.0) / self.window_s) ** self._inv_aggression
        return f if f > self._min_factor else self._min_factor

    def candidates(self, base: list[int], capacity: Sequence[float]) -> list[int]:
        """The candidate list for the next decisions: `base` (the same object when no slot is slow-
        starting) minus the slow-starting slots in debt; never empty."""
        if not self.since_s:
            return base
        total = sum(capacity[j] for j in base) or 1.0
        self._share = {i: capacity[i] / total for i in self.since_s if i in base}
        debt = self._debt
        out = [i for i in base if debt.get(i, 0.0) <= 0.0]
        return out if 0 < len(out) < len(base) else base

    def on_dispatch(self, i: int, now_s: float) -> bool:
        """Account one decision that went to slot i. True when the candidate list must be rebuilt
        (a slot's debt crossed zero, or its slow start is over)."""
        changed = False
        debt = self._debt
        for s in list(self.since_s):
            f = self.factor(s, now_s)
            if f >= 1.0:
                self.end(s)
                changed = True
                continue
            d = debt[s]
            free = d <= 0.0
            d -= f * self._share.get(s, 0.0)
            if s == i:
                d += 1.0
            if d < 1e-9:  # paid off (rounding must not cost it a turn)
                d = 0.0
            debt[s] = d
            if (d <= 0.0) != free:
                changed = True
        return changed
