"""C3 replica ranking: response time plus a cubic penalty on the estimated queue.

Suresh et al., "C3: Cutting Tail Latency in Cloud Data Stores via Adaptive Replica Selection"
(NSDI 2015). Each client ranks server s by

    Psi_s = R_s - 1/mu_s + q_s ** 3 / mu_s,    q_s = 1 + os_s * n + qbar_s

and sends to the lowest: R_s the EWMA of response times the client sees, 1/mu_s the EWMA of the
service time the server reports, os_s the client's outstanding requests to s, n the number of
clients, qbar_s the EWMA of the queue length the server reports. The cube (the paper's b = 3) is the
point: a linear queue term lets a fast server collect a long queue before a slower idle one looks
better, and the tail pays for that queue; the cube makes queue length dominate early.

Mapping onto this proxy:
- R_s: the per-class latency EWMA of the request's class (`view.class_latency_s[req_class]`): the
  response time this client sees for requests like this one (C3 itself has no classes).
- 1/mu_s: `view.service_time_s`, the service-time EWMA over all classes (backend-reported; exact per
  request in the simulator). One estimate for both terms, as in the paper: the queue ahead of a
  request holds every class, so its drain time is paced by the all-class service time. (Per-class
  service times, tried in the simulator, helped class_skew and hurt heterogeneous, bursty, failure.)
- os_s: `view.in_flight`; n = 1 (`CLIENTS`): this proxy is the only client it knows of. C3's n
  scales os_s up to account for the other clients' requests it cannot see; here none are known.
- qbar_s = 0: no backend reports its queue. The one a server would report is made of this proxy's
  requests, which os_s already counts exactly and without delay; adding an estimate of the same
  requests (e.g. in-flight beyond the observed concurrency) would count them twice.
- The paper's client-side EWMAs are the view's (lbproxy/observe/view.py), shared with every policy.
- Ties (equal Psi, e.g. idle backends before any completion): uniform random, seeded.

Cost per decision: one Python pass over the candidates, ~0.6 µs at 4 backends, ~2.1 µs at 16,
~8 µs at 64 (least_conn in the same run: 0.4, 0.9, 3.0 µs; timeit, 2026-12-01, shared 2-core machine).

Out of scope: C3's distributed rate control (a cubic send-rate limiter per server, with
backpressure queues). It decides when a request may leave the client, not which replica gets it,
so it is not a replica-selection rule and has no place in a Policy.
"""

from __future__ import annotations

import math

from lbproxy.observe import ClusterView, Outcome
from lbproxy.policies.base import SeededPolicy
from lbproxy.policy import NoBackendAvailable

CLIENTS = 1
"""n in q_s = 1 + os_s * n + qbar_s: the proxy knows of no other client of its backends."""


class C3(SeededPolicy):
    """argmin over candidates of R - s + (1 + in_flight * n) ** 3 * s, uniform random tie-break."""

    name = "c3"

    def __init__(self, seed: int = 0, clients: int = CLIENTS) -> None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        super().__init__(seed)
        self.clients = clients

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        in_flight = view.in_flight
        response = view.class_latency_s[req_class]
        service = view.service_time_s
        n = self.clients
        best = cands[0]  # kept only if every Psi is inf or NaN (no estimate is finite)
        best_psi = math.inf
        ties = 0
        for i in cands:
            q = 1 + in_flight[i] * n  # qbar = 0, see the module docstring
            psi = response[i] + service[i] * (q * q * q - 1)  # R - 1/mu + q^3/mu, one product fewer
            if psi < best_psi:
                best, best_psi, ties = i, psi, 1
            elif psi == best_psi:
                ties += 1
                if self._random() * ties < 1.0:  # reservoir: each tied candidate kept with probability 1/ties
                    best = i
        return best

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """The estimates C3 reads are kept by the view's owner (`ClusterView.on_complete`)."""
