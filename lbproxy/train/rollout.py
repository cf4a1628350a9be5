"""Training episodes simulated away from the learner, and the learner's side of them: the work of the Ray
trainer's rollout tasks (train/ray_sim.py), kept free of Ray so that it reads, and tests, on its own.

Rollout side, :func:`rollout_episode` (the task) and :class:`RolloutWorker`: episode `ep` is the
single-process trainer's episode `ep` (same scenario, simulator seed and phase:
`train.curriculum.run_training_episode`), routed by a DqnAgent with learning switched off, acting on the
weights it was handed (frozen for the episode). The agent's own code path does everything else:
ε-greedy with the run's schedule at the episode's decisions (it starts at decision
`ep * episode_decisions`, where the single-process agent would be), the reward join and s'
(rl/reward_join.py), into a ReplayBuffer local to the episode that is never sampled. What the episode
learned from is returned as arrays (:class:`EpisodeRollout`), in the order the join produced them. The
agent's RNG (exploration draws, random candidates) is seeded from (seed, ep), so an episode is a pure
function of (settings, ep, weights): what makes the Ray trainer's resume exact, and a retried task
(Ray reruns one whose worker died) return what the first try would have.

Learner side, :class:`TransitionFeed`: the transitions go into the learner's replay one at a time, in
episode order, each followed by the updates the pacer (rl/update_pacer.py) says are owed: the same
ratio, `learning_starts` and debt rule as the single-process agent, whose updates follow each
completion the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch

from lbproxy.config import Settings
from lbproxy.observe import WindowSummary, feature_dim
from lbproxy.rl.agent import DqnAgent
from lbproxy.rl.learner import DqnConfig, Learner
from lbproxy.rl.replay import ReplayBuffer, TransitionBatch
from lbproxy.rl.update_pacer import UpdatePacer
from lbproxy.train.curriculum import resolve_training_set, run_training_episode


class EpisodeRollout(NamedTuple):
    """One simulated training episode, as a rollout task returns it to the learner."""

    episode: int
    phase: int
    summary: WindowSummary
    transitions: TransitionBatch
    """k rows each (`next_obs`, `next_mask` too), in the order the reward join produced them."""
    dropped: int
    """Outcomes that matched no decision record (the agent's `dropped`; 0 in the simulator)."""


def episode_seed(seed: int, episode: int) -> int:
    """The seed of the rollout agent's RNG in episode `episode` of a run seeded `seed`."""
    return int(np.random.SeedSequence((seed, episode)).generate_state(1, np.uint64)[0])


class RolloutWorker:
    """Runs training episodes of a run with the weights it is given, learning nothing."""

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(1)  # a Ray task holds one CPU (num_cpus=1); the forward pass is NumPy anyway
        self.settings = settings
        self.train_set = resolve_training_set(settings)
        self.episodes = settings.resolved_episodes()
        # Learning switched off: an episode's replay holds one more row than the episode can fill, and
        # learning would start only once it is full (the pacer never owes an update).
        rows = settings.episode_decisions + 1
        self.cfg = dataclasses.replace(DqnConfig.from_settings(settings), buffer_size=rows, learning_starts=rows)
        self.learner = Learner(self.cfg, device="cpu")

    def run(self, ep: int, weights: dict[str, torch.Tensor]) -> EpisodeRollout:
        """Episode `ep` acting on `weights` (an online network's state_dict)."""
        s, width = self.settings, self.train_set.width
        self.learner.online.load_state_dict(weights)
        replay = ReplayBuffer(self.cfg.buffer_size, feature_dim(width), width)
        agent = DqnAgent(  # built after the weights are loaded: it acts on a NumPy copy of them
            self.learner,
            replay,
            self.cfg,
            total_decisions=self.episodes * s.episode_decisions,
            seed=episode_seed(s.seed, ep),
            width=width,
        )
        first = ep * s.episode_decisions  # where the single-process agent's counters are at this episode
        agent.decisions = first
        agent.explorer.restore(first)
        phase, summary = run_training_episode(agent, s, self.train_set, self.episodes, ep)
        n = len(replay)
        batch = TransitionBatch(
            replay.obs[:n].copy(),
            replay.actions[:n].tolist(),
            replay.rewards[:n].tolist(),  # float32 -> float -> float32: exact
            replay.next_obs[:n].copy(),
            replay.next_mask[:n].copy(),
        )
        return EpisodeRollout(ep, phase, summary, batch, agent.dropped)


_WORKERS: dict[str, RolloutWorker] = {}
"""This process's RolloutWorker, under its run's settings (as JSON): built by a run's first episode."""


def rollout_episode(settings: Settings, ep: int, weights: dict[str, torch.Tensor]) -> EpisodeRollout:
    """Episode `ep` of the run `settings` describes, acting on `weights`: the Ray task. A Ray worker
    process runs many (it is reused from task to task), and builds the run's RolloutWorker once."""
    key = settings.model_dump_json()
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()
        worker = _WORKERS[key] = RolloutWorker(settings)
    return worker.run(ep, weights)


class TransitionFeed:
    """The learner's side: transitions simulated elsewhere into the replay, with the owed updates."""

    def __init__(self, learner: Learner, replay: ReplayBuffer, cfg: DqnConfig) -> None:
        self.learner = learner
        self.replay = replay
        self.batch_size = cfg.batch_size
        self.pacer = UpdatePacer(
            cfg.updates_per_decision, cfg.learning_starts, batch_size=cfg.batch_size, capacity=replay.capacity
        )
        self.transitions = 0
        self.dropped = 0
        self.last_loss = float("nan")

    def learn(self, rollout: EpisodeRollout) -> None:
        obs, actions, rewards, next_obs, next_mask = rollout.transitions
        learner, replay, pacer = self.learner, self.replay, self.pacer
        for i in range(obs.shape[0]):
            j = slice(i, i + 1)
            replay.add_batch(TransitionBatch(obs[j], actions[j], rewards[j], next_obs[j], next_mask[j]))
            self.transitions += 1
            for _ in range(pacer.owed(self.transitions, len(replay))):
                self.last_loss = learner.update(replay.sample(self.batch_size, learner.device))
                pacer.ran()
        self.dropped += rollout.dropped

    def state_dict(self) -> dict[str, Any]:
        return {
            "transitions": self.transitions,
            "dropped": self.dropped,
            "last_loss": self.last_loss,
            "pacer": self.pacer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.transitions = int(state["transitions"])
        self.dropped = int(state["dropped"])
        self.last_loss = float(state["last_loss"])
        self.pacer.load_state_dict(state["pacer"])
