"""`lbproxy --mode evaluate --suite evaluation:200+shipped`: the model against every policy on many clusters.

Each cluster of the suite is evaluated like one `--scenario` (lbproxy/evaluate.py): every policy on
exactly the same traffic (common random numbers: the same simulator seeds, arrivals, service and
error draws), `--episodes` episodes per cluster. Per cluster the report gives the DQN's p99 and mean
divided by the best PRODUCTION heuristic's (round robin, least_conn, P2C, peak-EWMA, Prequal, C3:
what a balancer ships), by the best of every non-oracle policy (random and the SED variants
included), and by the SED oracle's (true rates), plus the error-rate gap; then the distribution over
clusters (median, 95th percentile, maximum) and a PNG of it.

The generated part of a suite uses generator split "evaluation" (lbproxy/sim/generator.py): clusters
no training run sees. Tune on `validation:N`, never on `evaluation:N`.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lbproxy.config import ConfigError, Settings

PRODUCTION = ("round_robin", "least_conn", "p2c", "peak_ewma", "prequal", "c3")
"""The heuristics production balancers ship (nginx, Envoy, Linkerd, YouTube's Prequal, C3): the bar."""

TARGETS = {
    "median_prod": 0.85,
    "p95_prod": 1.0,
    "max_prod": 1.2,
    "median_all": 1.0,
    "median_mean_oracle": 1.10,
    "error_gap_pp": 0.5,
}
"""The issue's targets, checked (not tuned) by the report."""


SUITE_EPISODES = 32
"""Default episodes per cluster. Each ratio divides by the best of six heuristics chosen with
hindsight, and the least of six noisy p99 estimates is biased low: at 8 episodes a p99 rests on ~20
requests, and two models within 0.003 of each other at 64 episodes (held-out medians 0.804, 0.806)
read 0.821 and 0.856 (2026-12-03). 32 episodes take ~2 min per 200 clusters on two cores."""


@dataclass
class ClusterRow:
    name: str
    summary: str
    backends: int
    best_prod: str
    best_all: str
    dqn_p99_ms: float
    dqn_mean_ms: float
    dqn_error_rate: float
    prod_p99_ms: float
    all_p99_ms: float
    oracle_mean_ms: float
    prod_ratio: float
    all_ratio: float
    mean_oracle_ratio: float
    error_gap_pp: float
    """DQN error rate minus the lowest error rate of any production heuristic, in percentage points."""
    policies: dict[str, dict[str, float]]


def _evaluate_cluster(args: tuple[Any, str, int, int, int, float]) -> ClusterRow:
    from lbproxy.evaluate import evaluate_policy, load_greedy_model, policy_factories

    scenario, model, episodes, decisions, seed, error_penalty = args
    net, _meta = load_greedy_model(Path(model))
    results = {
        name: evaluate_policy(
            name,
            factory,
            scenario,
            episodes=episodes,
            episode_decisions=decisions,
            seed=seed,
            error_penalty=error_penalty,
        )
        for name, factory in policy_factories(net, seed).items()
    }
    dqn = results["dqn"]
    prod = [results[p] for p in PRODUCTION]
    others = [r for name, r in results.items() if name not in ("dqn", "sed_oracle")]
    best_prod = min(prod, key=lambda r: r.p99_ms)
    best_all = min(others, key=lambda r: r.p99_ms)
    oracle = results["sed_oracle"]
    return ClusterRow(
        name=scenario.name,
        summary=scenario.summary,
        backends=len(scenario.cluster.servers),
        best_prod=best_prod.policy,
        best_all=best_all.policy,
        dqn_p99_ms=dqn.p99_ms,
        dqn_mean_ms=dqn.mean_ms,
        dqn_error_rate=dqn.error_rate,
        prod_p99_ms=best_prod.p99_ms,
        all_p99_ms=best_all.p99_ms,
        oracle_mean_ms=oracle.mean_ms,
        prod_ratio=dqn.p99_ms / best_prod.p99_ms,
        all_ratio=dqn.p99_ms / best_all.p99_ms,
        mean_oracle_ratio=dqn.mean_ms / oracle.mean_ms,
        error_gap_pp=100.0 * (dqn.error_rate - min(r.error_rate for r in prod)),
        policies={
            name: {"mean_ms": r.mean_ms, "p99_ms": r.p99_ms, "error_rate": r.error_rate} for name, r in results.items()
        },
    )


def summarise(rows: list[ClusterRow]) -> dict[str, float]:
    prod = np.array([r.prod_ratio for r in rows])
    allr = np.array([r.all_ratio for r in rows])
    mean = np.array([r.mean_oracle_ratio for r in rows])
    return {
        "clusters": float(len(rows)),
        "median_prod": float(np.median(prod)),
        "p95_prod": float(np.percentile(prod, 95)),
        "max_prod": float(prod.max()),
        "above_1_2": float((prod > 1.2).sum()),
        "median_all": float(np.median(allr)),
        "p95_all": float(np.percentile(allr, 95)),
        "median_mean_oracle": float(np.median(mean)),
        "error_gap_pp": float(max(r.error_gap_pp for r in rows)),
    }


def verdicts(agg: dict[str, float]) -> dict[str, bool]:
    return {key: agg[key] <= bound for key, bound in TARGETS.items()}


def plot(rows: list[ClusterRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("prod_ratio", "÷ best production heuristic"), ("all_ratio", "÷ best non-oracle policy")):
        xs = np.sort([getattr(r, key) for r in rows])
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)
    for x in (0.85, 1.0, 1.2):
        ax.axvline(x, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("DQN p99 ratio per cluster (log scale; < 1 = DQN better)")
    ax.set_ylabel("share of clusters (ECDF)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(rows: list[ClusterRow], agg: dict[str, float], header: dict[str, Any]) -> str:
    ok = verdicts(agg)

    def mark(key: str) -> str:
        return "met" if ok[key] else "NOT met"

    lines = [
        f"# Evaluation suite `{header['suite']}`",
        "",
        f"- model: `{header['model']}`",
        f"- {header['cluster_count']} clusters, {header['episodes']} episodes x {header['episode_decisions']} "
        f"decisions per policy and cluster (after a {header['warmup_decisions']}-decision SED-oracle warm-up), "
        "same traffic for every policy; latency statistics pool every request of a cluster's episodes",
        f"- date: {header['date']}; wall time {header['wall_s']:.0f} s",
        f"- command: `{header['command']}`",
        "",
        "| measure | value | target | |",
        "|---|---:|---:|---|",
        f"| median DQN p99 ÷ best production heuristic | {agg['median_prod']:.3f} | ≤ 0.85 | {mark('median_prod')} |",
        f"| 95th percentile of that ratio | {agg['p95_prod']:.3f} | ≤ 1.0 | {mark('p95_prod')} |",
        f"| worst cluster | {agg['max_prod']:.3f} | ≤ 1.2 | {mark('max_prod')} |",
        f"| clusters above 1.2 | {agg['above_1_2']:.0f} | 0 | |",
        f"| median DQN p99 ÷ best non-oracle policy | {agg['median_all']:.3f} | ≤ 1.0 | {mark('median_all')} |",
        f"| median DQN mean ÷ SED-oracle mean | {agg['median_mean_oracle']:.3f} | ≤ 1.10 | "
        f"{mark('median_mean_oracle')} |",
        f"| worst error-rate gap (DQN − best production heuristic), pp | {agg['error_gap_pp']:.2f} | ≤ 0.5 | "
        f"{mark('error_gap_pp')} |",
        "",
        "| cluster | backends | best production (p99 ms) | DQN p99 ms | ratio | best of all | ratio | "
        "mean ÷ oracle | error gap pp | summary |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.backends} | {r.best_prod} ({r.prod_p99_ms:.4g}) | {r.dqn_p99_ms:.4g} | "
            f"{r.prod_ratio:.3f} | {r.best_all} | {r.all_ratio:.3f} | {r.mean_oracle_ratio:.3f} | "
            f"{r.error_gap_pp:+.2f} | {r.summary} |"
        )
    return "\n".join(lines) + "\n"


def run_suite(settings: Settings) -> int:
    from lbproxy.evaluate import load_greedy_model
    from lbproxy.rl.checkpoint import default_model_path
    from lbproxy.sim import ScenarioError
    from lbproxy.sim.episode import WARMUP_DECISIONS
    from lbproxy.sim.suite import parse_suite

    assert settings.suite is not None
    try:
        scenarios = parse_suite(settings.suite)
    except ScenarioError as exc:
        raise ConfigError(f"invalid setting --suite: {exc}") from None
    model = settings.model if settings.model is not None else default_model_path()
    load_greedy_model(model)  # a missing or bad model is a one-line error before any work
    episodes = settings.episodes if settings.episodes is not None else SUITE_EPISODES
    jobs = max(1, settings.jobs)
    print(
        f"lbproxy: evaluating {model} on {len(scenarios)} clusters ({settings.suite}), {episodes} episodes each, "
        f"{jobs} process(es)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    tasks = [
        (sc, str(model), episodes, settings.episode_decisions, settings.seed, settings.error_penalty)
        for sc in scenarios
    ]
    rows = _evaluate_clusters(tasks, jobs)
    agg = summarise(rows)
    header = {
        "suite": settings.suite,
        "model": str(model),
        "cluster_count": len(rows),
        "episodes": episodes,
        "episode_decisions": settings.episode_decisions,
        "warmup_decisions": WARMUP_DECISIONS,
        "seed": settings.seed,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
        "command": " ".join(["lbproxy", *sys.argv[1:]]) if sys.argv and "lbproxy" in sys.argv[0] else "lbproxy",
    }
    out = Path(settings.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = format_report(rows, agg, header)
    (out / "suite.md").write_text(report)
    (out / "suite.json").write_text(
        json.dumps(
            {**header, "aggregate": agg, "verdicts": verdicts(agg), "clusters": [asdict(r) for r in rows]}, indent=1
        )
        + "\n"
    )
    plot(rows, out / "suite_ratios.png", f"{settings.suite}: {len(rows)} clusters, model {Path(model).name}")
    print("\n".join(report.splitlines()[:18]))
    print(f"lbproxy: wrote {out / 'suite.md'}, suite.json and suite_ratios.png", file=sys.stderr)
    return 0


def _evaluate_clusters(tasks: list[tuple[Any, str, int, int, int, float]], jobs: int) -> list[ClusterRow]:
    """Every cluster's row, in suite order, over `jobs` processes; progress on stderr every 5 s."""
    rows: list[ClusterRow] = []
    last = 0.0
    with ProcessPoolExecutor(jobs) if jobs > 1 else _Inline() as pool:
        for row in pool.map(_evaluate_cluster, tasks):
            rows.append(row)
            if time.perf_counter() - last > 5.0 or len(rows) == len(tasks):
                last = time.perf_counter()
                med = float(np.median([r.prod_ratio for r in rows]))
                print(f"  {len(rows)}/{len(tasks)} clusters, median p99 ratio so far {med:.3f}", file=sys.stderr)
    return rows


class _Inline:
    """`map` in this process (--jobs 1): no pool, same interface."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn: Any, items: list[Any]) -> Any:
        return map(fn, items)


__all__ = ["PRODUCTION", "TARGETS", "ClusterRow", "run_suite", "summarise", "verdicts"]
