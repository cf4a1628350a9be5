"""The simulated servers' state and the control events that change it (the simulator's cluster side).

What each server can do at the current simulated time: its mean service time per class (the baseline of
lbproxy/cluster.py x its current slowdown), its error rate, whether it is up, its workers' free times,
and which servers a policy may choose. The event loop (engine.py) reads these as plain lists; they
change only through `SimulatedServers.apply_control`, which the loop calls when the next control
event's time comes, in time order with the completions.

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
"""

from __future__ import annotations

import heapq
import math

from lbproxy.observe import NUM_CLASSES, ClusterView
from lbproxy.outlier import OutlierConfig, OutlierDetector, SlowStart, route_candidates
from lbproxy.sim.scenario import Scenario

_INF = math.inf
# Control-event kinds. GHOST: a request reported early by a drain (engine.py) leaves its server now.
FAULT, DETECT, GHOST, EJECT, UNEJECT = 0, 1, 2, 3, 4


class SimulatedServers:
    """The servers of one Simulator and their control-event heap; see the module docstring.

    The lists are live: the event loop binds them once per block of arrivals and sees every change.
    """

    def __init__(self, scenario: Scenario, view: ClusterView) -> None:
        self.scenario = scenario
        self.view = view
        cluster = scenario.cluster
        servers = cluster.servers
        n = len(servers)
        # Base mean service time per [class][server] at slowdown 1; `mean` is the current one.
        self.base_mean = [[s.mean_service_s(cluster.service, c) for s in servers] for c in range(NUM_CLASSES)]
        self.mean = [row[:] for row in self.base_mean]
        self.slowdown = [1.0] * n
        self.err_rate = [s.error_rate for s in servers]
        self.down = [False] * n
        self.crash_epoch = [0] * n
        self.detected = [False] * n  # health checks see it down
        rules = OutlierConfig(
            eject_consecutive_failures=scenario.eject_consecutive_failures,  # 0 disables
            eject_base_s=scenario.eject_base_s,
            max_ejection_percent=scenario.max_ejection_percent,
        )
        self.panic_threshold = rules.panic_threshold_percent
        self.outlier = OutlierDetector(rules, view.available)
        self.slow_start = SlowStart(
            rules.slow_start_window_s, rules.slow_start_aggression, rules.slow_start_min_weight_percent
        )
        self.present = [True] * n
        self.panic = False
        self.base = view.candidates
        """The candidates before slow start takes its share out."""
        self.workers = [[0.0] * s.workers for s in servers]
        """Per server: a heap of its workers' free times."""
        self.rates: list[list[float]] = [[0.0] * n for _ in range(NUM_CLASSES)]
        self.refresh_rates()
        # Control events: a heap of (time, seq, kind, fault index or server, epoch); repeats re-push themselves.
        self.control: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        for k, f in enumerate(scenario.faults):
            self.push_control(f.at_s, FAULT, k, 0)
        self.crash_at = [self._next_crash(i, -1.0) for i in range(n)]
        """Per server: the time of its next scheduled crash (inf if none)."""

    # --- truth (for the oracle and accuracy) ---------------------------------------------------------
    def refresh_rates(self) -> None:
        """`rates` [class][server]: workers / current mean service time, 0 while down (in place)."""
        for c in range(NUM_CLASSES):
            row = self.rates[c]
            for i, s in enumerate(self.scenario.cluster.servers):
                row[i] = 0.0 if self.down[i] else s.workers / self.mean[c][i]

    def capacity_rps(self, mix: tuple[float, ...] | list[float]) -> list[float]:
        """Per-server capacity under the class `mix`, slowdowns included, 0 while down."""
        total = sum(mix)
        out = []
        for i, s in enumerate(self.scenario.cluster.servers):
            if self.down[i]:
                out.append(0.0)
                continue
            mean = sum(m * self.mean[c][i] for c, m in enumerate(mix)) / total
            out.append(s.workers / mean)
        return out

    # --- control events ------------------------------------------------------------------------------
    def push_control(self, t: float, kind: int, ref: int, epoch: int) -> None:
        heapq.heappush(self.control, (t, self._seq, kind, ref, epoch))
        self._seq += 1

    def advance_to(self, t: float) -> None:
        """Apply every control event at or before `t` (a Simulator starting at `t`)."""
        while self.control and self.control[0][0] <= t:
            self.apply_control()

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

    def apply_control(self) -> None:
        """Pop the earliest control event and apply it."""
        t, _, kind, ref, epoch = heapq.heappop(self.control)
        if kind == GHOST:  # a request reported early by a drain leaves its server now
            self.view.in_flight[ref] -= 1
            self.view.total_in_flight -= 1
        elif kind == DETECT:
            if self.down[ref] and self.crash_epoch[ref] == epoch:
                self.detected[ref] = True
                self._update_available(ref)
        elif kind == EJECT:
            self.eject(ref, t)
        elif kind == UNEJECT:
            self.outlier.uneject(ref)
            self._update_available(ref)
        else:
            self._apply_fault(ref, t)

    def _apply_fault(self, ref: int, t: float) -> None:
        """Scenario fault `ref` at time `t` (and its next repeat scheduled)."""
        f = self.scenario.faults[ref]
        if self.scenario.repeat_s > 0:
            self.push_control(t + self.scenario.repeat_s, FAULT, ref, 0)
        i = f.server
        if f.crash:
            self.crash_at[i] = self._next_crash(i, t)
            if not self.down[i]:
                self.down[i] = True
                self.crash_epoch[i] += 1
                self.push_control(t + self.scenario.detect_s, DETECT, i, self.crash_epoch[i])
        elif f.recover:  # back to the baseline, as a restarted backend process is (backends/faults.py)
            if self.down[i]:
                self.down[i] = False
                self.workers[i][:] = [t] * len(self.workers[i])
            if self.detected[i]:  # health checks had marked it down: it comes back in slow start
                self.detected[i] = False
                self.outlier.readmit(i)
                self.slow_start.begin(i, t)
                self._update_available(i)
            self.slowdown[i] = 1.0
            for c in range(NUM_CLASSES):
                self.mean[c][i] = self.base_mean[c][i]
            self.err_rate[i] = self.scenario.cluster.servers[i].error_rate
        if f.slowdown is not None:
            self.slowdown[i] = f.slowdown
            for c in range(NUM_CLASSES):
                self.mean[c][i] = self.base_mean[c][i] * f.slowdown
        if f.error_rate is not None:
            self.err_rate[i] = f.error_rate
        self.refresh_rates()

    # --- which servers a policy may choose (outlier.py) ----------------------------------------------
    def _update_available(self, i: int) -> None:
        """Server i's availability changed (or its slow start began): new candidates (outlier.py)."""
        view = self.view
        available = not (self.detected[i] or self.outlier.ejected[i])
        view.available[i] = available
        if not available:
            self.slow_start.end(i)
        self.base, self.panic = route_candidates(view.available, self.present, self.panic_threshold)
        view.candidates = self.base if self.panic else self.slow_start.candidates(self.base, view.capacity)

    def slow_start_dispatch(self, i: int, t: float) -> None:
        """A request went to server i while some server is in slow start: its debt, maybe new candidates."""
        if self.slow_start.on_dispatch(i, t) and not self.panic:
            self.view.candidates = self.slow_start.candidates(self.base, self.view.capacity)

    def eject(self, i: int, t: float) -> None:
        """Outlier ejection (outlier.py): out for its duration unless the percentage cap refuses."""
        duration = self.outlier.eject(i, t)
        if duration is not None:
            self.push_control(t + duration, UNEJECT, i, 0)
            self._update_available(i)
