"""K proxy replicas in the simulator: K independent learners vs K replicas sharing one learner (issue 12).

Each arriving request goes to replica j by round robin (lbproxy/sim/replicas.py says why); each replica
routes with its own ClusterView (only its own dispatches and completions) and its own policy. Compared,
for each K in --replicas:

- `dqn independent`: K DqnAgents, each with its own Learner and ReplayBuffer (K separate proxies
  learning alone, each from 1/K of the transitions);
- `dqn shared`: K DqnAgents (each its own reward join, exploration and update pacing, acting on its own
  view) over ONE Learner and ONE ReplayBuffer: every transition reaches the one learner and every replica
  acts with its network (weights refreshed after each of its own updates, so at most ~K updates old);
  Not one DqnAgent called by all K replicas: it would work as far as the reward join goes (it keys on
  decision ids and takes s' from the view passed with each outcome), but its decision records and
  exploration would be one replica's, and its ids count its own choose calls across replicas, which
  each replica's warm-up wrapper (sim/episode.py's WarmupThen) cannot map; an agent per replica over
  the shared parts is also what a replica shipping transitions to a remote learner is;
- K = 1 is the single proxy seeing all traffic (both modes are the same thing there);
- heuristics (--heuristics) through the same K-replica wrapper, each replica its own instance.

Same traffic: training episode e of seed s runs simulator seed s * 2**32 + e for every condition, so
within a seed all conditions train on identical arrivals; the "training traffic" columns pool the
last third of the training episodes (the peak phase, epsilon at its final value) of that run, with the
heuristics run on those same episodes. Held out: every trained policy, greedy, and every heuristic on
evaluation seeds 1_000_000 + k (lbproxy/evaluate.py; never used in training), episodes in thirds over
the three phases, each replica with its own greedy copy of its learner's network. Latencies pool every
request of a condition's episodes; reward is the mean of per-episode means (each outcome in the unit of
its replica's view). Several training seeds; the tables give the median over seeds with [min, max].

Small on purpose (the whole run is sized for a few minutes of one core): --episodes training episodes
per run, far below the default run's 6000, so these are young policies; the comparison is of learning
under equal total traffic, not of finished models.

    .venv/bin/python benchmarks/replicas.py --seeds 0 1 2 --episodes 36
    .venv/bin/python benchmarks/replicas.py --seeds 0 1 2 --episodes 90 --replicas 1 4 --heuristics --append
    (the second adds a longer budget below the first; ~2.5 and ~3.5 CPU minutes on a shared 2-vCPU machine)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import machine, quoted_command, revision, utc_now, write_result  # noqa: E402
from transition_bandwidth import bandwidth_lines  # noqa: E402

from lbproxy.evaluate import eval_sim_seed  # noqa: E402
from lbproxy.observe import WindowStats, WindowSummary, feature_dim, learning_width, percentile  # noqa: E402
from lbproxy.phases import phase_index_for_episode  # noqa: E402
from lbproxy.policies import make_policy  # noqa: E402
from lbproxy.policy import Policy  # noqa: E402
from lbproxy.rl.agent import DqnAgent, GreedyDqn  # noqa: E402
from lbproxy.rl.learner import DqnConfig, Learner  # noqa: E402
from lbproxy.rl.network import NumpyWeights  # noqa: E402
from lbproxy.rl.replay import ReplayBuffer  # noqa: E402
from lbproxy.sim import Scenario, Simulator, load_scenario  # noqa: E402
from lbproxy.sim.replicas import run_replica_episode  # noqa: E402
from lbproxy.sim.suite import train_sim_seed  # noqa: E402

SEED_STRIDE = 1000
"""Replica j of training seed s seeds its network, replay and exploration with s * 1000 + j."""
MakePolicies = Callable[[Simulator, int], Sequence[Policy]]
"""(simulator, episode index) -> the replicas' policies for that episode."""


@dataclass
class Measure:
    """One condition over a set of episodes: pooled latencies, mean of per-episode mean rewards."""

    p99_ms: float
    mean_ms: float
    reward: float

    @classmethod
    def of(cls, episodes: Sequence[tuple[WindowSummary, WindowStats]]) -> Measure:
        lat = sorted(x for _s, st in episodes for x in st.latencies)
        return cls(
            p99_ms=1e3 * percentile(lat, 99),
            mean_ms=1e3 * math.fsum(lat) / len(lat),
            reward=statistics.fmean(s.mean_reward for s, _st in episodes),
        )


@dataclass
class Run:
    policy: str
    k: int
    seed: int
    train: Measure
    held_out: Measure
    cpu_s: float


