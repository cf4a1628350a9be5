"""The statistics the guardrail (lbproxy/guardrail.py) compares its two arms with, per request class.

What is compared, per class (light, heavy and static requests differ by 10-100x in latency, so
pooling them would mostly measure the class mix). Errors count as infinitely slow requests, so an
arm that fails is worse in every latency statistic. Three one-sided hypotheses "the DQN arm is
worse", each with a p-value (scipy.stats) and an effect size (a relative point estimate):

* ``median`` -- Mann-Whitney U (``alternative="greater"``): is a DQN-routed request stochastically
  slower? Rank-based, so it needs no distributional assumption and is robust to the heavy tails
  latencies have; it is the most powerful of the three at the minimum sample size. Effect: relative
  excess of the DQN arm's median over the control's.
* ``p90`` -- the upper tail, which users and the product (p99, errors) care about and which a
  location test can miss: a policy can make the median faster while queueing the unlucky 10 % behind
  a slow backend. Mood's quantile test: a one-sided Fisher exact test on how many requests of each
  arm exceed the *pooled* 90th percentile. The threshold is a symmetric function of the pooled sample,
  so under "same distribution" the arm labels stay exchangeable and the test is exact. p90 rather than
  p99: with a control arm of 30-300 requests, p99 has 0-3 exceedances and no test of it has power.
  Effect: relative excess of the DQN arm's p90 over the control's.
* ``errors`` -- one-sided Fisher exact test on error counts. Errors already push the two latency
  statistics up, but a 3 % error rate hardly moves a median or a p90; this test sees it directly.
  Effect: excess of the DQN arm's error rate, relative to the control's (at least `ERROR_RATE_FLOOR`).

The two latency tests are superiority-by-margin tests: they run on the DQN's latencies divided by 1 +
shift, so a small p-value means "the DQN arm is slower by more than `shift`", with confidence. That is
the practical-effect condition stated as a test: a large sample does not trip on a 1 % difference, and
-- what a point-estimate condition ("median 10 % higher") alone does not do -- a small control arm does
not trip on a chance 20 % gap either. (Measured on equal arms, 30-125 control samples per class: 5 of
1000 independent windows tripped with margin 0, 5 of 1000 with an unshifted test plus a point-estimate
margin, 1 of 1000 with the shifted test; evaluated every second, one false trip in ~70 min at 150
requests/s per class, none in an hour at 1000/s nor with 2 % errors on both arms.) The point-estimate
effect must exceed the margin as well, which matters for the error test, that has no shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lbproxy.observe import percentile

HYPOTHESES = ("median", "p90", "errors")
"""The one-sided hypotheses "the DQN arm is worse" tested per class (see the module docstring)."""

TAIL_QUANTILE_PCT = 90.0
"""Percentile of the tail test: the highest one that still has power with a 30-request control arm
(3 expected exceedances at n = 30, 30 at n = 300); p99 would have 0-3."""

LATENCY_FLOOR_S = 1e-4
"""Denominator floor of relative latency effects: 100 µs is below any proxied request's latency, so it
only keeps a zero control latency (tests, a mocked backend) from dividing by zero."""

ERROR_RATE_FLOOR = 0.01
"""Denominator floor of the relative error effect: a control arm with no errors counts as 1 %, so with
margin 0.10 the DQN arm must fail on more than 0.1 % more requests (and significantly so) to trip."""


def _relative_excess(dqn: float, control: float, floor: float) -> float:
    """(dqn - control) / max(control, floor), with infinities (error-dominated quantiles) ordered sensibly."""
    if dqn == control:
        return 0.0
    if math.isinf(control):
        return -math.inf
    if math.isinf(dqn):
        return math.inf
    return (dqn - control) / max(control, floor)


def _json_float(x: float, scale: float = 1.0, digits: int = 6) -> float | None:
    """A finite float for describe() (strict JSON has no infinity); None stands for "an error" or "n/a"."""
    return round(x * scale, digits) if math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class ArmSummary:
    """One arm's window for one class; latencies count errors as +inf (so a quantile may be inf)."""

    n: int
    median_s: float
    p90_s: float
    p99_s: float
    error_rate: float

    @classmethod
    def of(cls, sorted_values: list[float], errors: int) -> ArmSummary:
        """Nearest-rank quantiles (observe.percentile, as every other p50/p99 in lbproxy): always a
        sample value, so an error-dominated quantile is +inf rather than an interpolated NaN."""
        n = len(sorted_values)
        return cls(
            n=n,
            median_s=percentile(sorted_values, 50),
            p90_s=percentile(sorted_values, TAIL_QUANTILE_PCT),
            p99_s=percentile(sorted_values, 99),
            error_rate=errors / n if n else 0.0,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "median_ms": _json_float(self.median_s, 1e3, 3),
            "p90_ms": _json_float(self.p90_s, 1e3, 3),
            "p99_ms": _json_float(self.p99_s, 1e3, 3),
            "error_rate": round(self.error_rate, 6),
        }

    def line(self) -> str:
        def ms(x: float) -> str:
            return f"{x * 1e3:.1f} ms" if math.isfinite(x) else "error"

        return (
            f"n={self.n} median {ms(self.median_s)} p90 {ms(self.p90_s)} p99 {ms(self.p99_s)} "
            f"errors {self.error_rate:.1%}"
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    """The DQN arm against the control arm for one class in one evaluation."""

    req_class: int
    dqn: ArmSummary
    control: ArmSummary
    shift: float
    """The latency tests' null: "the DQN arm is at most this much (relative) slower"."""
    p: dict[str, float]
    """One-sided p-value per hypothesis (small: the DQN arm is worse, by more than `shift` for latency)."""
    effect: dict[str, float]
    """Relative excess of the DQN arm per hypothesis (0.10: 10 % worse; negative: better)."""

    def worst(self) -> str:
        """The hypothesis with the smallest p-value (ties: the larger effect)."""
        return min(HYPOTHESES, key=lambda h: (self.p[h], -self.effect[h]))

    def as_dict(self) -> dict[str, object]:
        return {
            "dqn": self.dqn.as_dict(),
            "control": self.control.as_dict(),
            "shift": self.shift,
            "p": {h: _json_float(v) for h, v in self.p.items()},
            "effect": {h: _json_float(v, 1.0, 4) for h, v in self.effect.items()},
        }


def compare(req_class: int, dqn: np.ndarray, control: np.ndarray, shift: float) -> Comparison:
    """Test the three hypotheses on two arms' latencies (errors as +inf; arrays need not be sorted).

    The two latency tests ask whether the DQN arm is slower by more than `shift` (relative): they run on
    the DQN's latencies divided by 1 + shift, a superiority-by-margin test. Errors (+inf) stay +inf.
    """
    d = np.sort(dqn)
    c = np.sort(control)
    nd, nc = len(d), len(c)
    # Errors are the +inf at the sorted end: count them with one binary search.
    d_err = nd - int(np.searchsorted(d, math.inf, side="left"))
    c_err = nc - int(np.searchsorted(c, math.inf, side="left"))
    ds, cs = ArmSummary.of(d.tolist(), d_err), ArmSummary.of(c.tolist(), c_err)
    d_shifted = d / (1.0 + shift)
    p_median = float(stats.mannwhitneyu(d_shifted, c, alternative="greater", method="asymptotic").pvalue)
    # Mood's quantile test at the pooled p90: exceedances by arm, one-sided Fisher exact.
    threshold = percentile(np.sort(np.concatenate((d_shifted, c))).tolist(), TAIL_QUANTILE_PCT)
    d_above = nd - int(np.searchsorted(d_shifted, threshold, side="right"))
    c_above = nc - int(np.searchsorted(c, threshold, side="right"))
    p_tail = float(stats.fisher_exact([[d_above, nd - d_above], [c_above, nc - c_above]], alternative="greater")[1])
    p_err = float(stats.fisher_exact([[d_err, nd - d_err], [c_err, nc - c_err]], alternative="greater")[1])
    p = {h: (1.0 if math.isnan(v) else v) for h, v in zip(HYPOTHESES, (p_median, p_tail, p_err), strict=True)}
    effect = {
        "median": _relative_excess(ds.median_s, cs.median_s, LATENCY_FLOOR_S),
        "p90": _relative_excess(ds.p90_s, cs.p90_s, LATENCY_FLOOR_S),
        "errors": _relative_excess(ds.error_rate, cs.error_rate, ERROR_RATE_FLOOR),
    }
    return Comparison(req_class, ds, cs, shift, p, effect)
