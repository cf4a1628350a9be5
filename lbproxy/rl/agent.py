"""The DQN as a simulator Policy (`lbproxy.policies.base.Policy`, name "dqn").

The simulator calls `choose` for each arrival and `observe` for each completion (after
`view.on_complete`, so the view `observe` sees is the state right after the request left: s').
`choose` encodes the state, picks an epsilon-greedy masked argmax and remembers (s, a, class) under
its own choose counter, which equals the simulator's `outcome.decision_id` (both count choose calls
from 0 over the simulator's lifetime). `observe` joins the outcome with that record, computes the
reward with `observe.reward`, pushes the transition and runs learner updates at
`cfg.updates_per_decision`.

Decision forward: the NumPy arithmetic of rl/network.py (`greedy_action`: one RowScorer over the
view's own rows; padding rows are never scored) on a NumPy copy of the learner's weights, refreshed
after each completion that ran updates (~10k parameters, a few tens of µs, once per ~10 decisions at
the default update ratio). NumPy because a batch-1 torch forward costs several times more.
"""

from __future__ import annotations

import math
import random
from typing import Any, cast

import numpy as np
import torch

from lbproxy.observe import (
    LEARNING_WIDTH_MIN,
    ROW_FEATURES,
    ClusterView,
    Outcome,
    action_mask,
    encode_state,
    feature_dim,
    reward,
    state_width,
)
from lbproxy.policies.base import NoBackendAvailable
from lbproxy.rl.learner import DqnConfig, Learner
from lbproxy.rl.network import NumpyWeights, RowScorer
from lbproxy.rl.replay import ReplayBuffer, rng_state_from_primitives, rng_state_to_primitives
from lbproxy.rl.schedule import EpsilonSchedule

__all__ = ["DqnAgent", "EpsilonSchedule", "GreedyDqn", "greedy_action"]


