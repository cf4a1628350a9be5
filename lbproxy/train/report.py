"""What a training run reports, the same for both trainers: a CSV row every `metrics_every` episodes
and a progress line on stderr.

A row is the mean of the per-episode statistics of the episodes it closes (:class:`MetricsWindow`),
in the simulator and live alike. Averaging episodes, not pooling their decisions, is the one rule that
is right for both: the simulator's episodes may each run on a different cluster (the general model
trains on many), where a Gini or a load vector pooled across clusters would mean nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lbproxy.observe import WindowSummary
from lbproxy.telemetry import TRAINING_METRIC_FIELDS

METRIC_FIELDS = TRAINING_METRIC_FIELDS
"""Columns of metrics/training_metrics.csv (`lbproxy plot` reads them), filled by `metrics_row`."""
EPISODE_STATS = METRIC_FIELDS[2:10]
"""The columns averaged over a row's episodes (mean_reward .. loss)."""
PROGRESS_MIN_INTERVAL_S = 5.0
"""At most one progress line per this many wall seconds (plus the first and the last)."""


def metrics_row(
    episode: int, phase: int | str, metrics: Mapping[str, float], *, epsilon: float, updates: int, wall_s: float
) -> dict[str, object]:
    """One CSV row, the same format whichever trainer writes it: `metrics` holds the columns from
    mean_reward to loss (means over the episodes the row closes), 6 significant digits each."""
    values = {k: f"{float(metrics[k]):.6g}" for k in EPISODE_STATS}
    return {
        "episode": episode,
        "phase": phase,
        **values,
        "epsilon": f"{epsilon:.4f}",
        "updates": updates,
        "wall_s": f"{wall_s:.1f}",
    }


@dataclass
class MetricsWindow:
    """The per-episode statistics of the row being accumulated. Saved in checkpoints (`rows` are
    primitives), so a resumed run writes the row the uninterrupted one would have written."""

    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, summary: WindowSummary, loss: float) -> None:
        """One finished episode; `loss` is the learner's latest TD loss (NaN before learning starts)."""
        self.rows.append(
            {
                "mean_reward": summary.mean_reward,
                "gini": summary.gini,
                "accuracy": summary.accuracy,
                "mean_ms": summary.mean_latency_s * 1e3,
                "p50_ms": summary.p50_s * 1e3,
                "p99_ms": summary.p99_s * 1e3,
                "error_rate": summary.error_rate,
                "loss": float(loss),
            }
        )

    def means(self) -> dict[str, float]:
        """Each column's mean over the episodes; NaN values (a loss before learning) are skipped."""
        out = {}
        for key in EPISODE_STATS:
            vals = [r[key] for r in self.rows if key in r and not math.isnan(r[key])]
            out[key] = sum(vals) / len(vals) if vals else math.nan
        return out

    def state(self) -> list[dict[str, float]]:
        return [dict(r) for r in self.rows]

    @classmethod
    def from_state(cls, rows: Sequence[Mapping[str, float]]) -> MetricsWindow:
        return cls(rows=[dict(r) for r in rows])


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """The progress line printed when a row is written: at most one per PROGRESS_MIN_INTERVAL_S, and
    always the first and the last, so a 6000-episode run says how far it is and how long it has left
    without flooding the terminal."""

    def __init__(self, total_episodes: int, start_episode: int, wall_before_s: float = 0.0) -> None:
        self.total = total_episodes
        self.start = start_episode
        self.wall_before_s = wall_before_s
        self._last = -math.inf

    def row(
        self, done: int, phase: int | str, means: Mapping[str, float], *, epsilon: float, wall_s: float, extra: str = ""
    ) -> None:
        now = time.perf_counter()
        if now - self._last < PROGRESS_MIN_INTERVAL_S and done < self.total:
            return
        self._last = now
        rate = (done - self.start) / max(wall_s - self.wall_before_s, 1e-9)
        eta_s = (self.total - done) / rate if rate > 0 else math.inf
        print(
            f"lbproxy train: episode {done}/{self.total}  phase {phase}  reward {means['mean_reward']:.3f}  "
            f"p99 {means['p99_ms']:.1f} ms  acc {means['accuracy']:.2f}  eps {epsilon:.3f}  "
            f"loss {means['loss']:.4g}{extra}  {rate:.1f} ep/s  ETA {format_eta(eta_s)}",
            file=sys.stderr,
            flush=True,
        )
