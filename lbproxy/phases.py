"""The three traffic phases, defined once: the simulator's curriculum and Locust's LoadTestShape both
import this, so "phase 2" means the same traffic in training, in the simulator and on live HTTP.

Phase 1 `steady`  — moderate Poisson load, mostly light requests: learn who is fast.
Phase 2 `mixed`   — higher load, more heavy requests: learn class-dependent speeds and queueing.
Phase 3 `peak`    — near-saturation bursty load: learn to avoid queues when it matters most.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    load: float
    """Offered load as a fraction of total cluster capacity (simulator arrival rate)."""
    users: int
    """Concurrent Locust users (live traffic)."""
    spawn_rate: float
    """Locust users started per second when the phase begins."""
    duration_s: float
    """Wall-clock length of the phase in Locust at phase scale 1.0."""
    mix: tuple[float, float, float]
    """Weights of the request classes (light, heavy, static)."""
    burstiness: float
    """0 = Poisson; b > 0 = on/off modulated arrivals whose on-rate is (1 + b) times the mean."""


PHASES: tuple[Phase, ...] = (
    Phase("steady", load=0.5, users=16, spawn_rate=8, duration_s=60, mix=(0.7, 0.2, 0.1), burstiness=0.0),
    Phase("mixed", load=0.7, users=32, spawn_rate=16, duration_s=60, mix=(0.5, 0.4, 0.1), burstiness=0.0),
    Phase("peak", load=0.85, users=48, spawn_rate=24, duration_s=60, mix=(0.4, 0.5, 0.1), burstiness=1.0),
)


def phase_index_for_episode(episode: int, total_episodes: int) -> int:
    """Curriculum: the run is split into three equal thirds (2000 episodes each at the default 6000)."""
    if total_episodes <= 0:
        return 0
    return min(len(PHASES) - 1, episode * len(PHASES) // total_episodes)
