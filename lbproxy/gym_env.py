"""The cluster simulator as a Gymnasium environment, so an agent of any library can learn to route.

    import gymnasium
    import numpy as np

    import lbproxy.gym_env  # registers "lbproxy/Cluster-v0"; needs `pip install 'lbproxy[gym]'`

    env = gymnasium.make("lbproxy/Cluster-v0")  # a new generated cluster (training split) per episode
    obs, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    done = False
    while not done:
        action = int(rng.choice(np.flatnonzero(obs["action_mask"])))  # your agent here
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    print(info["summary"]["mean_reward"])  # the number `lbproxy --mode evaluate` reports per episode
    env.close()

(`gymnasium.make("lbproxy.gym_env:lbproxy/Cluster-v0")` imports the module itself.)

One episode is the episode that training and evaluation run (`lbproxy.sim.episode.run_episode`): a
fresh Simulator, WARMUP_DECISIONS requests routed by the SED oracle, then `episode_decisions` routed
by the agent, one step each. It runs in a helper thread that takes strict turns with `step`'s caller
(lbproxy/gym_episode.py), so an episode is as deterministic as the simulator.

- Observation: a Dict of `rows` (MAX_BACKENDS x ROW_FEATURES float32: one row per backend slot,
  observe.F_* columns, zero for padding and for slots that may not be chosen), `context`
  (CONTEXT_FEATURES float32, observe.C_*) and `action_mask` (int8, 1 = a candidate backend): exactly
  `observe.encode_state` / `observe.action_mask`, what the shipped DQN reads (its flat state is
  `rows.ravel()` followed by `context`). The observation after a step is the state at the next
  arrival.
- Action: Discrete(MAX_BACKENDS), a backend slot. A slot whose mask is 0 (padding, unhealthy or
  ejected) is not an error: the request is routed by the proxy's fallback heuristic (peak_ewma, as
  for a missed decision deadline), the step's reward carries the error penalty on top, and
  info["invalid_action"] is True. check_env samples unmasked actions, and so do agents that ignore
  the mask. An action outside the space raises ValueError.
- Reward: a request's outcome is known when it completes, a few decisions later. A step's reward is
  the sum of `observe.reward` (the DQN's reward: latency in the cluster's typical latencies, minus
  the error penalty) over the requests that completed during the step; the last step also reports
  the rest of the episode's requests. The return of an episode is thus the sum of the per-request
  rewards the DQN learns from, and info["summary"]["mean_reward"] on the last step is its mean per
  request, as training and evaluation compute it. info["completed"] lists those requests
  (`Completion`: the step that routed each, backend, latency, error, reward), for agents that join
  each reward to its own decision as the DQN does.
- Episode end: truncated=True after `episode_decisions` steps; terminated=True only if the cluster
  has no backend left to route to (panic routing keeps every present backend a candidate, so neither
  the shipped scenarios nor the generator get there), with an all-zero mask.
- Seeds: `reset(seed=s)` starts run s. Its episode e (0, 1, ... over the following resets) runs the
  simulator seed `train_sim_seed(s, e)`, and the generated cluster of that seed, as episode e of
  `lbproxy --mode train --env sim --scenario generated --seed s` does. Evaluation clusters only
  when asked for.
- reset options (and constructor keywords, the defaults for every episode): `scenario` ("generated",
  a shipped scenario name or a TOML path), `cluster_seed` (one generated cluster instead of one per
  episode), `split` ("train"; with "validation" or "evaluation", episode e runs member e of
  `--suite evaluation:N`, the held-out clusters, and cluster_seed picks one), `phase` (index into
  the scenario's phases; default: drawn from the env's np_random). `episode_decisions` and
  `error_penalty` are constructor keywords only.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, SupportsFloat

import numpy as np

try:
    import gymnasium
    from gymnasium import spaces
except ImportError:  # one line, with the fix
    raise ImportError("lbproxy.gym_env needs gymnasium: pip install 'lbproxy[gym]'") from None

from lbproxy.config import Settings
from lbproxy.gym_episode import Channel, Completion, Handoff, Observation, simulate_episode
from lbproxy.observe import CONTEXT_FEATURES, ERROR_PENALTY, MAX_BACKENDS, ROW_FEATURES
from lbproxy.sim.generator import GENERATED, Split, generate_scenario
from lbproxy.sim.scenario import Scenario, load_scenario
from lbproxy.sim.suite import TrainingSet, train_sim_seed

__all__ = ["ENV_ID", "ClusterEnv", "Completion"]

ENV_ID = "lbproxy/Cluster-v0"
EPISODE_DECISIONS = int(Settings.model_fields["episode_decisions"].default)
"""Agent decisions per episode: the training and evaluation default (--episode-decisions)."""
FEATURE_BOUND = float(np.finfo(np.float32).max)
"""Bound of the row and context Boxes: every feature is finite, but some (log counts, idle time) have
no fixed ceiling, and check_env refuses infinite bounds."""
SPLITS: tuple[Split, ...] = ("train", "validation", "evaluation")
RESET_OPTIONS = ("scenario", "cluster_seed", "split", "phase")


class ClusterEnv(gymnasium.Env[dict[str, Any], np.int64]):
    """lbproxy's cluster simulator, one routing decision per step (module docstring)."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - gymnasium's class attribute

    def __init__(
        self,
        scenario: str = GENERATED,
        *,
        cluster_seed: int | None = None,
        split: Split = "train",
        phase: int | None = None,
        episode_decisions: int = EPISODE_DECISIONS,
        error_penalty: float = ERROR_PENALTY,
        render_mode: str | None = None,
    ) -> None:
        if episode_decisions < 1:
            raise ValueError(f"episode_decisions must be >= 1, got {episode_decisions}")
        if render_mode is not None:
            raise ValueError(f"ClusterEnv renders nothing; got render_mode={render_mode!r}")
        self.episode_decisions = episode_decisions
        self.error_penalty = error_penalty
        self.observation_space = spaces.Dict(
            {
                "rows": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (MAX_BACKENDS, ROW_FEATURES), np.float32),
                "context": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (CONTEXT_FEATURES,), np.float32),
                "action_mask": spaces.MultiBinary(MAX_BACKENDS),
            }
        )
        self.action_space = spaces.Discrete(MAX_BACKENDS)
        self._scenarios: dict[str, Scenario] = {}
        self._defaults: dict[str, Any] = {}
        self._defaults = self._options(
            {"scenario": scenario, "cluster_seed": cluster_seed, "split": split, "phase": phase}
        )
        self._run_seed: int | None = None
        self._episode = 0
        self._channel: Channel | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._mask: np.ndarray | None = None
        self._step = 0
        self._backends = 0

    # --- options ---------------------------------------------------------------------------------
    def _options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """The reset options over the constructor's, checked (ValueError naming the option and the fix)."""
        given = dict(options or {})
        unknown = sorted(set(given) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option {unknown[0]!r}; use {', '.join(RESET_OPTIONS)}")
        opts = {**self._defaults, **given}
        name = opts["scenario"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"option scenario must be {GENERATED!r}, a scenario name or a TOML path, got {name!r}")
        if name != GENERATED and name not in self._scenarios:
            self._scenarios[name] = load_scenario(name)  # ScenarioError (a ValueError): one line
        seed = opts["cluster_seed"]
        if seed is not None and (name != GENERATED or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"option cluster_seed must be an int >= 0 with scenario {GENERATED!r}, got {seed!r}")
        if opts["split"] not in SPLITS:
            raise ValueError(f"option split must be one of {', '.join(SPLITS)}, got {opts['split']!r}")
        return opts

    def _episode_scenario(self, opts: dict[str, Any]) -> Scenario:
        name = opts["scenario"]
        if name != GENERATED:
            return self._scenarios[name]
        if opts["cluster_seed"] is not None:
            return generate_scenario(opts["cluster_seed"], opts["split"])
        if opts["split"] == "train":
            assert self._run_seed is not None
            return TrainingSet(GENERATED, self._run_seed).scenario(self._episode)
        return generate_scenario(self._episode, opts["split"])  # member e of `--suite evaluation:N`

    # --- gymnasium API -----------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        opts = self._options(options)
        self._stop()
        if seed is not None:
            self._run_seed, self._episode = int(seed), 0
        elif self._run_seed is None:
            self._run_seed = int(self.np_random.integers(2**31))
        sim_seed = train_sim_seed(self._run_seed, self._episode)
        scenario = self._episode_scenario(opts)
        self._episode += 1
        phases = len(scenario.phases)
        phase = opts["phase"]
        if phase is None:
            phase = int(self.np_random.integers(phases)) if phases > 1 else 0
        elif not (isinstance(phase, int) and 0 <= phase < phases):
            raise ValueError(f"option phase must be in 0..{phases - 1} for scenario {scenario.name!r}, got {phase!r}")
        channel = Channel()
        thread = threading.Thread(
            target=simulate_episode,
            args=(channel, scenario, sim_seed, phase, self.episode_decisions, self.error_penalty),
            name="lbproxy-gym-sim",
            daemon=True,
        )
        self._channel, self._thread = channel, thread
        self._finalizer = weakref.finalize(self, channel.abort)  # a dropped env frees its thread
        thread.start()
        first = self._receive()
        if first.end or first.obs is None:
            raise RuntimeError(f"scenario {scenario.name!r} has no backend to route to after the warm-up")
        self._step, self._backends = 0, len(scenario.cluster.servers)
        self._mask = first.obs["action_mask"].copy()  # the caller may write to its obs
        info = {"scenario": scenario.name, "backends": self._backends, "sim_seed": sim_seed, "phase": phase}
        return first.obs, info

    def step(self, action: int | np.integer) -> tuple[Observation, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._mask is None or self._channel is None:
            raise RuntimeError("the episode is over (or never started): call reset()")
        a = int(action)
        if a != action or not 0 <= a < MAX_BACKENDS:
            raise ValueError(f"action must be a backend slot in 0..{MAX_BACKENDS - 1}, got {action!r}")
        masked = not self._mask[a]
        self._channel.to_sim.put((a, masked))
        got = self._receive()
        info: dict[str, Any] = {
            "decision": self._step,
            "backend": got.backend,
            "backends": self._backends,
            "invalid_action": masked,
            "completed": tuple(got.completed),  # a tuple: its length varies, which vector envs' arrays cannot
        }
        self._step += 1
        assert got.obs is not None
        terminated = truncated = False
        if got.end:
            self._mask = None
            truncated = got.summary is not None
            terminated = not truncated
            if got.summary is not None:
                info["summary"] = dataclasses.asdict(got.summary)
            self._join()
        else:
            self._mask = got.obs["action_mask"].copy()
        return got.obs, float(got.reward), terminated, truncated, info

    def close(self) -> None:
        self._stop()
        super().close()

    # --- the simulation thread -------------------------------------------------------------------
    def _receive(self) -> Handoff:
        assert self._channel is not None
        got = self._channel.to_caller.get()
        if got.failure is not None:
            self._join()
            raise got.failure
        return got

    def _stop(self) -> None:
        """Abandon the running episode, if any, and wait for its thread."""
        if self._channel is not None and self._thread is not None and self._thread.is_alive():
            self._channel.abort()
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._finalizer is not None:
            self._finalizer.detach()
        self._channel = self._thread = self._finalizer = None
        self._mask = None


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="lbproxy.gym_env:ClusterEnv")
