"""Evaluation and plots end to end on a tiny configuration, and their one-line CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lbproxy.config import Settings
from lbproxy.evaluate import EVAL_SEED_BASE, run_evaluate
from lbproxy.plot import main as plot_main
from lbproxy.train.report import METRIC_FIELDS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained network in the shipped-model format: evaluation must not care how good it is."""
    import torch

    from lbproxy.rl.checkpoint import save_model
    from lbproxy.rl.network import QNetwork

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "dqn_final.pth"
    save_model(path, QNetwork(hidden=16), {"note": "untrained, for tests"})
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    s = Settings(
        mode="evaluate",
        model=model_path,
        episodes=2,
        episode_decisions=64,
        scenario="heterogeneous",
        run_dir=run_dir,
        seed=3,
    )
    assert run_evaluate(s) == 0
    return run_dir


def test_table_has_every_policy(evaluated: Path) -> None:
    from lbproxy.policies import HEURISTICS

    report = json.loads((evaluated / "eval" / "evaluation.json").read_text())
    names = [r["policy"] for r in report["policies"]]
    assert names == ["dqn", *HEURISTICS, "sed_oracle"]
    assert report["eval_seeds"] == [EVAL_SEED_BASE + 3, EVAL_SEED_BASE + 4]
    md = (evaluated / "eval" / "evaluation.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    for r in report["policies"]:
        assert r["p999_ms"] >= r["p99_ms"] >= r["p50_ms"] > 0
        assert r["requests"] == 2 * 64
    oracle = next(r for r in report["policies"] if r["policy"] == "sed_oracle")
    assert oracle["accuracy"] == pytest.approx(1.0)


def test_same_traffic_for_every_policy(model_path: Path, tmp_path: Path) -> None:
    """Evaluating twice gives identical numbers: episodes are pure functions of their seeds."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        s = Settings(
            mode="evaluate", model=model_path, episodes=1, episode_decisions=32, scenario="class_skew", run_dir=d
        )
        assert run_evaluate(s) == 0
    ra = json.loads((a / "eval" / "evaluation.json").read_text())["policies"]
    rb = json.loads((b / "eval" / "evaluation.json").read_text())["policies"]
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in ra]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in rb]


def test_plot_writes_pngs(evaluated: Path) -> None:
    metrics = evaluated / "metrics" / "training_metrics.csv"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(METRIC_FIELDS)]
    for k in range(1, 31):
        ep, phase = 10 * k, 1 + (k - 1) // 10
        lines.append(f"{ep},{phase},{-1 + k / 60},{0.3 - k / 200},{0.4 + k / 100},5,4,{30 - k / 2},0,0.1,0.5,{ep},1")
    metrics.write_text("\n".join(lines) + "\n")
    assert plot_main([str(evaluated)]) == 0
    for name in ("learning_curves.png", "evaluation.png"):
        png = evaluated / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_missing_model(tmp_path: Path) -> None:
    proc = _cli("--mode", "evaluate", "--model", str(tmp_path / "nope.pth"), "--run-dir", str(tmp_path))
    _one_line_error(proc, "nope.pth", "--mode train")


def test_cli_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    proc = _cli("--mode", "evaluate", "--model", str(bad), "--run-dir", str(tmp_path))
    _one_line_error(proc, "corrupt.pth")


def test_cli_mismatched_model(tmp_path: Path) -> None:

    path = tmp_path / "old.pth"
    torch.save({"format": "lbproxy-dqn/1", "state_dict": {"body.0.weight": torch.zeros(4, 4)}}, path)
    proc = _cli("--mode", "evaluate", "--model", str(path), "--run-dir", str(tmp_path))
    _one_line_error(proc, "lbproxy-dqn/1")


def test_cli_bad_scenario(tmp_path: Path, model_path: Path) -> None:
    proc = _cli("--mode", "evaluate", "--model", str(model_path), "--scenario", "nowhere", "--run-dir", str(tmp_path))
    _one_line_error(proc, "nowhere")


def test_cli_plot_without_metrics(tmp_path: Path) -> None:
    proc = _cli("plot", str(tmp_path))
    _one_line_error(proc, "training_metrics.csv")
