"""Peak-EWMA: power of two choices on `latency_cost * (in_flight + 1)`.

Finagle's `PeakEwma` balancer (Twitter), used by Linkerd and tower (`tower::load::PeakEwma` with
`tower::balance::p2c`): each backend's cost is a peak-sensitive EWMA of its round-trip time (a slow
response is believed at once, fast ones pull it down with decay time tau = 10 s, Finagle/Linkerd
default) multiplied by its pending requests plus one. The estimate itself lives in
`ClusterView` (lbproxy/observe/view.py: `PEAK_EWMA_TAU_S`, and `DEFAULT_RTT_S` = 30 ms for a backend never
measured, linkerd2-proxy's default), so the proxy, the simulator and the DQN's features agree; this
policy only reads it, decayed to `now_s` as tower does when it reads the load.

Sampling is p2c's (`policies/base.two_distinct`: two distinct uniform positions in `candidates`).
"""

from __future__ import annotations

import math

from lbproxy.observe import PEAK_EWMA_TAU_S, ClusterView, Outcome
from lbproxy.policies.base import SeededPolicy, sole_candidate, two_distinct


class PeakEwma(SeededPolicy):
    """Better of two distinct random candidates by decayed_cost(i) * (in_flight[i] + 1)."""

    name = "peak_ewma"

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if len(cands) <= 1:
            return sole_candidate(cands)
        ia, ib = two_distinct(cands, self._random)
        # Inlined `view.decayed_cost(i, now_s)` (same expression, bit for bit; a test pins the two
        # together): it saves two method calls, 5-20 % of the decision (benchmarks/decision_cost.py).
        last = view.last_update_s
        cost = view.latency_cost_s
        in_flight = view.in_flight
        load_a = cost[ia] * math.exp(-max(0.0, now_s - last[ia]) / PEAK_EWMA_TAU_S) * (in_flight[ia] + 1)
        load_b = cost[ib] * math.exp(-max(0.0, now_s - last[ib]) / PEAK_EWMA_TAU_S) * (in_flight[ib] + 1)
        return ia if load_a <= load_b else ib

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """The cost estimate is updated by the view's owner (`ClusterView.on_complete`), not here."""
