"""Figures per time window of an open-loop run (loadgen/open_loop.py's RunResult): the requests sent in
a window or still in flight at its start, failed or not, and their latency percentiles.

Used by benchmarks/reliability_run.py and benchmarks/soak_run.py.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadgen.open_loop import RunResult, is_failure  # noqa: E402


# --- figures per window -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WindowStats:
    """Requests sent in [from_s, to_s) or still in flight at from_s: failed = no response or status >= 500."""

    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[int, int]

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def sent_between(result: RunResult, from_s: float, to_s: float) -> np.ndarray:
    s = result.sent_s
    return ~np.isnan(s) & (s >= from_s) & (s < to_s)


def held_at(result: RunResult, t_s: float) -> np.ndarray:
    """Requests sent before `t_s` and not answered by then."""
    s = result.sent_s
    return ~np.isnan(s) & (s < t_s) & (s + result.latency_s >= t_s)


def window_mask(result: RunResult, from_s: float, to_s: float) -> np.ndarray:
    """Requests sent in [from_s, to_s) or still in flight at from_s."""
    return sent_between(result, from_s, to_s) | held_at(result, from_s)


def window(result: RunResult, from_s: float, to_s: float) -> WindowStats:
    mask = window_mask(result, from_s, to_s)
    lat_ms = result.latency_s[mask] * 1e3
    codes, counts = np.unique(result.status[mask], return_counts=True)

    def pct(q: float) -> float:
        return float(np.percentile(lat_ms, q)) if len(lat_ms) else math.nan

    return WindowStats(
        requests=int(mask.sum()),
        failed=int(is_failure(result.status[mask]).sum()),
        p50_ms=pct(50),
        p99_ms=pct(99),
        max_ms=float(lat_ms.max()) if len(lat_ms) else math.nan,
        codes={int(c): int(n) for c, n in zip(codes, counts, strict=True)},
    )


def in_flight_at(result: RunResult, instants_s: Sequence[float], tolerance_s: float) -> np.ndarray:
    """Requests in flight (sent, not yet answered) within `tolerance_s` of any of the instants."""
    start = result.sent_s
    end = start + result.latency_s
    mask = np.zeros(len(start), dtype=bool)
    for t in instants_s:
        mask |= (start - tolerance_s <= t) & (end + tolerance_s >= t)
    return mask & ~np.isnan(start)