def greedy_action(weights: NumpyWeights, state: np.ndarray, view: ClusterView) -> int:
    """The candidate with the highest score in `state` (the view's own encoding). The one greedy
    choice of the simulator side: the training agent and evaluation both call it."""
    n = view.n
    rows = state[: n * ROW_FEATURES].reshape(n, ROW_FEATURES)
    ctx = state[state_width(state.shape[0]) * ROW_FEATURES :]
    scores = RowScorer(weights, rows, ctx).scores(rows).tolist()
    cands = view.candidates
    best = cands[0]
    best_q = scores[best]
    for i in cands:  # masked argmax over the (few) candidates; cheaper than building a mask
        if scores[i] > best_q:
            best, best_q = i, scores[i]
    return best


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
        self.obs_dim = feature_dim(width)
        self.schedule = EpsilonSchedule.for_training(cfg.eps_start, cfg.eps_end, cfg.eps_fraction, total_decisions)
        self.decisions = 0
        """choose() calls so far, i.e. the next decision id. It must equal the simulator's next
        `outcome.decision_id`: when a new Simulator is paired with a running agent, set
        `agent.decisions = sim.decisions` (outcomes that match no record are counted in `dropped`)."""
        self.eps_step = 0
        """Position on the epsilon schedule (separate from `decisions` so a resumed run can continue it)."""
        self.transitions = 0
        self.dropped = 0
        """Outcomes whose decision id had no record (e.g. an agent swapped in mid-run)."""
        self.last_loss = math.nan
        self._update_credit = 0.0
        self._pending: dict[int, tuple[np.ndarray, int, int]] = {}  # decision id -> (state, action, class)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._weights = self._fresh_weights()
        self._mask = np.zeros(width, dtype=bool)
        self._no_state = np.zeros(self.obs_dim, dtype=np.float32)
        self._no_mask = np.zeros(width, dtype=bool)
        # A buffer smaller than learning_starts would never start learning: start when it is full.
        self._learning_starts = max(1, min(cfg.learning_starts, replay.capacity))

    def _fresh_weights(self) -> NumpyWeights:
        return NumpyWeights.from_state_dict(self.learner.online.state_dict())

    @property
    def epsilon(self) -> float:
        return self.schedule.value(self.eps_step)

    # --- Policy protocol -------------------------------------------------------------------------
    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        did = self.decisions
        self.decisions = did + 1
        state = encode_state(view, req_class, now_s, self.width)  # fresh: kept in the pending record
        eps = self.schedule.value(self.eps_step)
        self.eps_step += 1
        if self._rng.random() < eps:
            action = cands[int(self._rng.integers(len(cands)))]
        else:
            action = greedy_action(self._weights, state, view)
        self._pending[did] = (state, action, int(req_class))
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        rec = self._pending.pop(outcome.decision_id, None)
        if rec is None:
            self.dropped += 1
            return
        state, action, req_class = rec
        r = reward(outcome.latency_s, outcome.error, view.typical_all_s, self.cfg.error_penalty)
        if self.cfg.gamma > 0.0:
            next_state = encode_state(view, req_class, now_s, self.width)
            next_mask = action_mask(view, self.width, out=self._mask)
        else:  # no bootstrap: s' is never read (an empty mask also tells the learner so)
            next_state, next_mask = self._no_state, self._no_mask
        self.replay.add(state, action, r, next_state, next_mask, False)
        self.transitions += 1
        if len(self.replay) < self._learning_starts:
            return
        self._update_credit += self.cfg.updates_per_decision
        updated = False
        while self._update_credit >= 1.0:
            self._update_credit -= 1.0
            batch = self.replay.sample(self.cfg.batch_size, self.learner.device)
            self.last_loss = self.learner.update(batch)
            updated = True
        if updated:  # a fresh NumPy copy (~10k parameters) after the updates of this completion
            self._weights = self._fresh_weights()

    # --- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, epsilon step, pending records and RNG states (own, Python, NumPy and torch
        global). The learner and the replay buffer have their own state_dicts: save all three for an
        exact resume."""
        ids = sorted(self._pending)
        states = np.stack([self._pending[i][0] for i in ids]) if ids else np.zeros((0, self.obs_dim), np.float32)
        np_global = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
        py_version, py_internal, py_gauss = random.getstate()
        return {
            "decisions": self.decisions,
            "eps_step": self.eps_step,
            "transitions": self.transitions,
            "dropped": self.dropped,
            "last_loss": self.last_loss,
            "update_credit": self._update_credit,
            "pending_ids": torch.tensor(ids, dtype=torch.int64),
            "pending_states": torch.from_numpy(states),
            "pending_actions": torch.tensor([self._pending[i][1] for i in ids], dtype=torch.int64),
            "pending_classes": torch.tensor([self._pending[i][2] for i in ids], dtype=torch.int64),
            "rng": rng_state_to_primitives(self._rng),
            "torch_rng": torch.get_rng_state(),
            "python_rng": [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss],
            "numpy_rng": [
                str(np_global[0]),
                torch.from_numpy(np_global[1].astype(np.int64)),
                int(np_global[2]),
                int(np_global[3]),
                float(np_global[4]),
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after `learner.load_state_dict` (on CUDA the host weight copy is refreshed here)."""
        self.decisions = int(state["decisions"])
        self.eps_step = int(state["eps_step"])
        self.transitions = int(state["transitions"])
        self.dropped = int(state["dropped"])
        self.last_loss = float(state["last_loss"])
        self._update_credit = float(state["update_credit"])
        states = state["pending_states"].numpy()
        ids, actions = state["pending_ids"].tolist(), state["pending_actions"].tolist()
        classes = state["pending_classes"].tolist()
        self._pending = {
            int(i): (states[k].copy(), int(a), int(c))
            for k, (i, a, c) in enumerate(zip(ids, actions, classes, strict=True))
        }
        rng_state_from_primitives(self._rng, state["rng"])
        torch.set_rng_state(state["torch_rng"])
        py_version, py_internal, py_gauss = state["python_rng"]
        random.setstate((int(py_version), tuple(int(v) for v in py_internal.tolist()), py_gauss))
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        self._weights = self._fresh_weights()
