"""Live traffic generation: the Locust file (loadgen/phases.py) and its phase schedule.

The schedule logic lives here, free of any Locust import, because importing Locust monkey-patches the
standard library with gevent: the demo and the tests compute phases and durations without that side
effect, and loadgen/phases.py (run by `locust -f`) builds its LoadTestShape from the same functions.
The phases themselves are defined once in lbproxy.phases and only scaled/overridden here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lbproxy.phases import PHASES

ENV_SCALE = "PHASE_SCALE"
ENV_DURATIONS = "PHASE_DURATIONS"
ENV_USERS = "PHASE_USERS"
ENV_SPAWN_RATES = "PHASE_SPAWN_RATES"
ENV_MIXES = "PHASE_MIXES"
ENV_SEED = "LB_SEED"


class ScheduleError(ValueError):
    """A malformed phase override; the message names the option and the expected form."""


@dataclass(frozen=True, slots=True)
class LivePhase:
    """One phase as Locust runs it: lbproxy.phases.Phase after scaling and overrides."""

    number: int
    """1-based, as used in request names (`phase2:/api/heavy`)."""
    name: str
    users: int
    spawn_rate: float
    duration_s: float
    mix: tuple[float, float, float]
    burstiness: float


def _floats(text: str | None, option: str, count: int) -> list[float] | None:
    if text is None or text.strip() == "":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ScheduleError(f"{option} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count or any(v < 0 for v in values):
        raise ScheduleError(f"{option} must be {count} comma-separated non-negative numbers, got {text!r}")
    return values


def _mixes(text: str | None, option: str, count: int) -> list[tuple[float, float, float]] | None:
    """`light/heavy/static` weights per phase, phases separated by commas: `0.7/0.2/0.1,0.5/0.4/0.1,...`."""
    if text is None or text.strip() == "":
        return None
    out: list[tuple[float, float, float]] = []
    for part in text.split(","):
        try:
            w = tuple(float(v) for v in part.split("/"))
        except ValueError:
            w = ()
        if len(w) != 3 or any(v < 0 for v in w) or sum(w) <= 0:
            raise ScheduleError(f"{option} must be {count} mixes LIGHT/HEAVY/STATIC separated by commas, got {text!r}")
        out.append((w[0], w[1], w[2]))
    if len(out) != count:
        raise ScheduleError(f"{option} must be {count} mixes LIGHT/HEAVY/STATIC separated by commas, got {text!r}")
    return out


def build_schedule(
    scale: float = 1.0,
    durations: str | None = None,
    users: str | None = None,
    spawn_rates: str | None = None,
    mixes: str | None = None,
) -> tuple[LivePhase, ...]:
    """Phases 1–3 of lbproxy.phases with optional per-phase overrides (comma-separated strings, as on the
    command line); `scale` multiplies every duration (0.05 turns the 3-minute run into 9 s)."""
    if not scale > 0:
        raise ScheduleError(f"--phase-scale must be a positive number, got {scale!r}")
    n = len(PHASES)
    d = _floats(durations, "--phase-durations", n)
    u = _floats(users, "--phase-users", n)
    s = _floats(spawn_rates, "--phase-spawn-rates", n)
    m = _mixes(mixes, "--phase-mixes", n)
    return tuple(
        LivePhase(
            number=i + 1,
            name=p.name,
            users=max(1, round(u[i])) if u else p.users,
            spawn_rate=s[i] if s else p.spawn_rate,
            duration_s=(d[i] if d else p.duration_s) * scale,
            mix=m[i] if m else p.mix,
            burstiness=p.burstiness,
        )
        for i, p in enumerate(PHASES)
    )


def schedule_from_env(env: Mapping[str, str] | None = None) -> tuple[LivePhase, ...]:
    """The schedule the Locust file would run given only environment variables (used by the demo)."""
    env = os.environ if env is None else env
    scale_text = env.get(ENV_SCALE, "1.0")
    try:
        scale = float(scale_text)
    except ValueError:
        raise ScheduleError(f"{ENV_SCALE} must be a positive number, got {scale_text!r}") from None
    return build_schedule(
        scale, env.get(ENV_DURATIONS), env.get(ENV_USERS), env.get(ENV_SPAWN_RATES), env.get(ENV_MIXES)
    )


def total_duration_s(schedule: Sequence[LivePhase]) -> float:
    return sum(p.duration_s for p in schedule)


def phase_at(schedule: Sequence[LivePhase], elapsed_s: float) -> LivePhase | None:
    """The phase running `elapsed_s` after the start, or None once the schedule is over."""
    t = 0.0
    for p in schedule:
        t += p.duration_s
        if elapsed_s < t:
            return p
    return None
