"""Locust traffic for lbproxy: phases 1–3 of lbproxy.phases (steady, mixed, peak) against the proxy.

    locust -f loadgen/phases.py --host http://127.0.0.1:8080                      # web UI, full 3-minute shape
    locust -f loadgen/phases.py --host http://127.0.0.1:8080 --headless --csv out --phase-scale 0.1

Every request is named `phase<N>:<path>` (e.g. `phase2:/api/heavy`), so `--csv` stats and history
count requests per phase. The shape stops the run by itself after the last phase.

Custom arguments (each also an environment variable):
  --phase-scale F           PHASE_SCALE        multiply every phase duration (default 1.0)
  --phase-durations A,B,C   PHASE_DURATIONS    seconds per phase at scale 1.0
  --phase-users A,B,C       PHASE_USERS        concurrent users per phase
  --phase-spawn-rates A,B,C PHASE_SPAWN_RATES  users started per second when a phase begins
  --phase-mixes L/H/S,...   PHASE_MIXES        request-class weights (light/heavy/static) per phase
  --lb-seed N               LB_SEED            seed of the request-class choice (same seed = same sequence)
  --think-time-ms MS        THINK_TIME_MS      mean exponential pause between a user's requests (default 0)
  --burst-period-s S        BURST_PERIOD_S     on/off cycle of bursty phases (default 2 s)
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from pathlib import Path
from typing import Any

try:
    from loadgen import LivePhase, ScheduleError, build_schedule, phase_at
except ImportError:
    # `locust -f loadgen/phases.py` from a checkout where lbproxy is not installed (or installed before
    # loadgen/ had an __init__.py, which makes `loadgen` an empty namespace package): use the checkout.
    sys.modules.pop("loadgen", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadgen import LivePhase, ScheduleError, build_schedule, phase_at

from locust import FastHttpUser, LoadTestShape, events, task
from locust.env import Environment

PATHS = ("/api/light", "/api/heavy", "/static/app.js")
"""One path per request class, in lbproxy.observe.RequestClass order (light, heavy, static)."""
DEFAULT_BURST_PERIOD_S = 2.0
"""On/off cycle of bursty phases: short enough that a 10 s test phase still sees several bursts."""

_schedules: dict[int, tuple[LivePhase, ...]] = {}
_user_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--phase-scale", type=float, env_var="PHASE_SCALE", default=1.0, help="Duration factor.")
    parser.add_argument("--phase-durations", env_var="PHASE_DURATIONS", default="", help="Seconds per phase: A,B,C.")
    parser.add_argument("--phase-users", env_var="PHASE_USERS", default="", help="Users per phase: A,B,C.")
    parser.add_argument("--phase-spawn-rates", env_var="PHASE_SPAWN_RATES", default="", help="Spawn rates: A,B,C.")
    parser.add_argument("--phase-mixes", env_var="PHASE_MIXES", default="", help="Class mixes: L/H/S,L/H/S,L/H/S.")
    parser.add_argument("--lb-seed", type=int, env_var="LB_SEED", default=0, help="Seed of the request choice.")
    parser.add_argument("--think-time-ms", type=float, env_var="THINK_TIME_MS", default=0.0, help="Mean pause.")
    parser.add_argument(
        "--burst-period-s", type=float, env_var="BURST_PERIOD_S", default=DEFAULT_BURST_PERIOD_S, help="On/off cycle."
    )


def schedule_of(environment: Environment) -> tuple[LivePhase, ...]:
    """The schedule for this Locust run, built once from its parsed options."""
    key = id(environment)
    if key not in _schedules:
        o = environment.parsed_options
        if o is None:  # library use without a command line: the standard phases
            _schedules[key] = build_schedule()
        else:
            _schedules[key] = build_schedule(
                o.phase_scale, o.phase_durations, o.phase_users, o.phase_spawn_rates, o.phase_mixes
            )
    return _schedules[key]


@events.init.add_listener
def _check_options(environment: Environment, **_kwargs: Any) -> None:
    """Reject malformed overrides before any traffic, with one line and exit code 2."""
    try:
        schedule_of(environment)
    except ScheduleError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        sys.exit(2)


class PhaseShape(LoadTestShape):
    """Users and spawn rate of the current phase; None after the last phase stops the run."""

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        phase = phase_at(schedule_of(self.runner.environment), self.get_run_time())
        if phase is None:
            return None
        return phase.users, phase.spawn_rate


class WebUser(FastHttpUser):
    """A client of the emulated web application: one request class per request, drawn with the current
    phase's mix from a per-user seeded RNG (a weighted @task set cannot change weights per phase)."""

    def on_start(self) -> None:
        o = self.environment.parsed_options
        seed = o.lb_seed if o is not None else 0
        self.rng = random.Random(seed * 1_000_003 + next(_user_ids))
        self.think_s = (o.think_time_ms if o is not None else 0.0) / 1000.0
        self.burst_period_s = o.burst_period_s if o is not None else DEFAULT_BURST_PERIOD_S

    def current_phase(self) -> LivePhase:
        schedule = schedule_of(self.environment)
        shape = self.environment.shape_class
        if shape is None:
            return schedule[0]
        return phase_at(schedule, shape.get_run_time()) or schedule[-1]

    def wait_time(self) -> float:
        """Exponential think time; in bursty phases (burstiness b) also idle through the "off" share
        b/(1+b) of each cycle, so the on-period rate is (1+b) times the mean, as in the simulator."""
        pause = self.rng.expovariate(1.0 / self.think_s) if self.think_s > 0 else 0.0
        b = self.current_phase().burstiness
        if b > 0 and self.burst_period_s > 0:
            on_s = self.burst_period_s / (1.0 + b)
            into_cycle = time.monotonic() % self.burst_period_s
            if into_cycle >= on_s:
                pause = max(pause, self.burst_period_s - into_cycle)
        return pause

    @task
    def request(self) -> None:
        phase = self.current_phase()
        path = self.rng.choices(PATHS, weights=phase.mix)[0]
        self.client.get(path, name=f"phase{phase.number}:{path}")
