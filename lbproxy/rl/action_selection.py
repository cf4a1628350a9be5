"""How the DQN picks a backend, for every caller: the masked argmax and the ε-greedy rule.

The masked argmax (DESIGN.md §4: invalid actions never win) has one implementation per array kind:
:func:`masked_argmax` over torch Q-values (the learner's Double-DQN a'), :func:`best_candidate` over
one state's NumPy scores (the simulator agent, evaluation and the live policy). Both break ties
towards the lowest slot, as `argmax` does.

:class:`EpsilonGreedy` decides WHEN a decision explores: ε from a schedule over the decisions taken,
one uniform draw per decision while ε > 0. WHAT an exploring decision picks is the caller's: the
simulator agent a uniformly random candidate, the live policy the fallback heuristic's choice (safe
exploration, policies/dqn.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lbproxy.rl.schedule import EpsilonSchedule


def masked_argmax(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax over the valid actions only (invalid -> -inf)."""
    return q.masked_fill(~mask, float("-inf")).argmax(dim=-1)


def best_candidate(scores: np.ndarray, candidates: Sequence[int]) -> int:
    """The candidate with the highest score: the masked argmax of one state. `scores` has one entry
    per slot (slots off `candidates` may hold anything, -inf included); `candidates` is ascending, as
    `ClusterView.candidates` is. With every slot a candidate (the common case) this is one argmax;
    otherwise a loop over the few candidates, cheaper than building a mask."""
    if len(candidates) == len(scores):
        return int(scores.argmax())
    q = scores.tolist()
    best = candidates[0]
    best_q = q[best]
    for i in candidates:
        if q[i] > best_q:
            best, best_q = i, q[i]
    return best


class EpsilonGreedy:
    """When to explore: ε for the next decision is `schedule` at `step`.

    Per decision: `explores()` (one draw from `random`, none while ε = 0), then `advance()` once the
    decision is taken. `step` is what a checkpoint saves to resume the schedule where it was.
    """

    __slots__ = ("_random", "epsilon", "schedule", "step")

    def __init__(self, schedule: EpsilonSchedule, random: Callable[[], float], step: int = 0) -> None:
        self.schedule = schedule
        self._random = random
        self.step = step
        self.epsilon = schedule.value(step)

    def explores(self) -> bool:
        eps = self.epsilon
        return eps > 0.0 and self._random() < eps

    def advance(self) -> None:
        self.step += 1
        self.epsilon = self.schedule.value(self.step)

    def restore(self, step: int) -> None:
        """Continue the schedule at `step` (a resumed run)."""
        self.step = step
        self.epsilon = self.schedule.value(step)
