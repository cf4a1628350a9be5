"""Fairness, decision accuracy and latency percentiles, and :class:`WindowStats`, which accumulates
them with the reward (reward.py) over one window: an episode of the simulator, a live reporting
interval or an evaluation run, so that "Gini" or "accuracy" means the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lbproxy.observe.reward import ERROR_PENALTY, reward
from lbproxy.observe.view import Outcome


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
