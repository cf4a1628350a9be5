"""Guardrail: a randomised control arm that stops routing by the DQN when it is worse than the fallback.

DESIGN.md §4. In serve and train modes a small share of requests (`control_share`, 5 %) is routed by
the fallback heuristic (peak_ewma), chosen by a seeded coin per request, the rest by the DQN. Because
the coin is independent of everything else, both arms see the same backends, the same load and the
same moment in time, so a difference between their latencies is the policies' doing (an A/B test
inside the proxy). About once a second :meth:`Guardrail.evaluate` compares the arms per request
class over the last `window_s`; when the DQN arm is worse with statistical confidence and by more
than a practical margin, the guardrail *trips*: everything is routed by the fallback except a
`probe_share` (1 %) still routed by the DQN, so that recovery can be seen (1 %, not more: the probe's
requests go where the DQN sends them, and above 1 % they would set the client-side p99 while the
DQN is bad). Learning goes on (the
fallback's decisions are valid off-policy transitions). When the probe is no longer worse it
*recovers*. Each switch is logged once, counted, and shown in :meth:`Guardrail.describe`.

What is compared (per class; errors count as infinitely slow requests): three one-sided hypotheses "the
DQN arm is worse" -- median, p90 and error rate -- each with a p-value and an effect size, the latency
tests shifted by a margin (lbproxy/guardrail_stats.py has the tests and why these three).

Trip rule: some class with both arms >= `min_samples` has a hypothesis with p < alpha / m (latency
tests shifted by `margin`) AND an effect > `margin`. m is the number of hypotheses tested in that
evaluation (3 per tested class): Bonferroni. (Holm's step-down rejects the same *first* hypothesis,
and tripping needs only one, so Holm would give the same decisions.) The margin also absorbs the
tests' one idealisation, that requests are independent (requests close in time share queueing state,
so the effective sample size is below n and p-values are somewhat optimistic); the random assignment
to arms is what keeps load that varies in time from biasing either arm.

Recover rule (hysteresis on both axes): for `RECOVER_EVALUATIONS` (3) consecutive evaluations, at least
one class was tested and every tested hypothesis has p >= `RECOVER_ALPHA` / m with the latency tests
shifted by only margin / 2 (the DQN probe is not worse by half the margin even at a lenient family-wise
level, 0.2 against the trip's 0.01), or an effect < margin / 2; and the trip has lasted at least the
current hold. (Requiring unshifted p > 0.5 for all nine hypotheses instead, i.e. point estimates that
all lean towards the DQN, kept a DQN *equal* to the fallback tripped for a median 40 s and often over 2
min at 100 requests/s per class. With this rule an equal DQN recovers ~3 s after the probe has
`min_samples` (8 s in all at 100 requests/s, 3 s at 1000/s), while at 1000/s one 20 % slower stayed
tripped in 8 of 8 runs of 60 s, and one 10 % slower, the margin itself, in half of them.) The hold
starts at `min_trip_s` and doubles (up to `MAX_HOLD_S`) on every re-trip within `QUICK_RETRIP_WINDOWS`
windows of a recovery: a DQN that overloads a backend only when it gets the full traffic looks fine on
the probe, recovers, and trips again, and the backoff keeps it from oscillating (Envoy's outlier
ejection backs off the same way).

Windows. A switch clears every window: the samples before it were measured under the other traffic
split, which is not the regime the next decision is about (requests dispatched before a switch and
completed after it still land in the new windows: a few requests' worth, ignored). Each (class, arm)
window is bounded in count as well as time: when an arm's rate would put more than
`WINDOW_TARGET_SAMPLES` in one window, :meth:`Guardrail.record` keeps each sample with probability
target / expected (a uniform thinning, so the kept samples still span the whole window and have the
arm's distribution), and a hard cap `WINDOW_MAX_SAMPLES` drops the oldest if a burst outruns the rate
estimate (it does in the first window after start-up, thinned only from the second evaluation on).
Memory is therefore bounded at classes x 2 x `WINDOW_MAX_SAMPLES` samples.

Blind spot, by design: with both arms needing `min_samples` in one window, a class is tested only when
it has at least min_samples / (control_share * window_s) requests per second (60/s at the defaults);
below that the guardrail keeps its state. Everything here is pure (no asyncio, no I/O except one
log line per switch): the caller supplies the clock and calls :meth:`Guardrail.evaluate`.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable

import numpy as np

from lbproxy.guardrail_stats import HYPOTHESES, Comparison, compare
from lbproxy.observe import NUM_CLASSES, RequestClass

log = logging.getLogger("lbproxy.guardrail")

RECOVER_EVALUATIONS = 3
"""Consecutive "not worse" evaluations needed to recover: ~3 s at one evaluation a second, so one lucky
window does not hand the traffic back."""

RECOVER_ALPHA = 0.2
"""Family-wise level of the recovery check: a hypothesis is clear when p >= RECOVER_ALPHA / m (the probe
is not worse by margin / 2 even at this lenient level), or its effect is below half the margin. With
the halved margin, 20x the trip's alpha is the dead band between the two decisions."""

