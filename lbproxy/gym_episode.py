"""One episode of lbproxy/gym_env.py's ClusterEnv: the simulation thread and the policy that waits for `step`.

Simulator.run drives its policy (it calls `choose` for every arrival), so `ClusterEnv` runs the
episode -- the one training and evaluation run, `lbproxy.sim.episode.run_episode` -- in a helper
thread whose policy (`_EnvPolicy`) hands each decision to `step`'s caller over a `Channel` and waits
for the action. The two threads strictly take turns, nothing runs concurrently, and an episode is as
deterministic as the simulator. A masked action is routed by the proxy's fallback heuristic
(peak_ewma) and costs the error penalty; rewards are `observe.reward` per completed request.
"""

from __future__ import annotations

import dataclasses
from queue import SimpleQueue
from typing import Any, NamedTuple

import numpy as np

from lbproxy.observe import (
    MAX_BACKENDS,
    ROW_FEATURES,
    ClusterView,
    Outcome,
    WindowSummary,
    action_mask,
    encode_state,
    reward,
)
from lbproxy.policies.peak_ewma import PeakEwma
from lbproxy.policy import NoBackendAvailable
from lbproxy.sim.engine import Simulator
from lbproxy.sim.episode import run_episode
from lbproxy.sim.scenario import Scenario

Observation = dict[str, np.ndarray]


class Completion(NamedTuple):
    """A request that completed during a step (info["completed"]): which decision it was and its reward."""

    decision: int
    """The step (0-based, in its episode) that routed it."""
    backend: int
    latency_s: float
    error: bool
    reward: float
    """observe.reward of the request: what the DQN's transition for that decision carries."""


class _Aborted(Exception):
    """Raised in the simulation thread when its episode is abandoned (reset, close, garbage)."""


_ABORT = -1


@dataclasses.dataclass(slots=True)
class Handoff:
    """What the simulation thread hands to `step`'s caller: the next decision or the episode's end."""

    obs: Observation | None
    reward: float
    completed: list[Completion]
    """The requests completed since the last hand-off, in completion order."""
    backend: int
    """Where the previous decision's request went (after the fallback for a masked action); -1: none."""
    end: bool = False
    summary: WindowSummary | None = None
    failure: BaseException | None = None


class Channel:
    """The two one-way queues between the caller and one episode's simulation thread."""

    def __init__(self) -> None:
        self.to_caller: SimpleQueue[Handoff] = SimpleQueue()
        self.to_sim: SimpleQueue[tuple[int, bool]] = SimpleQueue()

    def abort(self) -> None:
        self.to_sim.put((_ABORT, False))


class _EnvPolicy:
    """The agent's side of the Policy protocol, in the simulation thread: `choose` hands the state to
    the caller and returns the action it gets back; `observe` adds up `observe.reward` per request."""

    name = "gym"

    def __init__(self, sim: Simulator, channel: Channel, error_penalty: float, seed: int) -> None:
        self.sim = sim
        self._channel = channel
        self._error_penalty = error_penalty
        self._fallback = PeakEwma(seed)
        self._reward = 0.0
        self._completed: list[Completion] = []
        self._backend = -1
        self._req_class = 0

    def observation(self, req_class: int, view: ClusterView, now_s: float) -> Observation:
        x = encode_state(view, req_class, now_s, MAX_BACKENDS)
        return {
            "rows": x[: MAX_BACKENDS * ROW_FEATURES].reshape(MAX_BACKENDS, ROW_FEATURES),
            "context": x[MAX_BACKENDS * ROW_FEATURES :].copy(),
            "action_mask": action_mask(view, MAX_BACKENDS).astype(np.int8),
        }

    def handoff(self, obs: Observation | None, **end: Any) -> Handoff:
        out = Handoff(obs, self._reward, self._completed, self._backend, **end)
        self._reward, self._completed = 0.0, []
        return out

    def final_observation(self) -> Observation:
        """The cluster when the episode ended (a truncated one: after its requests were reported)."""
        return self.observation(self._req_class, self.sim.view, self.sim.now_s)

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        if not view.candidates:
            raise NoBackendAvailable("no backend is available")
        self._channel.to_caller.put(self.handoff(self.observation(req_class, view, now_s)))
        action, masked = self._channel.to_sim.get()
        if action == _ABORT:
            raise _Aborted
        if masked:
            action = self._fallback.choose(req_class, view, now_s)
            self._reward += reward(0.0, True, view.typical_all_s, self._error_penalty)
        self._backend, self._req_class = action, req_class
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        r = reward(outcome.latency_s, outcome.error, view.typical_all_s, self._error_penalty)
        self._reward += r
        self._completed.append(Completion(outcome.decision_id, outcome.backend, outcome.latency_s, outcome.error, r))


def simulate_episode(
    channel: Channel, scenario: Scenario, sim_seed: int, phase: int, decisions: int, error_penalty: float
) -> None:
    """One episode, in the simulation thread; every way it ends is handed to the caller (but an abort)."""
    made: list[_EnvPolicy] = []

    def make(sim: Simulator) -> _EnvPolicy:
        made.append(_EnvPolicy(sim, channel, error_penalty, sim_seed))
        return made[0]

    summary: WindowSummary | None
    try:
        summary, _stats = run_episode(make, scenario, sim_seed, phase, decisions, error_penalty=error_penalty)
    except _Aborted:
        return
    except NoBackendAvailable:  # the simulation itself ended: terminated
        summary = None
    except BaseException as exc:  # handed over: the caller raises it
        channel.to_caller.put(Handoff(None, 0.0, [], -1, end=True, failure=exc))
        return
    policy = made[0]
    channel.to_caller.put(policy.handoff(policy.final_observation(), end=True, summary=summary))
