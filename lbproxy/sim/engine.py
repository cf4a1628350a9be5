"""The discrete-event cluster simulator: the cluster model of lbproxy/cluster.py, driven by a Policy.

Model. Each server is a multi-server FIFO queue with `workers` servers: a request dispatched at t
starts at max(t, earliest free worker) and finishes start + service, where service = the request's
unit-mean draw x the server's mean for its class (lbproxy/cluster.py) x the server's current
slowdown. Because the queue is FIFO and faults are scheduled in advance, a request's completion
time is known at dispatch: the engine keeps one heap of worker free times per server and one heap
of pending completions, and never simulates anything between events. Latency = finish - arrival.
Faults, health checks, outlier ejection and slow start change the servers' state through control
events (servers.py); this module is the event loop that routes arrivals and reports completions.

Event order and the Policy contract (what the DQN's next state depends on). For each arrival at t,
first every completion and control event (fault, detection, ejection) with time <= t is processed in
time order; a completion calls ``view.on_complete(outcome, finish)`` FIRST and then
``policy.observe(outcome, view, finish)``, so the policy observes the state right after its request
left (the transition's s'). Then ``policy.choose(req_class, view, t)`` sees the view as it is at t,
and ``view.on_dispatch(i)`` records the dispatch. ``outcome.decision_id`` is the 0-based index of
the choose call over the Simulator's lifetime and ``outcome.service_time_s`` the pure service time
(time lost to a crash for killed requests, 0 for fail-fast ones).

Episodes. ``run(policy, n)`` routes the next n arrivals, then reports every remaining completion of
those requests (in time order, no new arrivals), so an episode's result covers all its requests.
That report runs ahead of the clock: the queues are not emptied, the work stays on the servers'
worker heaps and the next run's requests wait behind it at their true times. So that the view
still tells the truth, every request reported early but physically still in service after the
run's last arrival is put back into the view's in-flight counts ("ghost", bypassing on_dispatch so
decision shares are untouched) and taken out again at its true finish time, in event order: at
every arrival, `view.in_flight` is exactly the number of requests in each server. The alternative,
advancing the clock until the cluster is empty, would make later arrival times depend on the
policy and break common random numbers. Faults scheduled during the drain are applied when the
next run reaches their time.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lbproxy.observe import (
    ERROR_PENALTY,
    ClusterView,
    Outcome,
    WindowStats,
    WindowSummary,
    is_accurate,
    reward,
)
from lbproxy.outlier import OutlierDetector, SlowStart
from lbproxy.policy import Policy
from lbproxy.sim.arrivals import ArrivalStream
from lbproxy.sim.scenario import Scenario
from lbproxy.sim.servers import EJECT, GHOST, SimulatedServers

CONNECT_FAIL_S = 0.001
"""Latency of a request sent to a crashed server: a refused connect on a LAN is ~0.1-1 ms."""
BLOCK = 8192
"""Arrivals drawn per NumPy block: large enough to amortise the draw, small enough for the cache."""

_INF = math.inf
_Pending = tuple[float, int, int, int, float, bool, float, int]
"""A pending completion: (finish, decision id, server, class, latency, error, service time, queued behind)."""
_Block = tuple[list[float], list[int], list[float], list[float]]
"""A block of arrivals (`ArrivalStream.draw`): times, classes, unit-mean service draws, error draws."""
_Observe = Callable[[Outcome, ClusterView, float], None]
"""`Policy.observe`."""


@dataclass(slots=True)
class EpisodeResult:
    """Statistics of one `Simulator.run` call."""

    summary: WindowSummary
    """Reward, Gini (capacity = true rates under the phase mix), accuracy vs the SED oracle with true
    rates (NaN when run with record=False), latency percentiles, error rate."""
    sim_time_s: float
    """Simulated time from the previous run's last arrival to this run's last arrival."""
    wall_s: float
    decisions: int
    load: tuple[int, ...] = ()
    """Requests routed to each backend in this run."""


def _start_fraction(seed: int) -> float:
    """Where in the fault schedule a Simulator starts by default: uniform in [0, 1), from the seed.

    A stream of its own (spawn key 5, after the five of arrivals.py) so the traffic draws are the
    same whatever the start.
    """
    ss = np.random.SeedSequence(seed, spawn_key=(5,))
    return float(np.random.Generator(np.random.PCG64(ss)).random())


class Simulator:
    """One simulated cluster with its own clock and random streams; see the module docstring.

    `start_s` is the simulated time the clock starts at; faults and surges scheduled before it are
    applied at construction (a crash longer ago than detect_s is already marked unavailable). The
    default, None, draws it from the seed, uniformly over the scenario's schedule period
    (`Scenario.schedule_period_s`; 0 for a scenario without faults or surges). Training and
    evaluation run many short episodes, each in a fresh Simulator: with a start at 0 every episode
    would end long before the first fault (an episode spans well under a second of simulated time),
    and the fault scenarios would be indistinguishable from healthy ones. Same seed, same start: the
    comparison across policies stays exact. Pass start_s=0.0 to watch a schedule unfold from the
    beginning.
    """

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        phase: int = 0,
        *,
        start_s: float | None = None,
        error_penalty: float = ERROR_PENALTY,
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.error_penalty = error_penalty
        cluster = scenario.cluster
        self.n = len(cluster.servers)
        self.view = ClusterView.create(self.n, [s.workers * s.speed for s in cluster.servers])
        self.servers = SimulatedServers(scenario, self.view)
        self.outlier: OutlierDetector = self.servers.outlier
        self.slow_start: SlowStart = self.servers.slow_start
        self._pending: list[_Pending] = []
        self._errors = 0
        """Errors completed in the current run."""
        self._next_decision_id = 0
        self._arrivals = ArrivalStream(
            seed, cluster.service, scenario.surges, scenario.repeat_s, scenario.burst_cycle_s
        )
        if start_s is None:
            start_s = scenario.schedule_period_s * _start_fraction(seed)
        if not (start_s >= 0.0 and math.isfinite(start_s)):
            raise ValueError(f"start_s must be a finite number >= 0, got {start_s}")
        self.start_s = start_s
        """Simulated time the clock started at (faults and surges before it already applied)."""
        self._arrivals.t_s = start_s
        self.servers.advance_to(start_s)
        self.phase = -1
        self.set_phase(phase)

    # --- truth (for the oracle and accuracy) ---------------------------------------------------------
    @property
    def true_rates(self) -> list[list[float]]:
        """[class][server] requests/s the server completes when busy (workers / current mean service
        time), 0 while it is down. Live lists, updated in place when faults apply."""
        return self.servers.rates

    def capacity_rps(self) -> list[float]:
        """Per-server capacity under the current phase mix, slowdowns included, 0 while down."""
        return self.servers.capacity_rps(self.scenario.phases[self.phase].mix)

    @property
    def now_s(self) -> float:
        """Time of the last arrival routed."""
        return self._arrivals.t_s

    @property
    def decisions(self) -> int:
        """Decisions made over the Simulator's lifetime (the next decision id)."""
        return self._next_decision_id

    @property
    def panic(self) -> bool:
        """Panic mode (outlier.py): too few servers available, so every present one is a candidate."""
        return self.servers.panic

    # The detector's state, by the names the tests read.
    @property
    def _ejected(self) -> list[bool]:
        return self.outlier.ejected

    @property
    def _times_ejected(self) -> list[int]:
        return self.outlier.times_ejected

    # --- phases ---------------------------------------------------------------------------------------
    def set_phase(self, phase: int) -> None:
        """Arrival rate = phase.load x cluster capacity under phase.mix; mix and burstiness from now on."""
        phases = self.scenario.phases
        if not 0 <= phase < len(phases):
            raise ValueError(f"phase must be in 0..{len(phases) - 1} for scenario {self.scenario.name!r}, got {phase}")
        ph = phases[phase]
        self.phase = phase
        rate = ph.load * self.scenario.cluster.capacity_rps(ph.mix)
        self._arrivals.set_traffic(rate, ph.mix, ph.burstiness)

    # --- the event loop -------------------------------------------------------------------------------
    def run(self, policy: Policy, n_decisions: int, *, record: bool = True) -> EpisodeResult:
        """Route the next `n_decisions` arrivals with `policy`, then report all their completions.

        `record=False` skips the per-decision accuracy check (the only bookkeeping that costs a loop
        over the backends); the summary's accuracy is then NaN. An exception from the policy (e.g.
        NoBackendAvailable when a scenario takes every server down) propagates and leaves this
        Simulator mid-episode: discard it.
        """
        if n_decisions < 1:
            raise ValueError(f"n_decisions must be >= 1, got {n_decisions}")
        wall0 = time.perf_counter()
        t_begin = self._arrivals.t_s
        latencies: list[float] = []
        load = [0] * self.n
        self._errors = 0
        accurate = 0
        remaining = n_decisions
        while remaining:
            chunk = BLOCK if remaining > BLOCK else remaining
            remaining -= chunk
            accurate += self._route(policy, self._arrivals.draw(chunk), record, latencies, load)
        self._drain(policy.observe, latencies)
        return self._result(n_decisions, load, latencies, self._errors, accurate, record, t_begin, wall0)

    def _route(self, policy: Policy, block: _Block, record: bool, latencies: list[float], load: list[int]) -> int:
        """Route one block of arrivals, each after the completions and control events up to its time;
        returns how many decisions matched the SED oracle (0 unless `record`). The per-event path."""
        times, classes, units, err_draws = block
        view, servers, pending, in_flight = self.view, self.servers, self._pending, self.view.in_flight
        choose, observe, on_dispatch, complete = policy.choose, policy.observe, view.on_dispatch, self._complete
        apply_control, eject, slow_start_dispatch = servers.apply_control, servers.eject, servers.slow_start_dispatch
        heappush, heappop, heapreplace = heapq.heappush, heapq.heappop, heapq.heapreplace
        control, workers, mean = servers.control, servers.workers, servers.mean
        err_rate, down, crash_at, rates = servers.err_rate, servers.down, servers.crash_at, servers.rates
        slow_since = servers.slow_start.since_s  # empty unless a server is in slow start
        next_ctrl = control[0][0] if control else _INF
        accurate, did = 0, self._next_decision_id
        for k in range(len(times)):
            t = times[k]
            # Completions up to t, interleaved in time order with control events (faults,
            # surges, re-admission after ejection); with none pending, next_ctrl is infinite.
            while True:
                nc = pending[0][0] if pending else _INF
                if next_ctrl <= t and next_ctrl < nc:
                    apply_control()
                    next_ctrl = control[0][0] if control else _INF
                elif nc <= t:
                    done = heappop(pending)
                    if complete(done, observe, latencies):
                        eject(done[2], done[0])
                        next_ctrl = control[0][0] if control else _INF
                else:
                    break
            c = classes[k]
            i = choose(c, view, t)
            if record and is_accurate(i, in_flight, rates[c], view.candidates):  # SED, true rates
                accurate += 1
            qb = in_flight[i]
            on_dispatch(i)
            if slow_since:
                slow_start_dispatch(i, t)
            load[i] += 1
            if down[i]:
                fin = t + CONNECT_FAIL_S
                heappush(pending, (fin, did, i, c, CONNECT_FAIL_S, True, 0.0, qb))
            else:
                st = units[k] * mean[c][i]
                h = workers[i]
                start = h[0]
                if start < t:
                    start = t
                fin = start + st
                ca = crash_at[i]
                if fin > ca:  # still queued or running when the server crashes
                    heapreplace(h, ca)
                    heappush(pending, (ca, did, i, c, ca - t, True, ca - start if ca > start else 0.0, qb))
                else:
                    heapreplace(h, fin)
                    heappush(pending, (fin, did, i, c, fin - t, err_draws[k] < err_rate[i], st, qb))
            did += 1
        self._next_decision_id = did
        return accurate

    def _drain(self, observe: _Observe, latencies: list[float]) -> None:
        """Report every completion of this run in time order (faults wait for the next arrival), then put
        the requests still physically in service back into the view until they finish."""
        t_last = self._arrivals.t_s
        servers, pending, in_flight = self.servers, self._pending, self.view.in_flight
        ghosts = []
        while pending:
            done = heapq.heappop(pending)
            fin, b = done[0], done[2]
            if self._complete(done, observe, latencies):  # decided now, applied when the clock gets there
                servers.push_control(fin, EJECT, b, 0)
            if fin > t_last:
                ghosts.append((fin, b))
        for fin, b in ghosts:
            in_flight[b] += 1
            servers.push_control(fin, GHOST, b, 0)
        self.view.total_in_flight += len(ghosts)

    def _complete(self, done: _Pending, observe: _Observe, latencies: list[float]) -> bool:
        """Report one completion: to the view first, then to the policy (so it observes s' right after
        its request left); True when the outlier detector ejects the request's server."""
        fin, d, b, c, lat, er, st, qb = done
        out = Outcome(b, c, lat, er, d, st if self.scenario.reports_service_time else None, qb)
        self.view.on_complete(out, fin)
        observe(out, self.view, fin)
        latencies.append(lat)
        if er:
            self._errors += 1
        return self.outlier.record(b, c, lat, er)

    def _result(
        self,
        n_decisions: int,
        load: list[int],
        latencies: list[float],
        errors: int,
        accurate: int,
        record: bool,
        t_begin: float,
        wall0: float,
    ) -> EpisodeResult:
        stats = WindowStats(n=self.n, error_penalty=self.error_penalty)
        stats.decisions = n_decisions
        stats.accurate = accurate
        stats.load = load
        stats.latencies = latencies
        stats.errors = errors
        # observe.reward is linear in latency, so the sum over requests is computed in one call per
        # term instead of once per request: sum(-l/typical) - penalty * errors, in the unit the view
        # holds at the end of the run (a report; learners compute each reward at its completion).
        typical = self.view.typical_all_s
        stats.reward_sum = reward(math.fsum(latencies), False, typical, self.error_penalty) + errors * (
            reward(0.0, True, typical, self.error_penalty)
        )
        summary = stats.summary(capacity=self.capacity_rps(), candidates=self.view.candidates)
        if not record:
            summary.accuracy = math.nan
        return EpisodeResult(
            summary=summary,
            sim_time_s=self._arrivals.t_s - t_begin,
            wall_s=time.perf_counter() - wall0,
            decisions=n_decisions,
            load=tuple(load),
        )
