"""Shortest expected delay from live estimates.

Weinrib & Shenker, "Greed is not enough: adaptive load sharing in large heterogeneous systems"
(INFOCOM 1988); the LVS `sed` scheduler (net/netfilter/ipvs/ip_vs_sed.c) uses the same rule with
configured weights: send to argmin (active + 1) / weight. Here the weight is the live estimate for the
request's class, `view.class_rate[c][i]` = observed concurrency / smoothed service time of the class,
so a backend that slows down, or is slow for one kind of request only, loses that traffic without
reconfiguration. It is the same rule, with the same tie tolerance, as the accuracy
oracle `observe.sed_choices`, which makes this heuristic the reference the DQN is scored against.
"""

from __future__ import annotations

import math

from lbproxy.observe import ClusterView, Outcome
from lbproxy.policies.base import SeededPolicy
from lbproxy.policy import NoBackendAvailable

_TIE_REL = 1e-9
"""Relative tolerance for ties; the same as `observe.sed_choices` so the choice is always one of its."""
_LO = 1 - _TIE_REL
_HI = 1 + _TIE_REL


class ShortestExpectedDelay(SeededPolicy):
    """argmin over candidates of (in_flight + 1) / class_rate, uniform random tie-break."""

    name = "sed"

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        in_flight = view.in_flight
        rates = view.class_rate[req_class]
        best = -1
        lo_bound = math.inf  # d must be below this to become the new best: best_d * (1 - tol)
        hi_bound = math.inf  # ... and at most this to tie with it: best_d * (1 + tol)
        ties = 0
        for i in cands:
            rate = rates[i]
            d = (in_flight[i] + 1) / rate if rate > 0 else math.inf
            if d < lo_bound:
                best, lo_bound, hi_bound, ties = i, d * _LO, d * _HI, 1
            elif d <= hi_bound:
                ties += 1
                if ties == 1 or self._random() * ties < 1.0:  # reservoir: each tie kept with prob 1/ties
                    best = i
        return best

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """The service-time estimate is updated by the view's owner (`ClusterView.on_complete`)."""
