"""The cluster generator (training distribution) and the evaluation suites built from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lbproxy.config import ConfigError, Settings
from lbproxy.sim import ScenarioError, Simulator
from lbproxy.sim.generator import MAX_GENERATED_BACKENDS, generate_scenario
from lbproxy.sim.suite import TrainingSet, parse_suite, scenario_digest, training_set


def test_generation_is_a_pure_function_of_seed_and_split() -> None:
    a, b = generate_scenario(7, "train"), generate_scenario(7, "train")
    assert scenario_digest(a) == scenario_digest(b)
    digests = {split: {scenario_digest(generate_scenario(s, split)) for s in range(60)} for split in
               ("train", "validation", "evaluation")}  # fmt: skip
    assert all(len(d) == 60 for d in digests.values())
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["evaluation"]
    assert not digests["validation"] & digests["evaluation"]


def test_the_distribution_covers_what_the_general_model_must_handle() -> None:
    scenarios = [generate_scenario(s, "train") for s in range(400)]
    sizes = [len(sc.cluster.servers) for sc in scenarios]
    assert min(sizes) == 1 and max(sizes) == MAX_GENERATED_BACKENDS
    spreads = [max(s.speed for s in sc.cluster.servers) / min(s.speed for s in sc.cluster.servers) for sc in scenarios]
    assert max(spreads) >= 12.0, "speeds within a cluster span up to 20x"
    workers = {s.workers for sc in scenarios for s in sc.cluster.servers}
    assert min(workers) == 1 and max(workers) == 16
    assert any(s.class_speed != (1.0, 1.0, 1.0) for sc in scenarios for s in sc.cluster.servers)
    dists = {sc.cluster.service.distribution for sc in scenarios}
    assert dists == {"exponential", "lognormal", "constant"}
    assert max(sc.cluster.service.cv for sc in scenarios if sc.cluster.service.distribution == "lognormal") > 2.5
    light = [sc.cluster.service.mean_s[0] for sc in scenarios]
    assert min(light) < 0.002 and max(light) > 0.5, "time scales from ~1 ms to ~1 s"
    loads = [sc.phases[0].load for sc in scenarios]
    assert min(loads) < 0.25 and max(loads) > 0.9
    assert any(sc.phases[0].burstiness > 0 for sc in scenarios) and any(sc.surges for sc in scenarios)
    faults = [f for sc in scenarios for f in sc.faults]
    assert any(f.crash for f in faults) and any(f.recover for f in faults)
    assert any(f.slowdown for f in faults) and any(f.error_rate for f in faults)
    reports = [sc.reports_service_time for sc in scenarios]
    assert any(reports) and not all(reports)


@pytest.mark.parametrize("seed", range(25))
def test_every_generated_cluster_simulates(seed: int) -> None:
    from lbproxy.policies import make_policy

    sc = generate_scenario(seed, "validation")
    res = Simulator(sc, seed=seed).run(make_policy("least_conn", seed), 384)
    assert res.decisions == 384 and np.isfinite(res.summary.p99_s)


def test_training_set_gives_a_new_cluster_per_episode() -> None:
    ts = training_set("generated", seed=3)
    assert ts.width == 16 and ts.phase_count == 1
    names = {ts.scenario(e).name for e in range(20)}
    assert len(names) == 20
    fixed = training_set("curriculum", seed=3)
    assert isinstance(fixed, TrainingSet) and fixed.scenario(0) is fixed.scenario(9)


def test_suite_spec_parsing() -> None:
    suite = parse_suite("validation:3+shipped")
    assert [sc.name for sc in suite[:3]] == [f"generated-validation-{k}" for k in range(3)]
    assert "curriculum" in {sc.name for sc in suite[3:]}
    for bad in ("evaluation", "evaluation:x", "held-out:3", "evaluation:0"):
        with pytest.raises(ScenarioError, match="unknown suite part"):
            parse_suite(bad)


def test_suite_evaluation_reports_every_cluster_and_the_targets(tmp_path: Path) -> None:
    """`lbproxy --mode evaluate --suite ...` end to end on a tiny suite, with an untrained model: the
    report, the JSON and the PNG, every production heuristic compared, the targets checked."""
    from lbproxy.evaluate import run_evaluate
    from lbproxy.evaluate_suite import PRODUCTION
    from lbproxy.rl.checkpoint import save_model
    from lbproxy.rl.network import QNetwork

    model = tmp_path / "m.pth"
    save_model(model, QNetwork(hidden=16), {})
    settings = Settings(
        mode="evaluate", suite="validation:2+shipped", model=model, episodes=1, episode_decisions=64, run_dir=tmp_path
    )
    assert run_evaluate(settings) == 0
    report = json.loads((tmp_path / "eval" / "suite.json").read_text())
    assert report["cluster_count"] == len(report["clusters"]) == 2 + 8
    assert set(PRODUCTION) <= set(report["clusters"][0]["policies"])
    assert {"median_prod", "p95_prod", "max_prod", "median_all", "median_mean_oracle", "error_gap_pp"} <= set(
        report["aggregate"]
    )
    assert (tmp_path / "eval" / "suite_ratios.png").stat().st_size > 1000
    assert "median DQN p99" in (tmp_path / "eval" / "suite.md").read_text()


def test_bad_suite_is_a_one_line_config_error(tmp_path: Path) -> None:
    from lbproxy.evaluate import run_evaluate

    with pytest.raises(ConfigError, match="--suite"):
        run_evaluate(Settings(mode="evaluate", suite="nonsense:3", run_dir=tmp_path))
