"""The masked argmax and the ε-greedy rule (rl/action_selection.py)."""

from __future__ import annotations

import numpy as np
import torch

from lbproxy.rl.action_selection import EpsilonGreedy, best_candidate, masked_argmax
from lbproxy.rl.schedule import EpsilonSchedule


def test_best_candidate_is_the_masked_argmax_with_ties_to_the_lowest_slot() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 12))
        scores = rng.integers(0, 4, n).astype(np.float32)  # many ties
        mask = rng.random(n) < 0.7
        if not mask.any():
            mask[int(rng.integers(n))] = True
        cands = [i for i in range(n) if mask[i]]
        expected = int(masked_argmax(torch.from_numpy(scores)[None], torch.from_numpy(mask)[None])[0])
        assert best_candidate(scores, cands) == expected
        masked = np.where(mask, scores, -np.inf)  # the live scheduler's scores: -inf off the candidates
        assert best_candidate(masked, cands) == expected


def test_epsilon_greedy_follows_its_schedule_and_draws_only_while_epsilon_is_positive() -> None:
    draws: list[float] = []

    def random() -> float:
        draws.append(0.5)
        return 0.5

    eg = EpsilonGreedy(EpsilonSchedule(1.0, 0.0, 4), random)
    explored = []
    for _ in range(6):
        explored.append(eg.explores())
        eg.advance()
    assert explored == [True, True, False, False, False, False]  # eps 1, .75, .5, .25, 0, 0 vs a 0.5 draw
    assert len(draws) == 4, "no draw once epsilon is 0"
    resumed = EpsilonGreedy(EpsilonSchedule(1.0, 0.0, 4), random)
    resumed.restore(2)
    assert (resumed.step, resumed.epsilon) == (2, 0.5)