MAX_HOLD_S = 300.0
"""Cap of the doubling hold: Envoy outlier detection's default `max_ejection_time` (300 s)."""

QUICK_RETRIP_WINDOWS = 6.0
"""A trip within this many windows (60 s at the default 10 s window) of a recovery doubles the hold: it
covers the time a DQN overloading a backend under full traffic needs to be detected (the control arm
refilling `min_samples`, then one window) several times over, while a DQN that stayed good for a
minute starts again from `min_trip_s`."""

WINDOW_MAX_SAMPLES = 5000
"""Hard cap per (class, arm) window: memory bound, and the test's cost (Mann-Whitney is O(n log n))."""

WINDOW_TARGET_SAMPLES = 4000
"""Thinning aims at this many samples per window, 20 % under the hard cap so a rising rate has room
before the cap starts shortening the window in time. Power is set by the smaller arm (the control,
5 %), so thinning the DQN arm to 4000 loses almost nothing."""


class _Window:
    """One (class, arm) window: completion times and latencies (errors as +inf), oldest first.

    Two parallel deques rather than one of tuples: record() allocates nothing but the float, and
    evaluate() turns the values into an array without unpacking pairs. Only evaluate() pops, and both
    deques have the same maxlen, so they stay aligned.
    """

    __slots__ = ("keep", "times", "values")

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=WINDOW_MAX_SAMPLES)
        self.values: deque[float] = deque(maxlen=WINDOW_MAX_SAMPLES)
        self.keep = 1.0
        """Probability that record() keeps a sample (thinning under high traffic)."""

    def expire(self, cutoff_s: float) -> None:
        times, values = self.times, self.values
        while times and times[0] < cutoff_s:
            times.popleft()
            values.popleft()

    def clear(self) -> None:
        self.times.clear()
        self.values.clear()

    def array(self) -> np.ndarray:
        return np.fromiter(self.values, dtype=np.float64, count=len(self.values))


