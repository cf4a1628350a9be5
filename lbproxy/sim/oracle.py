"""The shortest-expected-delay oracle with TRUE service rates: the yardstick the DQN is judged by.

SED (Banawan & Zahorjan) sends a request to argmin (in_flight + 1) / rate. Live, `sed` estimates the
rates from completions; here the simulator hands over the true ones (workers / current mean service
time for the request's class, slowdowns included, 0 while crashed), so the oracle knows everything
a routing policy could learn from observation. It is also the definition of decision accuracy
(observe.is_accurate), so the oracle's accuracy is 1.0 by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lbproxy.observe import ClusterView, Outcome
from lbproxy.policy import NoBackendAvailable

if TYPE_CHECKING:
    from lbproxy.sim.engine import Simulator


class SedOracle:
    """Policy over a Simulator's true rates; construct it for the Simulator it will route in."""

    name = "sed_oracle"

    def __init__(self, sim: Simulator) -> None:
        self._rates = sim.true_rates  # live [class][server] lists, updated by the simulator in place
        self._turn = 0

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        m = len(cands)
        if m == 0:
            raise NoBackendAvailable("no backend is available")
        rate = self._rates[req_class]
        in_flight = view.in_flight
        # Ties (an idle homogeneous cluster) rotate instead of always going to the lowest index, so the
        # oracle's load spread (Gini) is not an artefact of tie-breaking.
        off = self._turn % m
        self._turn += 1
        best = float("inf")
        pick = cands[off]
        for k in range(m):
            j = cands[(off + k) % m]
            r = rate[j]
            if r > 0.0:
                d = (in_flight[j] + 1) / r
                if d < best:
                    best, pick = d, j
        return pick

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """The oracle learns nothing: it already knows the rates."""
