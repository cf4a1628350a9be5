"""The DQN as a simulator Policy (`lbproxy.policies.base.Policy`, name "dqn").

The simulator calls `choose` for each arrival and `observe` for each completion (after
`view.on_complete`, so the view `observe` sees is the state right after the request left: s').
`choose` encodes the state, picks an epsilon-greedy masked argmax and remembers (s, a, class) under
its own choose counter, which equals the simulator's `outcome.decision_id` (both count choose calls
from 0 over the simulator's lifetime). `observe` joins the outcome with that record, computes the
reward with `observe.reward`, pushes the transition and runs learner updates at
`cfg.updates_per_decision`.

Decision forward: a NumPy MLP over *views* of the learner's CPU parameters (ANCHORS.md: NumPy
batch-1 ~8 us vs torch ~25 us; benchmarks/learner_step.py measures it here). On CPU the views share
memory with the torch parameters, which Adam and `load_state_dict` update in place, so the agent
always acts with the latest weights and never copies. On CUDA the agent keeps a host copy and
refreshes it after every update (one ~100 KB device-to-host copy per update).
"""

from __future__ import annotations

import math
import random
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome, action_mask, encode_state, feature_dim, reward
from lbproxy.policies.base import NoBackendAvailable
from lbproxy.rl.learner import DqnConfig, Learner
from lbproxy.rl.network import NumpyWeights, QNetwork, numpy_q
from lbproxy.rl.replay import ReplayBuffer, rng_state_from_primitives, rng_state_to_primitives
from lbproxy.rl.schedule import EpsilonSchedule

__all__ = ["DqnAgent", "EpsilonSchedule", "NumpyQ"]


class NumpyQ:
    """Batch-1 (or batch-N) forward of a QNetwork in NumPy float32.

    `share=True` (CPU networks only) keeps views of the parameters instead of copies: zero cost to
    stay current, but the network must not be moved to another device afterwards, and nothing may
    update it from another thread while a forward runs (the live proxy's learner thread publishes
    copies instead: rl/batcher.py).
    """

    def __init__(self, net: QNetwork, share: bool) -> None:
        self.net = net
        self.share = share
        self.refresh()

    def refresh(self) -> None:
        def arr(t: torch.Tensor) -> np.ndarray:
            if self.share:
                return t.detach().numpy()
            return t.detach().to("cpu", torch.float32).numpy().copy()

        n = self.net
        lin1, lin2 = cast(nn.Linear, n.body[0]), cast(nn.Linear, n.body[2])
        # `x @ W.T` with W (out, in): the transposed view costs nothing and BLAS handles the stride.
        self.weights = NumpyWeights(
            w1=arr(lin1.weight).T,
            b1=arr(lin1.bias),
            w2=arr(lin2.weight).T,
            b2=arr(lin2.bias),
            w3=arr(n.head.weight).T,
            b3=arr(n.head.bias),
            wv=arr(n.value.weight).T if n.value is not None else None,
            bv=arr(n.value.bias) if n.value is not None else None,
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return numpy_q(self.weights, x)


class DqnAgent:
    """Epsilon-greedy DQN policy that learns from its own outcomes (train=True) or acts greedily."""

    name = "dqn"

    def __init__(
        self,
        learner: Learner,
        replay: ReplayBuffer | None,
        cfg: DqnConfig,
        *,
        train: bool,
        total_decisions: int,
        seed: int,
        max_backends: int = MAX_BACKENDS,
    ) -> None:
        if train and replay is None:
            raise ValueError("a training DqnAgent needs a ReplayBuffer")
        self.learner = learner
        self.replay = replay
        self.cfg = cfg
        self.train = train
        self.max_backends = max_backends
        self.obs_dim = feature_dim(max_backends)
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
        self._qfn = NumpyQ(learner.online, share=learner.device.type == "cpu")
        self._mask = np.zeros(max_backends, dtype=bool)
        self._state = np.zeros(self.obs_dim, dtype=np.float32)  # reused when no record is kept (greedy)
        # A buffer smaller than learning_starts would never start learning: start when it is full.
        self._learning_starts = max(1, min(cfg.learning_starts, replay.capacity if replay is not None else 1))

    @property
    def epsilon(self) -> float:
        return self.schedule.value(self.eps_step) if self.train else 0.0

    # --- Policy protocol -------------------------------------------------------------------------
    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        did = self.decisions
        self.decisions = did + 1
        if self.train:
            state = encode_state(view, req_class, self.max_backends)  # fresh: kept in the pending record
            eps = self.schedule.value(self.eps_step)
            self.eps_step += 1
            if self._rng.random() < eps:
                action = cands[int(self._rng.integers(len(cands)))]
            else:
                action = self._greedy(state, view)
            self._pending[did] = (state, action, int(req_class))
            return action
        return self._greedy(encode_state(view, req_class, self.max_backends, out=self._state), view)

    def _greedy(self, state: np.ndarray, view: ClusterView) -> int:
        q = self._qfn(state)
        cands = view.candidates
        best = cands[0]
        best_q = q[best]
        for i in cands:  # masked argmax over the (few) candidates; cheaper than building a mask
            if q[i] > best_q:
                best, best_q = i, q[i]
        return best

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        if not self.train:
            return
        rec = self._pending.pop(outcome.decision_id, None)
        if rec is None:
            self.dropped += 1
            return
        state, action, req_class = rec
        r = reward(outcome.latency_s, outcome.error, self.cfg.latency_scale_s, self.cfg.error_penalty)
        next_state = encode_state(view, req_class, self.max_backends)
        next_mask = action_mask(view, self.max_backends, out=self._mask)
        assert self.replay is not None
        self.replay.add(state, action, r, next_state, next_mask, False)
        self.transitions += 1
        if len(self.replay) < self._learning_starts:
            return
        self._update_credit += self.cfg.updates_per_decision
        while self._update_credit >= 1.0:
            self._update_credit -= 1.0
            batch = self.replay.sample(self.cfg.batch_size, self.learner.device)
            self.last_loss = self.learner.update(batch)
            if not self._qfn.share:
                self._qfn.refresh()

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
        self._qfn.refresh()