class Guardrail:
    """Control arm, per-class comparison, trip/recover state machine (see the module docstring).

    Single-threaded: the caller's event loop calls every method. `on_switch(tripped)` is called after
    each switch (telemetry's `Metrics.guardrail_switched` updates the Prometheus counter and gauge), so
    this module needs no Prometheus.
    """

    def __init__(
        self,
        *,
        control_share: float = 0.05,
        probe_share: float = 0.01,
        window_s: float = 10.0,
        min_samples: int = 30,
        alpha: float = 0.01,
        margin: float = 0.10,
        min_trip_s: float = 5.0,
        seed: int = 0,
        num_classes: int = NUM_CLASSES,
        on_switch: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0.0 < control_share < 1.0 or not 0.0 < probe_share < 1.0:
            raise ValueError(
                f"guardrail: control_share and probe_share must be in (0, 1), got {control_share}, {probe_share}"
            )
        if window_s <= 0.0 or min_samples < 2 or not 0.0 < alpha < 1.0 or margin < 0.0 or min_trip_s < 0.0:
            raise ValueError(
                "guardrail: need window_s > 0, min_samples >= 2, 0 < alpha < 1, margin >= 0, min_trip_s >= 0"
            )
        self.control_share = control_share
        self.probe_share = probe_share
        self.window_s = window_s
        self.min_samples = min_samples
        self.alpha = alpha
        self.margin = margin
        self.min_trip_s = min_trip_s
        self.num_classes = num_classes
        self.on_switch = on_switch
        self._random = random.Random(seed).random
        """Routing coin: its own generator, so routing is reproducible whatever completes when."""
        self._sample = random.Random(f"guardrail-thinning-{seed}").random
        self._fallback_share = control_share
        """P(route by the fallback): control_share normally, 1 - probe_share while tripped."""
        self._tripped = False
        self.switches = 0
        self.since_s: float | None = None
        """Clock time of the last switch (None before the first)."""
        self.hold_s = min_trip_s
        """Minimum duration of the current (or next) trip; doubles on a quick re-trip."""
        self._recovered_s: float | None = None
        self._good_streak = 0
        self._windows = [(_Window(), _Window()) for _ in range(num_classes)]
        """Per class: (DQN arm, fallback arm), indexed by `by_fallback`."""
        self._arrivals = [0] * num_classes
        self._rate_hz = [0.0] * num_classes
        self._last_eval_s: float | None = None
        self.last: list[Comparison | None] = [None] * num_classes
        """Each class's comparison at the last evaluation (None: not enough samples)."""
        self.last_threshold = alpha
        """The Bonferroni-corrected p-value threshold of the last evaluation."""

    @property
    def tripped(self) -> bool:
        """True while everything but the probe share is routed by the fallback."""
        return self._tripped

    def route_by_fallback(self, req_class: int) -> bool:
        """Per request: route it by the fallback arm? One seeded coin (~0.1 µs, no allocation).

        The state is global, not per class, on purpose: it is one network, and its decisions for one
        class load the backends the other classes are served by. `req_class` is accepted so the call
        site needs no change if that ever becomes per class.
        """
        return self._random() < self._fallback_share

    def record(self, req_class: int, by_fallback: bool, latency_s: float, error: bool, now_s: float) -> None:
        """Per completed request: add it to its (class, arm) window. O(1); errors count as +inf."""
        self._arrivals[req_class] += 1
        w = self._windows[req_class][by_fallback]
        keep = w.keep
        if keep < 1.0 and self._sample() >= keep:
            return
        w.times.append(now_s)
        w.values.append(math.inf if error else latency_s)

    def evaluate(self, now_s: float) -> bool:
        """About once a second: expire old samples, compare the arms per class, switch if warranted.

        Returns True when the state changed. Costs ~1-2 ms per tested class (scipy), nothing for
        classes without enough samples.
        """
        self._update_rates(now_s)
        cutoff = now_s - self.window_s
        # Normal: is the DQN worse by more than the margin? Tripped: by more than half of it?
        shift = self.margin / 2 if self._tripped else self.margin
        tested: list[Comparison] = []
        for c, arms in enumerate(self._windows):
            dqn, control = arms
            dqn.expire(cutoff)
            control.expire(cutoff)
            if len(dqn.values) >= self.min_samples and len(control.values) >= self.min_samples:
                cmp = compare(c, dqn.array(), control.array(), shift)
                tested.append(cmp)
                self.last[c] = cmp
            else:
                self.last[c] = None
        m = len(HYPOTHESES) * len(tested)
        threshold = self.alpha / m if m else self.alpha
        self.last_threshold = threshold
        if not self._tripped:
            worse = [
                (cmp.p[h], -cmp.effect[h], cmp, h)
                for cmp in tested
                for h in HYPOTHESES
                if cmp.p[h] < threshold and cmp.effect[h] > self.margin
            ]
            if not worse:
                return False
            _p, _e, cmp, h = min(worse, key=lambda w: (w[0], w[1]))
            self._trip(now_s, cmp, h, threshold, m)
            return True
        recover_threshold = RECOVER_ALPHA / m if m else RECOVER_ALPHA
        clear = bool(tested) and all(
            cmp.p[h] >= recover_threshold or cmp.effect[h] < self.margin / 2 for cmp in tested for h in HYPOTHESES
        )
        self._good_streak = self._good_streak + 1 if clear else 0
        assert self.since_s is not None
        if self._good_streak >= RECOVER_EVALUATIONS and now_s - self.since_s >= self.hold_s:
            self._recover(now_s, tested)
            return True
        return False

    def describe(self) -> dict[str, object]:
        """JSON-able state for the admin endpoint. Latency quantiles count errors as infinitely slow;
        null means the quantile is an error (or, for p and effect, not applicable)."""
        classes: dict[str, object] = {}
        for c in range(self.num_classes):
            dqn, control = self._windows[c]
            cmp = self.last[c]
            entry: dict[str, object] = {"window_n": {"dqn": len(dqn.values), "control": len(control.values)}}
            entry["tested"] = cmp is not None
            if cmp is not None:
                entry.update(cmp.as_dict())
            classes[_class_name(c)] = entry
        return {
            "state": "tripped" if self._tripped else "normal",
            "routing": "fallback" if self._tripped else "dqn",
            "fallback_share": self._fallback_share,
            "since_s": self.since_s,
            "switches": self.switches,
            "hold_s": self.hold_s,
            "good_evaluations": self._good_streak,
            "p_threshold": self.last_threshold,
            "settings": {
                "control_share": self.control_share,
                "probe_share": self.probe_share,
                "window_s": self.window_s,
                "min_samples": self.min_samples,
                "alpha": self.alpha,
                "margin": self.margin,
                "min_trip_s": self.min_trip_s,
            },
            "classes": classes,
        }

    # --- internals ---------------------------------------------------------------------------------

    def _update_rates(self, now_s: float) -> None:
        """Per-class arrival rates since the last evaluation, and from them each window's thinning."""
        last = self._last_eval_s
        if last is None:  # arrivals so far span an unknown time: start counting now
            self._arrivals = [0] * self.num_classes
        self._last_eval_s = now_s
        if last is None or now_s <= last:
            return
        dt = now_s - last
        for c in range(self.num_classes):
            self._rate_hz[c] = self._arrivals[c] / dt
            self._arrivals[c] = 0
        self._set_keep()

    def _set_keep(self) -> None:
        """Keep probability per window: expected samples per window at the current split, thinned to
        `WINDOW_TARGET_SAMPLES`. Recomputed at a switch, when the split (and so each arm's rate) flips."""
        for c, (dqn, control) in enumerate(self._windows):
            for w, share in ((dqn, 1.0 - self._fallback_share), (control, self._fallback_share)):
                expected = self._rate_hz[c] * share * self.window_s
                w.keep = 1.0 if expected <= WINDOW_TARGET_SAMPLES else WINDOW_TARGET_SAMPLES / expected

    def _switch(self, tripped: bool, now_s: float) -> None:
        self._tripped = tripped
        self._fallback_share = 1.0 - self.probe_share if tripped else self.control_share
        self.switches += 1
        self.since_s = now_s
        self._good_streak = 0
        for dqn, control in self._windows:  # samples before the switch were measured under the other split
            dqn.clear()
            control.clear()
        self._set_keep()
        if self.on_switch is not None:
            self.on_switch(tripped)

    def _trip(self, now_s: float, cmp: Comparison, hypothesis: str, threshold: float, m: int) -> None:
        quick = self._recovered_s is not None and now_s - self._recovered_s < QUICK_RETRIP_WINDOWS * self.window_s
        self.hold_s = min(2.0 * self.hold_s, MAX_HOLD_S) if quick else self.min_trip_s
        log.warning(
            "guardrail tripped: class %s: DQN arm worse on %s (%+.0f%%), p=%.2g < %.2g (alpha %g / %d tests; "
            "latency tests against +%.0f%%); DQN %s; control %s; routing by the fallback except a %.0f%% DQN probe "
            "for >= %.0f s%s",
            _class_name(cmp.req_class),
            hypothesis,
            _pct(cmp.effect[hypothesis]),
            cmp.p[hypothesis],
            threshold,
            self.alpha,
            m,
            100.0 * cmp.shift,
            cmp.dqn.line(),
            cmp.control.line(),
            100.0 * self.probe_share,
            self.hold_s,
            " (quick re-trip: hold doubled)" if quick else "",
        )
        self._switch(True, now_s)

    def _recover(self, now_s: float, tested: list[Comparison]) -> None:
        # Report the class closest to "worse": the smallest p-value of any hypothesis.
        cmp = min(tested, key=lambda t: t.p[t.worst()])
        h = cmp.worst()
        assert self.since_s is not None
        log.warning(
            "guardrail recovered after %.1f s: DQN probe not worse in any of %d classes for %d evaluations "
            "(closest: class %s %s %+.0f%%, p=%.2g); DQN %s; control %s; routing by the DQN except a %.0f%% control",
            now_s - self.since_s,
            len(tested),
            RECOVER_EVALUATIONS,
            _class_name(cmp.req_class),
            h,
            _pct(cmp.effect[h]),
            cmp.p[h],
            cmp.dqn.line(),
            cmp.control.line(),
            100.0 * self.control_share,
        )
        self._recovered_s = now_s
        self._switch(False, now_s)


def _class_name(c: int) -> str:
    return RequestClass(c).name.lower() if 0 <= c < NUM_CLASSES else str(c)


def _pct(effect: float) -> float:
    """An effect in percent for a log line (inf stays inf: "+inf%")."""
    return 100.0 * effect
