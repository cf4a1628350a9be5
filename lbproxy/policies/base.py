"""What the heuristic policies share: their own seeded generator, the rule for a candidate list of at
most one backend, and the two-choice sampling of p2c and peak_ewma.

Each randomised policy owns a `random.Random(seed)`, so a seed reproduces its choices whatever else
draws random numbers, and draws through the bound `self._random` (one attribute read per draw on the
hot path): `int(random() * k)` instead of `randrange(k)` is ~3x cheaper and uniform to within 2**-53.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lbproxy.policy import NoBackendAvailable


class SeededPolicy:
    """Base of the heuristics that break ties or sample at random: `rng` and its bound `_random`."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self._random = self.rng.random


def sole_candidate(cands: list[int]) -> int:
    """The choice when at most one backend is a candidate: that one; none raises NoBackendAvailable.
    Called only on that (cold) branch, so the per-request path pays nothing for it."""
    if not cands:
        raise NoBackendAvailable("no backend is available")
    return cands[0]


def two_distinct(cands: list[int], draw: Callable[[], float]) -> tuple[int, int]:
    """Two distinct candidates, uniformly (at least two given): positions ``a = int(r1 * k)``,
    ``b = int(r2 * (k - 1))``, ``b += b >= a``. One call per decision costs ~55 ns against writing it
    out in each policy (2-core dev machine): ~0.1 % of the ~50 us of CPU a proxied request costs
    (benchmarks/results/proxy_overhead.md), for one formula instead of two copies."""
    k = len(cands)
    a = int(draw() * k)
    b = int(draw() * (k - 1))
    if b >= a:
        b += 1
    return cands[a], cands[b]
