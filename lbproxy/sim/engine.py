"""The discrete-event cluster simulator: the cluster model of lbproxy/cluster.py, driven by a Policy.

Model. Each server is a multi-server FIFO queue with `workers` servers: a request dispatched at t
starts at max(t, earliest free worker) and finishes start + service, where service = the request's
unit-mean draw x the server's mean for its class (lbproxy/cluster.py) x the server's current
slowdown. Because the queue is FIFO and faults are scheduled in advance, a request's completion
time is known at dispatch: the engine keeps one heap of worker free times per server and one heap
of pending completions, and never simulates anything between events. Latency = finish - arrival.

Faults (time-based, from the scenario's [[fault]] tables, applied before the first arrival at or
after their time):
- slowdown: service times of requests dispatched from then on are multiplied by the factor;
- error_rate: a request dispatched from then on completes, after its full service time, as an error
  when its (common) error draw is below the rate;
- crash: requests queued or running at the crash fail at the crash time; requests sent while it is
  down fail fast after CONNECT_FAIL_S (connection refused); detect_s later the view marks it
  unavailable (what active health checks do live), so policies stop choosing it;
- recover: back to the baseline (up with idle workers, slowdown 1, the server's own error_rate),
  as a restarted backend process is; the view marks it available again at once.

Which servers a policy may choose follows lbproxy/outlier.py, the rules the live pool applies: outlier
ejection after consecutive errors or a sustained latency far above the other servers' (the scenario's
eject_consecutive_failures / eject_base_s / max_ejection_percent keys, the proxy's defaults for the
rest), panic mode when fewer than half the servers are available, and slow start for a server that
recovers after health checks had marked it down (a restarted process). Without ejection, a crashed
server that fails fast looks like the fastest one to latency-driven policies until health checks
notice, and attracts all traffic (a "black hole").

Event order and the Policy contract (what the DQN's next state depends on). For each arrival at t,
first every completion and fault with time <= t is processed in time order; a completion calls
``view.on_complete(outcome, finish)`` FIRST and then ``policy.observe(outcome, view, finish)``, so
the policy observes the state right after its request left (the transition's s'). Then
``policy.choose(req_class, view, t)`` sees the view as it is at t, and ``view.on_dispatch(i)``
records the dispatch. ``outcome.decision_id`` is the 0-based index of the choose call over the
Simulator's lifetime and ``outcome.service_time_s`` the pure service time (time lost to a crash
for killed requests, 0 for fail-fast ones).

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
    NUM_CLASSES,
    ClusterView,
    Outcome,
    WindowStats,
    WindowSummary,
    is_accurate,
    reward,
)
from lbproxy.outlier import OutlierConfig, OutlierDetector, SlowStart, route_candidates
from lbproxy.policy import Policy
from lbproxy.sim.arrivals import ArrivalStream
from lbproxy.sim.scenario import Scenario

CONNECT_FAIL_S = 0.001
"""Latency of a request sent to a crashed server: a refused connect on a LAN is ~0.1-1 ms."""
BLOCK = 8192
"""Arrivals drawn per NumPy block: large enough to amortise the draw, small enough for the cache."""

_INF = math.inf
_Pending = tuple[float, int, int, int, float, bool, float, int]
"""A pending completion: (finish, decision id, server, class, latency, error, service time, queued behind)."""
_Observe = Callable[[Outcome, ClusterView, float], None]
"""`Policy.observe`."""
# control-event kinds
_FAULT, _DETECT, _GHOST, _EJECT, _UNEJECT = 0, 1, 2, 3, 4


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
        servers = cluster.servers
        n = len(servers)
        self.n = n
        self.view = ClusterView.create(n, [s.workers * s.speed for s in servers])
        # Base mean service time per [class][server] at slowdown 1; `_mean` is the current one.
        self._base_mean = [[s.mean_service_s(cluster.service, c) for s in servers] for c in range(NUM_CLASSES)]
        self._mean = [row[:] for row in self._base_mean]
        self._slowdown = [1.0] * n
        self._err_rate = [s.error_rate for s in servers]
        self._down = [False] * n
        self._crash_epoch = [0] * n
        self._detected = [False] * n  # health checks see it down
        rules = OutlierConfig(
            eject_consecutive_failures=scenario.eject_consecutive_failures,  # 0 disables
            eject_base_s=scenario.eject_base_s,
            max_ejection_percent=scenario.max_ejection_percent,
        )
        self._panic_threshold = rules.panic_threshold_percent
        self.outlier = OutlierDetector(rules, self.view.available)
        self.slow_start = SlowStart(
            rules.slow_start_window_s, rules.slow_start_aggression, rules.slow_start_min_weight_percent
        )
        self._present = [True] * n
        self.panic = False
        self._base = self.view.candidates
        """The candidates before slow start takes its share out."""
        self._workers = [[0.0] * s.workers for s in servers]
        self._pending: list[_Pending] = []
        self._errors = 0
        """Errors completed in the current run."""
        self._next_decision_id = 0
        self._rates: list[list[float]] = [[0.0] * n for _ in range(NUM_CLASSES)]
        self._refresh_rates()
        # Faults: a heap of (time, seq, kind, fault index or server, epoch); repeats re-push themselves.
        self._control: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        for k, f in enumerate(scenario.faults):
            self._push_control(f.at_s, _FAULT, k, 0)
        self._crash_at = [self._next_crash(i, -1.0) for i in range(n)]
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
        while self._control and self._control[0][0] <= start_s:
            self._apply_control()
        self.phase = -1
        self.set_phase(phase)

    # --- truth (for the oracle and accuracy) ---------------------------------------------------------
    @property
    def true_rates(self) -> list[list[float]]:
        """[class][server] requests/s the server completes when busy (workers / current mean service
        time), 0 while it is down. Live lists, updated in place when faults apply."""
        return self._rates

    def _refresh_rates(self) -> None:
        for c in range(NUM_CLASSES):
            row = self._rates[c]
            for i, s in enumerate(self.scenario.cluster.servers):
                row[i] = 0.0 if self._down[i] else s.workers / self._mean[c][i]

    def capacity_rps(self) -> list[float]:
        """Per-server capacity under the current phase mix, slowdowns included, 0 while down."""
        mix = self.scenario.phases[self.phase].mix
        total = sum(mix)
        out = []
        for i in range(self.n):
            if self._down[i]:
                out.append(0.0)
                continue
            mean = sum(m * self._mean[c][i] for c, m in enumerate(mix)) / total
            out.append(self.scenario.cluster.servers[i].workers / mean)
        return out

    @property
    def now_s(self) -> float:
        """Time of the last arrival routed."""
        return self._arrivals.t_s

    @property
    def decisions(self) -> int:
        """Decisions made over the Simulator's lifetime (the next decision id)."""
        return self._next_decision_id

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

    # --- faults ---------------------------------------------------------------------------------------
    def _push_control(self, t: float, kind: int, ref: int, epoch: int) -> None:
        heapq.heappush(self._control, (t, self._seq, kind, ref, epoch))
        self._seq += 1

    def _next_crash(self, server: int, after_s: float) -> float:
        """First scheduled crash of `server` strictly after `after_s` (inf if none)."""
        best = _INF
        period = self.scenario.repeat_s
        for f in self.scenario.faults:
            if f.crash and f.server == server:
                t = f.at_s
                if period > 0 and t <= after_s:
                    t += math.floor((after_s - t) / period + 1.0) * period
                if t > after_s and t < best:
                    best = t
        return best

    def _apply_control(self) -> None:
        t, _, kind, ref, epoch = heapq.heappop(self._control)
        if kind == _GHOST:  # a request reported early by a drain leaves its server now
            self.view.in_flight[ref] -= 1
            self.view.total_in_flight -= 1
            return
        if kind == _DETECT:
            if self._down[ref] and self._crash_epoch[ref] == epoch:
                self._detected[ref] = True
                self._update_available(ref)
            return
        if kind == _EJECT:
            self._eject(ref, t)
            return
        if kind == _UNEJECT:
            self.outlier.uneject(ref)
            self._update_available(ref)
            return
        f = self.scenario.faults[ref]
        if self.scenario.repeat_s > 0:
            self._push_control(t + self.scenario.repeat_s, _FAULT, ref, 0)
        i = f.server
        if f.crash:
            self._crash_at[i] = self._next_crash(i, t)
            if not self._down[i]:
                self._down[i] = True
                self._crash_epoch[i] += 1
                self._push_control(t + self.scenario.detect_s, _DETECT, i, self._crash_epoch[i])
        elif f.recover:  # back to the baseline, as a restarted backend process is (backends/faults.py)
            if self._down[i]:
                self._down[i] = False
                self._workers[i][:] = [t] * len(self._workers[i])
            if self._detected[i]:  # health checks had marked it down: it comes back in slow start
                self._detected[i] = False
                self.outlier.readmit(i)
                self.slow_start.begin(i, t)
                self._update_available(i)
            self._slowdown[i] = 1.0
            for c in range(NUM_CLASSES):
                self._mean[c][i] = self._base_mean[c][i]
            self._err_rate[i] = self.scenario.cluster.servers[i].error_rate
        if f.slowdown is not None:
            self._slowdown[i] = f.slowdown
            for c in range(NUM_CLASSES):
                self._mean[c][i] = self._base_mean[c][i] * f.slowdown
        if f.error_rate is not None:
            self._err_rate[i] = f.error_rate
        self._refresh_rates()

    def _update_available(self, i: int) -> None:
        """Server i's availability changed (or its slow start began): new candidates (outlier.py)."""
        view = self.view
        available = not (self._detected[i] or self.outlier.ejected[i])
        view.available[i] = available
        if not available:
            self.slow_start.end(i)
        self._base, self.panic = route_candidates(view.available, self._present, self._panic_threshold)
        view.candidates = self._base if self.panic else self.slow_start.candidates(self._base, view.capacity)

    def _slow_start_dispatch(self, i: int, t: float) -> None:
        if self.slow_start.on_dispatch(i, t) and not self.panic:
            self.view.candidates = self.slow_start.candidates(self._base, self.view.capacity)

    def _eject(self, i: int, t: float) -> None:
        """Outlier ejection (outlier.py): out for its duration unless the percentage cap refuses."""
        duration = self.outlier.eject(i, t)
        if duration is not None:
            self._push_control(t + duration, _UNEJECT, i, 0)
            self._update_available(i)

    # The detector's state, by the names the tests read.
    @property
    def _ejected(self) -> list[bool]:
        return self.outlier.ejected

    @property
    def _times_ejected(self) -> list[int]:
        return self.outlier.times_ejected

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
        view = self.view
        choose, observe = policy.choose, policy.observe
        on_dispatch, complete = view.on_dispatch, self._complete
        heappush, heappop, heapreplace = heapq.heappush, heapq.heappop, heapq.heapreplace
        pending = self._pending
        control = self._control
        workers = self._workers
        mean = self._mean
        err_rate = self._err_rate
        down = self._down
        crash_at = self._crash_at
        rates = self._rates
        in_flight = view.in_flight
        slow_since = self.slow_start.since_s  # empty unless a server is in slow start
        next_ctrl = control[0][0] if control else _INF
        latencies: list[float] = []
        load = [0] * self.n
        self._errors = 0
        accurate = 0
        did = self._next_decision_id
        remaining = n_decisions
        while remaining:
            chunk = BLOCK if remaining > BLOCK else remaining
            remaining -= chunk
            times, classes, units, err_draws = self._arrivals.draw(chunk)
            for k in range(chunk):
                t = times[k]
                # Completions up to t, interleaved in time order with control events (faults,
                # surges, re-admission after ejection); with none pending, next_ctrl is infinite.
                while True:
                    nc = pending[0][0] if pending else _INF
                    if next_ctrl <= t and next_ctrl < nc:
                        self._apply_control()
                        next_ctrl = control[0][0] if control else _INF
                    elif nc <= t:
                        done = heappop(pending)
                        if complete(done, observe, latencies):
                            self._eject(done[2], done[0])
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
                    self._slow_start_dispatch(i, t)
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
        # Drain: report every completion of this run in time order (faults wait for the next arrival),
        # then put the requests still physically in service back into the view until they finish.
        t_last = self._arrivals.t_s
        ghosts = []
        while pending:
            done = heappop(pending)
            fin, b = done[0], done[2]
            if complete(done, observe, latencies):  # decided now, applied when the clock gets there
                self._push_control(fin, _EJECT, b, 0)
            if fin > t_last:
                ghosts.append((fin, b))
        for fin, b in ghosts:
            in_flight[b] += 1
            self._push_control(fin, _GHOST, b, 0)
        view.total_in_flight += len(ghosts)
        self._next_decision_id = did
        return self._result(n_decisions, load, latencies, self._errors, accurate, record, t_begin, wall0)

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
