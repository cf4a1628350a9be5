"""The DQN as a simulator Policy (`lbproxy.policy.Policy`, name "dqn").

The simulator calls `choose` for each arrival and `observe` for each completion (after
`view.on_complete`, so the view `observe` sees is the state right after the request left: s').
`choose` encodes the state, explores or takes the greedy masked argmax (rl/action_selection.py) and
records the decision in the reward join (rl/reward_join.py) under its own choose counter, which
equals the simulator's `outcome.decision_id` (both count choose calls from 0 over the simulator's
lifetime). `observe` joins the outcome, hands the transition to the replay buffer and runs the
updates the pacer (rl/update_pacer.py) says are owed: the same three mechanisms the live policy and
its learner use.

Decision forward: the NumPy arithmetic of rl/network.py (`greedy_action`: one RowScorer over the
view's own rows; padding rows are never scored) on a NumPy copy of the learner's weights, refreshed
after each completion that ran updates (~10k parameters, a few tens of µs, once per ~10 decisions at
the default update ratio). NumPy because a batch-1 torch forward costs several times more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lbproxy.observe import (
    LEARNING_WIDTH_MIN,
    ROW_FEATURES,
    ClusterView,
    Outcome,
    encode_state,
    feature_dim,
    state_width,
)
from lbproxy.policy import NoBackendAvailable
from lbproxy.rl.action_selection import EpsilonGreedy, best_candidate
from lbproxy.rl.learner import DqnConfig, Learner
from lbproxy.rl.network import NumpyWeights, RowScorer
from lbproxy.rl.replay import ReplayBuffer, rng_state_from_primitives, rng_state_to_primitives
from lbproxy.rl.reward_join import DecisionTable, RewardJoin
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.rl.update_pacer import UpdatePacer

__all__ = ["DqnAgent", "GreedyDqn", "greedy_action"]


def greedy_action(weights: NumpyWeights, state: np.ndarray, view: ClusterView) -> int:
    """The candidate with the highest score in `state` (the view's own encoding). The one greedy
    choice of the simulator side: the training agent and evaluation both call it."""
    n = view.n
    rows = state[: n * ROW_FEATURES].reshape(n, ROW_FEATURES)
    ctx = state[state_width(state.shape[0]) * ROW_FEATURES :]
    return best_candidate(RowScorer(weights, rows, ctx).scores(rows), view.candidates)


class GreedyDqn:
    """A trained network as a simulator Policy: greedy, nothing learned (evaluation)."""

    name = "dqn"

    def __init__(self, weights: NumpyWeights, width: int = LEARNING_WIDTH_MIN) -> None:
        self.weights = weights
        self.width = width
        self._state = np.zeros(feature_dim(width), dtype=np.float32)

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        if not view.candidates:
            raise NoBackendAvailable("no backend is available")
        return greedy_action(self.weights, encode_state(view, req_class, now_s, self.width, out=self._state), view)

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Greedy evaluation learns nothing."""


class DqnAgent:
    """Epsilon-greedy DQN policy that learns from its own outcomes (simulator training)."""

    name = "dqn"

    def __init__(
        self,
        learner: Learner,
        replay: ReplayBuffer,
        cfg: DqnConfig,
        *,
        total_decisions: int,
        seed: int,
        width: int = LEARNING_WIDTH_MIN,
    ) -> None:
        self.learner = learner
        self.replay = replay
        self.cfg = cfg
        self.width = width
        """Rows of every state it encodes (the replay buffer's width): at least the cluster's size."""
        self.decisions = 0
        """choose() calls so far, i.e. the next decision id. It must equal the simulator's next
        `outcome.decision_id` (the trainer shifts each episode's ids to the agent's numbering);
        outcomes that match no record are counted in `dropped`."""
        self.transitions = 0
        self.dropped = 0
        """Outcomes whose decision id had no record (e.g. an agent swapped in mid-run)."""
        self.last_loss = math.nan
        self._rng = np.random.Generator(np.random.PCG64(seed))
        schedule = EpsilonSchedule.for_training(cfg.eps_start, cfg.eps_end, cfg.eps_fraction, total_decisions)
        self.explorer = EpsilonGreedy(schedule, self._rng.random)
        # The simulator reports every completion (it drains each episode): no record expires.
        self.join = RewardJoin(
            width,
            cfg.error_penalty,
            bootstrap=cfg.gamma > 0.0,
            sink=replay.add_batch,
            table=DecisionTable(ttl_s=math.inf),
        )
        self.pacer = UpdatePacer(
            cfg.updates_per_decision, cfg.learning_starts, batch_size=cfg.batch_size, capacity=replay.capacity
        )
        self._weights = self._fresh_weights()

    def _fresh_weights(self) -> NumpyWeights:
        return NumpyWeights.from_state_dict(self.learner.online.state_dict())

    @property
    def epsilon(self) -> float:
        return self.explorer.epsilon

    # --- Policy protocol -------------------------------------------------------------------------
    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        did = self.decisions
        self.decisions = did + 1
        state = encode_state(view, req_class, now_s, self.width)  # fresh: kept in the decision record
        if self.explorer.explores():
            action = cands[int(self._rng.integers(len(cands)))]
        else:
            action = greedy_action(self._weights, state, view)
        self.explorer.advance()
        self.join.record(did, state, action, int(req_class), now_s)
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        if self.join.join(outcome, view) is None:
            self.dropped += 1
            return
        self.join.flush(view, now_s)
        self.transitions += 1
        owed = self.pacer.owed(self.transitions, len(self.replay))
        for _ in range(owed):
            batch = self.replay.sample(self.cfg.batch_size, self.learner.device)
            self.last_loss = self.learner.update(batch)
            self.pacer.ran()
        if owed:  # a fresh NumPy copy (~10k parameters) after the updates of this completion
            self._weights = self._fresh_weights()

    # --- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, epsilon step, update debt, pending records and the agent's own RNG. The learner
        and the replay buffer have their own state_dicts, the global RNGs are the trainer's (saved
        once per checkpoint, train/run_dir.py): save them all for an exact resume."""
        return {
            "decisions": self.decisions,
            "eps_step": self.explorer.step,
            "transitions": self.transitions,
            "dropped": self.dropped,
            "last_loss": self.last_loss,
            "pacer": self.pacer.state_dict(),
            **self.join.state_dict(),
            "rng": rng_state_to_primitives(self._rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after `learner.load_state_dict` (on CUDA the host weight copy is refreshed here)."""
        self.decisions = int(state["decisions"])
        self.explorer.restore(int(state["eps_step"]))
        self.transitions = int(state["transitions"])
        self.dropped = int(state["dropped"])
        self.last_loss = float(state["last_loss"])
        self.pacer.load_state_dict(state["pacer"])
        self.join.load_state_dict(state)
        rng_state_from_primitives(self._rng, state["rng"])
        self._weights = self._fresh_weights()
