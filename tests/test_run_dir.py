"""The run directory both trainers share: start/resume checks, CSV rows, the error log."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from lbproxy.config import ConfigError
from lbproxy.train.report import METRIC_FIELDS, metrics_row
from lbproxy.train.run_dir import ERROR_LOG, RunDir

METRICS = {
    "mean_reward": -1.23456789,
    "gini": 0.1,
    "accuracy": 0.5,
    "mean_ms": 12.3456789,
    "p50_ms": 10.0,
    "p99_ms": 99.9,
    "error_rate": 0.0,
    "loss": float("nan"),
}


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.open(resume=False, fmt="lbproxy-x/2", trainer="x-training") is None
    run.save_checkpoint(3, {"format": "lbproxy-x/2", "episode": 3})
    with pytest.raises(ConfigError, match="already holds a training run; pass --resume"):
        run.open(resume=False, fmt="lbproxy-x/2", trainer="x-training")


def test_resume_checks_are_one_line_errors(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint in"):
        run.open(resume=True, fmt="lbproxy-x/2", trainer="x-training")
    run.save_checkpoint(1, {"format": "lbproxy-x/1", "episode": 1})
    with pytest.raises(ConfigError, match=r"written by an older lbproxy \(lbproxy-x/1\)"):
        run.open(resume=True, fmt="lbproxy-x/2", trainer="x-training")
    run.save_checkpoint(2, {"format": "lbproxy-live/1", "episode": 2})
    with pytest.raises(ConfigError, match="is not a x-training checkpoint") as info:
        run.open(resume=True, fmt="lbproxy-x/2", trainer="x-training")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"incomplete or incompatible.*KeyError"), RunDir.restoring(tmp_path):
        _ = dict[str, int]()["learner"]


def test_resume_returns_the_newest_checkpoint_and_drops_later_csv_rows(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    writer = run.metrics_writer()
    for episode in (10, 20, 30):
        writer.write(metrics_row(episode, 1, METRICS, epsilon=0.5, updates=episode, wall_s=1.0))
    writer.close()
    run.save_checkpoint(10, {"format": "lbproxy-x/2", "episode": 10, "w": torch.ones(2)})
    run.save_checkpoint(20, {"format": "lbproxy-x/2", "episode": 20, "w": torch.zeros(2)})
    (run.checkpoints / ".dqn_episode_0030.pth.abc123.tmp").write_bytes(b"cut short")
    opened = run.open(resume=True, fmt="lbproxy-x/2", trainer="x-training")
    assert opened is not None
    path, payload = opened
    assert path.name == "dqn_episode_0020.pth" and payload["episode"] == 20
    assert [line.split(",")[0] for line in run.metrics_csv.read_text().splitlines()] == ["episode", "10", "20"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["dqn_episode_0010.pth", "dqn_episode_0020.pth"]


def test_metrics_row_has_every_column_in_one_format() -> None:
    row = metrics_row(40, "live", METRICS, epsilon=0.123456, updates=7, wall_s=12.345)
    assert list(row) == list(METRIC_FIELDS)
    assert row["mean_reward"] == "-1.23457" and row["mean_ms"] == "12.3457" and row["loss"] == "nan"
    assert (row["epsilon"], row["updates"], row["wall_s"]) == ("0.1235", 7, "12.3")


def test_error_log_keeps_warnings_and_errors_of_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = RunDir(tmp_path).log
    assert not (tmp_path / ERROR_LOG).exists(), "created by the first entry"
    with warnings.catch_warnings(record=True) as caught, log.capturing():
        warnings.simplefilter("always")
        log.warning("lbproxy: stopped after episode 5 (SIGTERM)")
        logging.getLogger("lbproxy.guardrail").warning("guardrail: dqn arm worse, routing by the fallback")
        logging.getLogger("lbproxy.guardrail").info("an info line is not kept")
        warnings.warn("a runtime warning during training", RuntimeWarning, stacklevel=1)
        try:
            raise ValueError("update failed")
        except ValueError as exc:
            log.error("lbproxy: learner stopped (ValueError: update failed)", exc)
    assert [str(w.message) for w in caught] == ["a runtime warning during training"], "still shown as before"
    logging.getLogger("lbproxy.guardrail").warning("after the run: not kept")
    text = (tmp_path / ERROR_LOG).read_text()
    assert "WARNING lbproxy: stopped after episode 5 (SIGTERM)" in text
    assert "WARNING lbproxy.guardrail: guardrail: dqn arm worse" in text
    assert "RuntimeWarning: a runtime warning during training" in text
    assert "ERROR lbproxy: learner stopped" in text and 'raise ValueError("update failed")' in text
    assert "info line" not in text and "after the run" not in text
    err = capsys.readouterr().err
    assert "stopped after episode 5" in err and "learner stopped" in err and "Traceback" not in err