def make_agents(
    mode: str, k: int, seed: int, episodes: int, decisions: int, width: int, cfg: DqnConfig
) -> list[DqnAgent]:
    """K training agents: `independent` each with its own Learner and ReplayBuffer, `shared` over one."""
    base = seed * SEED_STRIDE
    total = episodes * decisions // k  # each replica's own decisions: its epsilon schedule spans the run

    def parts(s: int) -> tuple[Learner, ReplayBuffer]:
        return Learner(dataclasses.replace(cfg, seed=s)), ReplayBuffer(
            cfg.buffer_size, feature_dim(width), width, seed=s
        )

    shared = parts(base) if mode == "shared" else None
    agents = []
    for j in range(k):
        learner, replay = shared if shared is not None else parts(base + j)
        agents.append(DqnAgent(learner, replay, cfg, total_decisions=total, seed=base + j, width=width))
    return agents


def replica_episodes(
    make: MakePolicies, scenario: Scenario, seeds: Sequence[tuple[int, int]], decisions: int, episodes_total: int
) -> list[tuple[WindowSummary, WindowStats]]:
    """Run `make`'s replicas over (episode index, simulator seed) pairs; the phase follows the index."""
    out = []
    for ep, sim_seed in seeds:
        phase = min(phase_index_for_episode(ep, episodes_total), len(scenario.phases) - 1)
        summary, stats = run_replica_episode(lambda sim, ep=ep: make(sim, ep), scenario, sim_seed, phase, decisions)
        out.append((summary, stats))
    return out


def train_and_evaluate(mode: str, k: int, seed: int, scenario: Scenario, args: argparse.Namespace) -> Run:
    cpu0 = time.process_time()
    width = learning_width(len(scenario.cluster.servers))
    agents = make_agents(mode, k, seed, args.episodes, args.decisions, width, DqnConfig())
    tail = []
    for ep in range(args.episodes):
        phase = min(phase_index_for_episode(ep, args.episodes), len(scenario.phases) - 1)
        window = run_replica_episode(
            lambda _sim: agents,
            scenario,
            train_sim_seed(seed, ep),
            phase,
            args.decisions,
            first_ids=[a.decisions for a in agents],
        )
        if ep >= args.episodes - args.episodes // 3:
            tail.append(window)
    weights = [NumpyWeights.from_state_dict(a.learner.online.state_dict()) for a in agents]
    held_out = replica_episodes(
        lambda sim, ep: [GreedyDqn(w, width) for w in weights],
        scenario,
        eval_seeds(args.eval_episodes),
        args.decisions,
        args.eval_episodes,
    )
    name = "dqn" if k == 1 else f"dqn {mode}"
    return Run(name, k, seed, Measure.of(tail), Measure.of(held_out), time.process_time() - cpu0)


def eval_seeds(n: int) -> list[tuple[int, int]]:
    return [(k, eval_sim_seed(0, k)) for k in range(n)]


def tail_seeds(seed: int, episodes: int) -> list[tuple[int, int]]:
    return [(ep, train_sim_seed(seed, ep)) for ep in range(episodes - episodes // 3, episodes)]


def heuristic_run(name: str, k: int, seed: int, scenario: Scenario, args: argparse.Namespace) -> Run:
    """A heuristic through K replicas on seed `seed`'s training tail and on the held-out seeds (each
    replica its own instance; `seed` only moves tie-breaking on the held-out traffic)."""
    cpu0 = time.process_time()

    def make(sim: Simulator, ep: int) -> list[Policy]:
        return [make_policy(name, seed * SEED_STRIDE + ep * 16 + j) for j in range(k)]

    train = replica_episodes(make, scenario, tail_seeds(seed, args.episodes), args.decisions, args.episodes)
    held = replica_episodes(make, scenario, eval_seeds(args.eval_episodes), args.decisions, args.eval_episodes)
    return Run(name, k, seed, Measure.of(train), Measure.of(held), time.process_time() - cpu0)


def _cell(xs: Sequence[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}, {format(max(xs), fmt)}]"


def table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| policy | K | held-out p99 ms | held-out mean ms | held-out reward | training-traffic p99 ms "
        "| training-traffic mean ms | p99 vs K=1 dqn (held-out, per seed) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = {r.seed: r.held_out.p99_ms for r in runs if r.policy == "dqn" and r.k == 1}
    groups: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.policy, r.k), []).append(r)
    # DQN rows by K (single proxy, then independent and shared side by side), then each heuristic by K.
    order = sorted(groups, key=lambda g: (not g[0].startswith("dqn"), g[1] if g[0].startswith("dqn") else 0, g))
    for policy, k in order:
        rs = groups[policy, k]
        ratio = [r.held_out.p99_ms / single[r.seed] for r in rs if r.seed in single]
        lines.append(
            f"| {policy} | {k} | {_cell([r.held_out.p99_ms for r in rs], '.1f')} "
            f"| {_cell([r.held_out.mean_ms for r in rs], '.2f')} | {_cell([r.held_out.reward for r in rs], '.3f')} "
            f"| {_cell([r.train.p99_ms for r in rs], '.1f')} | {_cell([r.train.mean_ms for r in rs], '.2f')} "
            f"| {_cell(ratio, '.3f') if ratio else '-'} |"
        )
    return lines


