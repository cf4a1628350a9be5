"""Power of two choices on in-flight requests.

Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (IEEE TPDS 2001): sampling two
servers and taking the less loaded cuts the maximum queue from O(log n / log log n) to
O(log log n). Envoy's LEAST_REQUEST balancer does exactly this with its default `choice_count` = 2
(source/common/upstream/load_balancer_impl.cc). When host weights differ Envoy scores hosts by
`weight / (active_requests + 1) ** active_request_bias` (bias default 1.0); comparing
`(in_flight + 1) / capacity` is the same order, and with equal capacities it is plain in-flight.

Sampling (`policies/base.two_distinct`, shared with peak_ewma; tests/test_policies.py recomputes it
from a twin `random.Random(seed)`): two distinct, uniformly chosen positions in `candidates`.
"""

from __future__ import annotations

from lbproxy.observe import ClusterView, Outcome
from lbproxy.policies.base import SeededPolicy, sole_candidate, two_distinct


class PowerOfTwoChoices(SeededPolicy):
    """Better of two distinct random candidates by (in_flight + 1) / capacity; ties go to the first."""

    name = "p2c"

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if len(cands) <= 1:
            return sole_candidate(cands)
        ia, ib = two_distinct(cands, self._random)
        in_flight = view.in_flight
        capacity = view.capacity
        # (fa + 1) / ca <= (fb + 1) / cb, cross-multiplied to avoid two divisions.
        if (in_flight[ia] + 1) * capacity[ib] <= (in_flight[ib] + 1) * capacity[ia]:
            return ia
        return ib

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """P2C reads in-flight counts from the view; outcomes are not needed."""
