"""Smooth weighted round robin: nginx's algorithm (ngx_http_upstream_get_peer in
src/http/ngx_http_upstream_round_robin.c, Maxim Dounin 2012).

Every decision adds each candidate's weight to its running `current` value, picks the largest, and
subtracts the total weight from the winner. Over a cycle of sum(weights) decisions every backend is
chosen exactly weight times, interleaved (5,1,1 gives a a b a c a a, not a a a a a b c). Weights are
`view.capacity`; with equal weights the choice is plain rotation, which takes a fast path.
"""

from __future__ import annotations

from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome
from lbproxy.policy import NoBackendAvailable


class RoundRobin:
    """nginx smooth weighted round robin over `view.candidates`, weights `view.capacity`.

    Candidate-set changes (ejection, recovery, the proxy's retry mask) are noticed by the identity of
    the `candidates` and `capacity` lists, which ClusterView and the pool replace on every change
    rather than mutating them in place (weights are cached per candidate set). Like nginx, a backend
    that leaves keeps its `current` value frozen; on every change the present candidates' values are
    shifted to sum to zero, which keeps them bounded and preserves who is "owed" a turn, so nobody
    starves.
    A backend with capacity <= 0 gets no turns unless every candidate has capacity <= 0.
    """

    name = "round_robin"

    def __init__(self, seed: int = 0) -> None:
        # The seed is unused (the algorithm is deterministic); accepted so every heuristic builds alike.
        self._current: list[float] = [0.0] * MAX_BACKENDS
        self._candidates: list[int] | None = None
        self._capacity: list[float] | None = None
        self._weights: list[float] = [1.0] * MAX_BACKENDS
        self._total = 0.0
        self._equal = True
        self._next = 0

    def _resync(self, view: ClusterView) -> None:
        """Recompute cached weights after a candidate-set change; rare (health events and retries)."""
        cands = view.candidates
        cap = view.capacity
        self._candidates = cands
        self._capacity = cap
        if len(self._current) < view.n:
            self._current.extend([0.0] * (view.n - len(self._current)))
            self._weights.extend([1.0] * (view.n - len(self._weights)))
        weights = [cap[i] if cap[i] > 0.0 else 0.0 for i in cands]
        if cands and sum(weights) <= 0.0:
            weights = [1.0] * len(cands)
        for i, w in zip(cands, weights, strict=True):
            self._weights[i] = w
        self._total = sum(weights)
        self._equal = len(set(weights)) <= 1
        if cands:
            shift = sum(self._current[i] for i in cands) / len(cands)
            for i in cands:
                self._current[i] -= shift

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if cands is not self._candidates or view.capacity is not self._capacity:
            self._resync(view)
        k = len(cands)
        if k == 0:
            raise NoBackendAvailable("no backend is available")
        if self._equal:
            j = self._next
            if j >= k:
                j = 0
            self._next = j + 1
            return cands[j]
        current = self._current
        weights = self._weights
        best = -1
        best_value = 0.0
        for i in cands:
            v = current[i] + weights[i]
            current[i] = v
            if best < 0 or v > best_value:  # strict: ties go to the earlier candidate, as in nginx
                best = i
                best_value = v
        current[best] = best_value - self._total
        return best

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Round robin ignores outcomes."""
