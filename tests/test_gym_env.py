"""The Gymnasium environment of the simulator: API conformance, determinism, masks, and that it is the
simulator training and evaluation run (the shipped model's greedy episode is evaluation's, bit for bit)."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import itertools
import math
import sys
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from lbproxy.gym_env import ENV_ID, ClusterEnv
from lbproxy.observe import ERROR_PENALTY, MAX_BACKENDS, learning_width
from lbproxy.rl.agent import GreedyDqn
from lbproxy.rl.checkpoint import default_model_path, load_model
from lbproxy.rl.network import NumpyWeights, RowScorer
from lbproxy.sim.episode import run_episode
from lbproxy.sim.generator import generate_scenario
from lbproxy.sim.suite import train_sim_seed

Obs = dict[str, np.ndarray]
Agent = Callable[[Obs, dict[str, Any]], int]


@pytest.fixture(scope="module")
def weights() -> NumpyWeights:
    net, _meta = load_model(default_model_path())
    return NumpyWeights.from_state_dict(net.state_dict())


def random_agent(seed: int) -> Agent:
    rng = np.random.default_rng(seed)

    def act(obs: Obs, info: dict[str, Any]) -> int:
        return int(rng.choice(np.flatnonzero(obs["action_mask"])))

    return act


def greedy_agent(weights: NumpyWeights) -> Agent:
    """The shipped network, greedy, from the observation alone: the arithmetic of rl/agent.greedy_action."""

    def act(obs: Obs, info: dict[str, Any]) -> int:
        n = info["backends"]
        rows = obs["rows"][:n]
        scores = RowScorer(weights, rows, obs["context"]).scores(rows)
        return int(np.argmax(np.where(obs["action_mask"][:n] == 1, scores, -np.inf)))

    return act


def run(env: gymnasium.Env[Any, Any], agent: Agent, seed: int | None, episodes: int, **options: Any) -> list[dict]:
    """`episodes` episodes (the first reset seeded); one record per episode."""
    out = []
    for k in range(episodes):
        obs, info = env.reset(seed=seed if k == 0 else None, options=options or None)
        backends = info["backends"]
        rec: dict[str, Any] = {"reset": info, "rewards": [], "actions": [], "obs": [obs], "infos": []}
        done = False
        while not done:
            a = agent(obs, {"backends": backends})
            assert obs["action_mask"][a] == 1
            obs, r, terminated, truncated, step_info = env.step(a)
            assert not step_info["invalid_action"] and step_info["backend"] == a
            rec["actions"].append(a)
            rec["rewards"].append(r)
            rec["obs"].append(obs)
            rec["infos"].append(step_info)
            done = terminated or truncated
        assert truncated and not terminated
        out.append(rec)
    return out


def cluster_seed_of_size(n: int) -> int:
    return next(s for s in itertools.count() if len(generate_scenario(s, "train").cluster.servers) == n)


def test_check_env_passes() -> None:
    env = gymnasium.make(ENV_ID)
    check_env(env.unwrapped)
    env.close()
    other = gymnasium.make(f"lbproxy.gym_env:{ENV_ID}", episode_decisions=8)  # imports the module itself
    assert isinstance(other.unwrapped, ClusterEnv) and other.unwrapped.episode_decisions == 8
    other.close()


def test_same_seed_same_trajectory_and_another_seed_differs() -> None:
    a, b, c = (ClusterEnv(episode_decisions=100) for _ in range(3))
    ra, rb = run(a, random_agent(1), 5, 2), run(b, random_agent(1), 5, 2)
    for ea, eb in zip(ra, rb, strict=True):
        assert ea["reset"] == eb["reset"] and ea["actions"] == eb["actions"] and ea["rewards"] == eb["rewards"]
        for oa, ob in zip(ea["obs"], eb["obs"], strict=True):
            assert all(np.array_equal(oa[k], ob[k]) for k in oa)
        for ia, ib in zip(ea["infos"], eb["infos"], strict=True):
            assert ia == ib
    rc = run(c, random_agent(1), 6, 1)
    assert rc[0]["reset"]["sim_seed"] != ra[0]["reset"]["sim_seed"] and rc[0]["rewards"] != ra[0]["rewards"]
    for env in (a, b, c):
        env.close()


def test_default_episodes_are_the_training_episodes() -> None:
    env = ClusterEnv()
    seeds = []
    for k in range(3):
        _obs, info = env.reset(seed=9 if k == 0 else None)
        seeds.append(info["sim_seed"])
        assert info["scenario"] == generate_scenario(train_sim_seed(9, k), "train").name  # never evaluation
    assert seeds == [train_sim_seed(9, k) for k in range(3)]
    _obs, info = env.reset(options={"split": "evaluation", "cluster_seed": 3})
    assert info["scenario"] == generate_scenario(3, "evaluation").name
    env.close()


def test_greedy_episode_is_evaluations_greedy_episode(weights: NumpyWeights) -> None:
    """The env runs sim.episode.run_episode: the shipped model routes it exactly as evaluation's GreedyDqn."""
    env = ClusterEnv()
    (rec,) = run(env, greedy_agent(weights), 3, 1)
    sim_seed = rec["reset"]["sim_seed"]
    expected, stats = run_episode(
        lambda sim: GreedyDqn(weights, learning_width(sim.n)),
        generate_scenario(sim_seed, "train"),
        sim_seed,
        0,
        env.episode_decisions,
    )
    last = rec["infos"][-1]
    assert last["summary"] == dataclasses.asdict(expected)
    # The return is the sum of the per-request rewards the DQN learns from (observe.reward), each
    # request attributed once to its own decision.
    done = [c for i in rec["infos"] for c in i["completed"]]
    assert sorted(c.decision for c in done) == list(range(env.episode_decisions))
    assert [c.backend for c in sorted(done)] == rec["actions"]
    assert math.isclose(sum(rec["rewards"]), stats.reward_sum, rel_tol=1e-9)
    assert math.isclose(sum(rec["rewards"]) / len(stats.latencies), expected.mean_reward, rel_tol=1e-9)
    env.close()


