"""Uniform random choice: the load-blind baseline (HAProxy/Envoy `random`)."""

from __future__ import annotations

from lbproxy.observe import ClusterView, Outcome
from lbproxy.policies.base import SeededPolicy
from lbproxy.policy import NoBackendAvailable


class RandomChoice(SeededPolicy):
    """Each candidate with probability 1/len(candidates), from a seeded `random.Random`."""

    name = "random"

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        k = len(cands)
        if k == 0:
            raise NoBackendAvailable("no backend is available")
        return cands[int(self._random() * k)]

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Random choice ignores outcomes."""