def per_seed(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| policy | K | seed | held-out p99 ms | held-out mean ms | training-traffic p99 ms | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r.policy.startswith("dqn"):
            lines.append(
                f"| {r.policy} | {r.k} | {r.seed} | {r.held_out.p99_ms:.1f} | {r.held_out.mean_ms:.2f} "
                f"| {r.train.p99_ms:.1f} | {r.cpu_s:.1f} |"
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="class_skew", help="a scenario where learning beats the heuristics")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=36, help="training episodes per run (the default run: 6000)")
    ap.add_argument("--decisions", type=int, default=256, help="decisions per episode, warm-up not counted")
    ap.add_argument("--eval-episodes", type=int, default=24)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--heuristics", nargs="*", default=["least_conn", "peak_ewma"])
    ap.add_argument("--note", default="", help="a line for the results file (e.g. what else ran on the machine)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "replicas.md")
    ap.add_argument(
        "--append", action="store_true", help="add this run as a section of --out (no bandwidth part): another budget"
    )
    return ap.parse_args(argv)


def run_all(scenario: Scenario, args: argparse.Namespace) -> list[Run]:
    """Every condition for every seed: the DQN setups (K = 1: one proxy) and the heuristics."""
    runs: list[Run] = []
    for seed in args.seeds:
        for k in args.replicas:
            for mode in ("independent",) if k == 1 else ("independent", "shared"):
                runs.append(train_and_evaluate(mode, k, seed, scenario, args))
                r = runs[-1]
                print(
                    f"{r.policy:<16} K={k} seed {seed}: held-out p99 {r.held_out.p99_ms:7.1f} ms mean "
                    f"{r.held_out.mean_ms:6.2f} ms | training traffic p99 {r.train.p99_ms:7.1f} ms "
                    f"({r.cpu_s:.0f} CPU s)",
                    flush=True,
                )
            for name in args.heuristics:
                runs.append(heuristic_run(name, k, seed, scenario, args))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    scenario = load_scenario(args.scenario)
    load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    runs = run_all(scenario, args)
    cpu = time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    title = "# K proxy replicas: independent learners vs one shared learner (simulator)"
    if args.append:  # another budget, below what is there
        head = [*args.out.read_text().rstrip("\n").split("\n"), "", f"## {args.episodes} training episodes per run"]
    else:
        head = [title]
    lines = [
        *head,
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the 2-vCPU machine was shared with other sessions' work: CPU seconds are inflated accordingly)",
        f"- command: `{quoted_command(argv)}`",
        f"- revision: {revision()}",
        f"- run: {time.perf_counter() - wall0:.0f} s wall, {cpu:.0f} s CPU, peak RSS {peak_mb:.0f} MB",
        f"- scenario `{scenario.name}` ({len(scenario.cluster.servers)} backends); each training run "
        f"{args.episodes} episodes x {args.decisions} decisions (+128 warm-up each), three-phase curriculum, "
        "DqnConfig defaults (updates_per_decision 0.1, learning_starts 1000, batch 128): SMALL, young policies",
        f"- held out: {args.eval_episodes} episodes x {args.decisions} decisions on simulator seeds "
        f"{eval_sim_seed(0, 0)}..{eval_sim_seed(0, args.eval_episodes - 1)}; training traffic: the last "
        f"{args.episodes // 3} training episodes of each seed (same arrivals for every condition of that seed)",
        f"- training seeds {', '.join(map(str, args.seeds))}: cells are median [min, max] over seeds (heuristics: "
        "over tie-break seeds on the held-out traffic, over the seeds' traffic on the training tail)",
        "- reward is in each replica's own unit (`typical_all_s` from its own completions, as its learner computes "
        "it): with more replicas the unit is estimated from fewer samples and the mean reward drops at equal "
        "latency (1/x is convex), so compare latencies across K, rewards only within a K",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        *table(runs),
        "",
        "Per training run:",
        "",
        *per_seed(runs),
        *([] if args.append else ["", *bandwidth_lines()]),
    ]
    print("\n".join(lines))
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