def test_shipped_model_beats_random_on_the_same_seeds(weights: NumpyWeights) -> None:
    """A few thousand steps each; same clusters and traffic (common random numbers) for both."""
    env = ClusterEnv()
    trained = run(env, greedy_agent(weights), 11, 8)
    rand = run(env, random_agent(0), 11, 8)
    assert [e["reset"] for e in trained] == [e["reset"] for e in rand]
    steps = sum(len(e["rewards"]) for e in trained)
    assert steps == 8 * env.episode_decisions
    mean_trained = sum(sum(e["rewards"]) for e in trained) / steps
    mean_random = sum(sum(e["rewards"]) for e in rand) / steps
    assert mean_trained > mean_random, (mean_trained, mean_random)
    env.close()


def test_masked_action_is_routed_by_the_fallback_with_the_penalty() -> None:
    env = ClusterEnv(cluster_seed=cluster_seed_of_size(4))
    obs, info = env.reset(seed=0)
    assert info["backends"] == 4 and obs["action_mask"][4:].sum() == 0
    for bad in (MAX_BACKENDS, -1, 1.5):
        with pytest.raises(ValueError, match="backend slot"):
            env.step(bad)  # type: ignore[arg-type]
    obs, r, terminated, truncated, step_info = env.step(MAX_BACKENDS - 1)  # padding: masked
    assert step_info["invalid_action"] and 0 <= step_info["backend"] < 4
    assert math.isclose(r, sum(c.reward for c in step_info["completed"]) - ERROR_PENALTY, rel_tol=1e-12)
    assert not terminated and not truncated
    obs, r, *_rest, step_info = env.step(int(np.flatnonzero(obs["action_mask"])[0]))
    assert not step_info["invalid_action"] and r == sum(c.reward for c in step_info["completed"])
    env.close()


@pytest.mark.parametrize("n", [1, 16])
def test_one_backend_and_sixteen(n: int) -> None:
    env = ClusterEnv(cluster_seed=cluster_seed_of_size(n))
    (rec,) = run(env, random_agent(n), 2, 1)
    assert rec["reset"]["backends"] == n and len(rec["rewards"]) == env.episode_decisions
    masks = np.stack([o["action_mask"] for o in rec["obs"]])
    assert masks[:, n:].sum() == 0 and (masks[:, :n].sum(axis=1) >= 1).all()
    if n == 1:
        assert set(rec["actions"]) == {0}
    else:
        assert len(set(rec["actions"])) > 8
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    env.close()


def test_scenario_files_and_phases() -> None:
    env = ClusterEnv()
    obs, info = env.reset(seed=1, options={"scenario": "failure", "phase": 2})
    assert info["scenario"] == "failure" and info["phase"] == 2
    env.step(int(np.flatnonzero(obs["action_mask"])[0]))
    for bad in ({"scenario": "no-such-scenario"}, {"phase": 99, "scenario": "failure"}, {"speed": 2}):
        with pytest.raises(ValueError):
            env.reset(options=bad)
    env.close()
    env.close()  # idempotent


def test_abandoned_episodes_free_their_threads() -> None:
    env = ClusterEnv()
    env.reset(seed=0)
    first = env._thread
    env.reset()  # mid-episode: the old simulation thread is stopped
    assert first is not None and not first.is_alive()
    dropped = ClusterEnv()
    dropped.reset(seed=0)
    thread = dropped._thread
    del dropped
    gc.collect()
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
    env.close()


def test_vector_env_runs_across_autoresets() -> None:
    envs = gymnasium.make_vec(ENV_ID, num_envs=2, vectorization_mode="sync", episode_decisions=20)
    obs, _info = envs.reset(seed=0)
    ends = 0
    for _ in range(50):
        actions = np.array([int(np.flatnonzero(m)[0]) for m in obs["action_mask"]])
        obs, _r, terminated, truncated, _info = envs.step(actions)
        ends += int(truncated.sum() + terminated.sum())
    assert ends == 4
    envs.close()


def test_without_gymnasium_the_import_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # what an environment without it sees
    monkeypatch.delitem(sys.modules, "lbproxy.gym_env")
    with pytest.raises(ImportError) as exc:
        importlib.import_module("lbproxy.gym_env")
    assert str(exc.value) == "lbproxy.gym_env needs gymnasium: pip install 'lbproxy[gym]'"
