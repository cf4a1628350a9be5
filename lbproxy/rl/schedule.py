"""Exploration schedule: epsilon decays linearly from `start` to `end`, then stays at `end`.

CleanRL's `linear_schedule(start_e, end_e, duration, t)`; duration = eps_fraction x total decisions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EpsilonSchedule:
    start: float
    end: float
    decay_decisions: int
    """Decisions over which epsilon moves from start to end (>= 1)."""

    def value(self, step: int) -> float:
        if step >= self.decay_decisions:
            return self.end
        frac = max(0, step) / max(1, self.decay_decisions)
        return self.start + frac * (self.end - self.start)

    @classmethod
    def for_training(cls, start: float, end: float, fraction: float, total_decisions: int) -> EpsilonSchedule:
        return cls(start, end, max(1, int(fraction * total_decisions)))
