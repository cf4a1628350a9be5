"""`lbproxy --mode evaluate`: the greedy DQN against every heuristic and the SED oracle, same traffic.

Fairness. Episode k of every policy runs in a fresh `Simulator(scenario, eval_sim_seed(seed, k))`,
so all policies see exactly the same arrival times, classes, service-time and error draws (the
simulator's common random numbers). Each episode starts like a training episode: a warm-up of
`WARMUP_DECISIONS` routed by the SED oracle (identical for every policy, not counted), then
`episode_decisions` routed by the policy under test, in the same Simulator.run (sim/episode.py).
Episode k runs in phase `phase_index_for_episode(k, episodes)`, so an evaluation covers the three
phases like training did.

Held-out seeds. Training episode e of a run seeded s uses simulator seed s * 2**32 + e
(lbproxy.sim.suite.train_sim_seed); evaluation uses 1_000_000 + s + k. They never coincide.

Aggregation. Latency statistics (mean, p50, p99, p99.9) and the error rate pool every request of
every episode; Gini, accuracy and mean reward are means of the per-episode values (episodes have
equal decision counts). The DQN is greedy: no exploration, no learning.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import percentile
from lbproxy.phases import phase_index_for_episode
from lbproxy.rl.network import QNetwork
from lbproxy.sim.episode import WARMUP_DECISIONS, run_episode

EVAL_SEED_BASE = 1_000_000
"""First evaluation simulator seed (plus --seed); far from training seeds (seed * 2**32 + episode)."""


def eval_sim_seed(seed: int, k: int) -> int:
    return EVAL_SEED_BASE + seed + k


@dataclass
class PolicyResult:
    policy: str
    mean_ms: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    error_rate: float
    gini: float
    accuracy: float
    mean_reward: float
    requests: int
    wall_s: float


PolicyFactory = Callable[[Any, int], Any]
"""(simulator, episode index) -> a fresh Policy for that episode."""


def _bind_episode(factory: PolicyFactory, k: int) -> Callable[[Any], Any]:
    def make(sim: Any) -> Any:
        return factory(sim, k)

    return make


def evaluate_policy(
    name: str,
    factory: PolicyFactory,
    scenario: Any,
    *,
    episodes: int,
    episode_decisions: int,
    seed: int,
    error_penalty: float,
) -> PolicyResult:
    latencies: list[float] = []
    errors = 0
    ginis: list[float] = []
    accs: list[float] = []
    rewards: list[float] = []
    t0 = time.perf_counter()
    for k in range(episodes):
        phase = min(phase_index_for_episode(k, episodes), len(scenario.phases) - 1)
        summary, stats = run_episode(
            _bind_episode(factory, k),
            scenario,
            eval_sim_seed(seed, k),
            phase,
            episode_decisions,
            error_penalty=error_penalty,
        )
        latencies.extend(stats.latencies)
        errors += stats.errors
        ginis.append(summary.gini)
        accs.append(summary.accuracy)
        rewards.append(summary.mean_reward)
    lat = sorted(latencies)
    m = len(lat)
    return PolicyResult(
        policy=name,
        mean_ms=1e3 * math.fsum(lat) / m if m else 0.0,
        p50_ms=1e3 * percentile(lat, 50),
        p99_ms=1e3 * percentile(lat, 99),
        p999_ms=1e3 * percentile(lat, 99.9),
        error_rate=errors / m if m else 0.0,
        gini=float(np.mean(ginis)),
        accuracy=float(np.mean(accs)),
        mean_reward=float(np.mean(rewards)),
        requests=m,
        wall_s=time.perf_counter() - t0,
    )


def load_greedy_model(path: Path) -> tuple[QNetwork, dict[str, Any]]:
    """The model file (dqn_final.pth or a training checkpoint) as a CPU network; one-line errors."""
    from lbproxy.rl.checkpoint import CheckpointError, load_model

    if not path.is_file():
        raise ConfigError(
            f"no model at {path}; train one with `lbproxy --mode train --env sim --run-dir runs/NAME` "
            "and pass --model runs/NAME/dqn_final.pth"
        )
    try:
        net, meta = load_model(path, device="cpu")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return net, meta


def policy_factories(net: QNetwork | None, seed: int) -> dict[str, PolicyFactory]:
    """dqn (when a network is given), every heuristic, then the SED oracle, in table order."""
    from lbproxy.observe import learning_width
    from lbproxy.policies import HEURISTICS, make_policy
    from lbproxy.rl.agent import GreedyDqn
    from lbproxy.rl.network import NumpyWeights
    from lbproxy.sim import SedOracle

    out: dict[str, PolicyFactory] = {}
    if net is not None:
        weights = NumpyWeights.from_state_dict(net.state_dict())

        def dqn(sim: Any, k: int) -> GreedyDqn:
            return GreedyDqn(weights, learning_width(sim.n))

        out["dqn"] = dqn
    for name in HEURISTICS:

        def heuristic(sim: Any, k: int, name: str = name) -> Any:
            return make_policy(name, seed + k)

        out[name] = heuristic

    def oracle(sim: Any, k: int) -> SedOracle:
        return SedOracle(sim)

    out["sed_oracle"] = oracle
    return out


def evaluate_all(
    scenario: Any, factories: dict[str, PolicyFactory], *, episodes: int, episode_decisions: int, settings: Settings
) -> list[PolicyResult]:
    return [
        evaluate_policy(
            name,
            factory,
            scenario,
            episodes=episodes,
            episode_decisions=episode_decisions,
            seed=settings.seed,
            error_penalty=settings.error_penalty,
        )
        for name, factory in factories.items()
    ]


def format_table(results: Sequence[PolicyResult]) -> str:
    """Markdown table; the best value of each latency column is in bold."""
    cols = ("mean_ms", "p50_ms", "p99_ms", "p999_ms")
    best = {c: min(getattr(r, c) for r in results) for c in cols}
    lines = [
        "| policy | mean ms | p50 ms | p99 ms | p99.9 ms | error rate | Gini | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = []
        for c in cols:
            v = getattr(r, c)
            cells.append(f"**{v:.2f}**" if v == best[c] else f"{v:.2f}")
        lines.append(f"| {r.policy} | {' | '.join(cells)} | {r.error_rate:.4f} | {r.gini:.3f} | {r.accuracy:.3f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, header: dict[str, Any], results: Sequence[PolicyResult]) -> tuple[Path, Path]:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "evaluation.md", out / "evaluation.json"
    md = [
        f"# Evaluation on scenario `{header['scenario']}`",
        "",
        f"- model: `{header['model']}`",
        f"- {header['episodes']} episodes x {header['episode_decisions']} decisions per policy, "
        f"simulator seeds {header['eval_seeds'][0]}..{header['eval_seeds'][1]} (held out from training)",
        f"- date: {header['date']}",
        f"- {header['aggregation']}",
        "",
        format_table(results),
        "",
    ]
    md_path.write_text("\n".join(md))
    json_path.write_text(json.dumps({**header, "policies": [asdict(r) for r in results]}, indent=2) + "\n")
    return md_path, json_path


AGGREGATION = (
    "latency percentiles and error rate pool every request of every episode; "
    "Gini, accuracy and reward are means of per-episode values"
)


def run_evaluate(settings: Settings) -> int:
    from lbproxy.rl.checkpoint import default_model_path
    from lbproxy.sim import ScenarioError, load_scenario

    if settings.seed < 0:
        raise ConfigError(f"invalid setting --seed: must be >= 0 for evaluation, got {settings.seed}")
    if settings.suite is not None:
        from lbproxy.evaluate_suite import run_suite

        return run_suite(settings)
    try:
        scenario = load_scenario(settings.scenario)
    except ScenarioError as exc:
        raise ConfigError(str(exc)) from None
    model_path = settings.model if settings.model is not None else default_model_path()
    net, _meta = load_greedy_model(model_path)
    torch.set_num_threads(1)
    episodes = settings.resolved_episodes()
    factories = policy_factories(net, settings.seed)
    print(
        f"lbproxy: evaluating {len(factories)} policies on {scenario.name!r}: {episodes} episodes x "
        f"{settings.episode_decisions} decisions each",
        file=sys.stderr,
    )
    results = evaluate_all(
        scenario, factories, episodes=episodes, episode_decisions=settings.episode_decisions, settings=settings
    )
    header = {
        "scenario": scenario.name,
        "model": str(model_path),
        "episodes": episodes,
        "episode_decisions": settings.episode_decisions,
        "warmup_decisions": WARMUP_DECISIONS,
        "seed": settings.seed,
        "eval_seeds": [eval_sim_seed(settings.seed, 0), eval_sim_seed(settings.seed, episodes - 1)],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "aggregation": AGGREGATION,
    }
    print(format_table(results))
    md_path, json_path = write_report(settings.run_dir, header, results)
    print(f"lbproxy: wrote {md_path} and {json_path}", file=sys.stderr)
    return 0
