"""Quality gauges measured for every policy: mean reward, capacity-normalised Gini, SED accuracy.

The same `observe.WindowStats` the simulator and the evaluator use, so a Grafana panel showing
`lbproxy_gini` means exactly what the evaluation table's "Gini" column means. One window per
second; the gauges keep their last value while there is no traffic.
"""

from __future__ import annotations

from lbproxy.observe import ClusterView, Outcome, WindowStats, is_accurate
from lbproxy.telemetry import Metrics

QUALITY_WINDOW_S = 1.0
"""Reporting window of the quality gauges (a Prometheus scrape interval is typically >= 1 s)."""


class QualityWindow:
    def __init__(self, view: ClusterView, metrics: Metrics, error_penalty: float) -> None:
        self.view = view
        self.metrics = metrics
        self.error_penalty = error_penalty
        self.window = self._new()

    def _new(self) -> WindowStats:
        return WindowStats(n=self.view.n, error_penalty=self.error_penalty)

    def record_decision(self, action: int, req_class: int) -> None:
        """Call BEFORE `view.on_dispatch`: accuracy compares with the oracle on the state the policy saw."""
        v = self.view
        self.window.record_decision(action, is_accurate(action, v.in_flight, v.class_rate[req_class], v.candidates))

    def record_outcome(self, out: Outcome) -> None:
        self.window.record_outcome(out, self.view.typical_all_s)

    def publish(self) -> None:
        """Set the gauges from the closing window and open the next one."""
        w = self.window
        self.window = self._new()
        if w.decisions == 0 and not w.latencies:
            return
        v = self.view
        n = v.n
        cap = v.capacity + [1.0] * max(0, len(w.load) - n)
        s = w.summary(capacity=cap, candidates=[i for i in v.candidates if i < len(w.load)])
        if w.latencies:
            self.metrics.reward.set(s.mean_reward)
        if w.decisions:
            self.metrics.gini.set(s.gini)
            self.metrics.accuracy.set(s.accuracy)
