"""Simulator training workflow: exact resume, metrics CSV, checkpoints, final model, Ctrl-C, CLI errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lbproxy.config import ConfigError, Settings
from lbproxy.rl.checkpoint import latest_checkpoint
from lbproxy.train.report import METRIC_FIELDS
from lbproxy.train.run_dir import ERROR_LOG
from lbproxy.train.sim import run_train_sim
from lbproxy.train.stop import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parent.parent

# Tiny but real: every part of the workflow runs (learning starts after 2 episodes).
TINY: dict[str, Any] = {
    "mode": "train",
    "env": "sim",
    "scenario": "heterogeneous",
    "episodes": 30,
    "episode_decisions": 32,
    "checkpoint_every": 5,
    "metrics_every": 10,
    "buffer_size": 2000,
    "learning_starts": 64,
    "batch_size": 16,
    "hidden": 16,
    "target_update_every": 20,
    "updates_per_decision": 0.25,
    "device": "cpu",
    "eps_fraction": 0.9,
    "keep_checkpoints": 0,
    "seed": 7,
}


def tiny(run_dir: Path, **extra: Any) -> Settings:
    return Settings(**{**TINY, "run_dir": run_dir, **extra})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(run_dir / "dqn_final.pth", map_location="cpu", weights_only=True)
    return payload["state_dict"]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics" / "training_metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    assert run_train_sim(tiny(run_dir)) == 0
    return run_dir


def test_resume_gives_identical_weights(full_run: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    assert run_train_sim(tiny(split, keep_checkpoints=2), stop_after=15) == EXIT_INTERRUPTED
    assert latest_checkpoint(split) == split / "checkpoints" / "dqn_episode_0015.pth"
    # Only the newest two are kept (keep_checkpoints does not change the result).
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == [
        "dqn_episode_0010.pth",
        "dqn_episode_0015.pth",
    ]
    assert not (split / "dqn_final.pth").exists()
    # Why the run stopped is in its error log (an uninterrupted run has none).
    assert "stopped after episode 15" in (split / ERROR_LOG).read_text()
    assert not (full_run / ERROR_LOG).exists()
    assert run_train_sim(tiny(split, resume=True)) == 0
    a, b = final_weights(full_run), final_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics rows are the same too (apart from wall time).
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(full_run)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(split)]


def test_resume_mid_metrics_window(full_run: Path, tmp_path: Path) -> None:
    """A checkpoint between two CSV rows (episode 13) must carry the partial window."""
    split = tmp_path / "split13"
    assert run_train_sim(tiny(split), stop_after=13) == EXIT_INTERRUPTED
    assert run_train_sim(tiny(split, resume=True)) == 0
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(full_run)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(split)]


def test_metrics_csv_rows_every_10_episodes(full_run: Path) -> None:
    rows = csv_rows(full_run)
    assert [int(r["episode"]) for r in rows] == [10, 20, 30]
    assert list(rows[0].keys()) == list(METRIC_FIELDS)
    # Curriculum: 30 episodes = thirds of 10, phases 1..3.
    assert [r["phase"] for r in rows] == ["1", "2", "3"]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["p99_ms"]) >= float(r["p50_ms"]) > 0
        assert float(r["mean_reward"]) < 0
    assert float(rows[-1]["loss"]) > 0  # learning started
    assert float(rows[0]["epsilon"]) > float(rows[-1]["epsilon"])


def test_checkpoints_at_the_right_episodes(full_run: Path) -> None:
    names = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert names == [f"dqn_episode_{e:04d}.pth" for e in range(5, 31, 5)]
    state = torch.load(full_run / "checkpoints" / "dqn_episode_0010.pth", weights_only=True)
    assert state["episode"] == 10
    assert {"learner", "replay", "agent", "rng", "fingerprint"} <= state.keys()


def test_final_model_loads_with_weights_only(full_run: Path) -> None:
    from lbproxy.rl.checkpoint import load_model
    from lbproxy.rl.network import ARCH_NAME

    payload = torch.load(full_run / "dqn_final.pth", weights_only=True)
    assert payload["arch"]["name"] == ARCH_NAME
    net, meta = load_model(full_run / "dqn_final.pth")
    assert meta["episodes"] == 30
    assert net.hidden == 16


def test_resume_with_changed_settings_is_refused(full_run: Path, tmp_path: Path) -> None:
    split = tmp_path / "mismatch"
    assert run_train_sim(tiny(split), stop_after=5) == EXIT_INTERRUPTED
    with pytest.raises(ConfigError, match="gamma"):
        run_train_sim(tiny(split, resume=True, gamma=0.9))


def test_new_run_refuses_existing_run_dir(full_run: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        run_train_sim(tiny(full_run))


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_train_sim(tiny(tmp_path / "empty", resume=True))


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def test_cli_bad_scenario_is_one_line(tmp_path: Path) -> None:
    proc = _cli("--mode", "train", "--env", "sim", "--scenario", "no_such_scenario", "--run-dir", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_scenario" in lines[0], proc.stderr


def test_cli_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = _cli("--mode", "train", "--env", "sim", "--resume", "--run-dir", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_sigint_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    args = [sys.executable, "-m", "lbproxy", "--mode", "train", "--env", "sim", "--run-dir", str(run_dir)]
    for key in ("episode_decisions", "buffer_size", "learning_starts", "batch_size", "hidden", "seed"):
        args += ["--" + key.replace("_", "-"), str(TINY[key])]
    args += ["--episodes", "100000", "--metrics-every", "1", "--checkpoint-every", "100000", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv_path = run_dir / "metrics" / "training_metrics.csv"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "--resume" in err
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    state = torch.load(ckpt, weights_only=True)
    assert state["episode"] >= 2
    rows = csv_rows(run_dir)
    assert int(rows[-1]["episode"]) == state["episode"]


def test_cli_corrupt_checkpoint_on_resume_is_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "dqn_episode_0100.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated zip, not a checkpoint")
    proc = _cli("--mode", "train", "--env", "sim", "--resume", "--run-dir", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dqn_episode_0100.pth" in lines[0], proc.stderr


def test_generated_clusters_train_and_resume_exactly(tmp_path: Path) -> None:
    """`--scenario generated` (the shipped model's training distribution): a new cluster per episode, the
    same CSV / checkpoint / dqn_final.pth contract, and an exact resume across the split."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    gen = {"scenario": "generated", "episodes": 12, "checkpoint_every": 4, "metrics_every": 4, "gamma": 0.0}
    assert run_train_sim(tiny(whole, **gen)) == 0
    assert run_train_sim(tiny(split, **gen), stop_after=6) == EXIT_INTERRUPTED
    assert run_train_sim(tiny(split, resume=True, **gen)) == 0
    a, b = final_weights(whole), final_weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["episode"] for r in csv_rows(whole)] == ["4", "8", "12"]
    with pytest.raises(ConfigError, match="scenario"):
        run_train_sim(tiny(split, resume=True, **{**gen, "scenario": "curriculum"}))
