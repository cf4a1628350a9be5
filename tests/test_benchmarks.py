"""Every benchmark script runs end to end with tiny settings and writes its result file.

The numbers are not checked (no timing assertions): this keeps the committed scripts runnable, so
each result under benchmarks/results/ stays reproducible with the command it records.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CPU_ONLY = {
    "decision_cost": ["--iterations", "2000", "--trials", "1"],
    "decision_latency": ["--repeats", "50"],
    "learner_loop_lag": ["--seconds", "0.3"],
    "learner_step": ["--trials", "1", "--trial-budget-s", "0.05"],
    "loop_bookkeeping": ["--trials", "1", "--iterations", "50"],
    "sim_throughput": ["--decisions", "5000", "--repeats", "1"],
    "replicas": [
        "--seeds",
        "0",
        "--episodes",
        "3",
        "--eval-episodes",
        "2",
        "--replicas",
        "1",
        "2",
        "--heuristics",
        "least_conn",
    ],
}
WITH_WRK = {
    "backend_overhead": ["--duration", "1", "--rounds", "1"],
    "dqn_proxy": ["--duration", "1", "--rounds", "1", "--no-online"],
}


def run_script(name: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CPU_ONLY))
def test_cpu_benchmark_runs(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.md"
    run_script(name, [*CPU_ONLY[name], "--out", str(out)])
    text = out.read_text()
    assert "machine" in text.lower() and "|" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
@pytest.mark.parametrize("name", sorted(WITH_WRK))
def test_wrk_benchmark_runs(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.md"
    run_script(name, [*WITH_WRK[name], "--out", str(out)])
    assert "| round_robin |" in out.read_text() or "vs bare" in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
def test_proxy_overhead_runs() -> None:
    proc = run_script("proxy_overhead", ["--duration-s", "1", "--rounds", "1", "--no-write"])
    assert "lbproxy round_robin / minimal" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
def test_workers_runs(tmp_path: Path) -> None:
    out = tmp_path / "workers.md"
    run_script("workers", ["--duration", "1", "--rounds", "1", "--out", str(out)])
    text = out.read_text()
    assert "| 1 | 0 |" in text and "| 2 | 0,1 |" in text and "What limits the figure" in text


@pytest.mark.slow
def test_learning_quality_runs(tmp_path: Path) -> None:
    out = tmp_path / "learning_quality.md"
    run_script(
        "learning_quality",
        [
            "--seeds",
            "0",
            "--episodes",
            "3",
            "--scenarios",
            "homogeneous",
            "--eval-episodes",
            "1",
            "--episode-decisions",
            "16",
            "--run-root",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
    )
    assert "homogeneous" in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed (dev extra)")
def test_live_foreign_runs(tmp_path: Path) -> None:
    out = tmp_path / "live_foreign.md"
    run_script(
        "live_foreign",
        [
            *("--workers", "1,3", "--duration-s", "1", "--warmup-s", "0.5", "--rounds", "1", "--grace-s", "5"),
            *("--policies", "least_conn,round_robin,no_such_policy", "--out", str(out)),
        ],
    )
    text = out.read_text()
    assert "| least_conn |" in text and "| round_robin |" in text and "skipped no_such_policy" in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed (dev extra)")
def test_live_train_foreign_runs(tmp_path: Path) -> None:
    out = tmp_path / "live_train_foreign.md"
    run_script(
        "live_train_foreign",
        [
            *("--workers", "1,3", "--train-s", "6", "--slice-s", "3", "--eval-s", "1", "--warmup-s", "0.5"),
            *("--rounds", "1", "--grace-s", "5", "--policies", "least_conn", "--run-dir", str(tmp_path / "run")),
            *("--out", str(out)),
        ],
    )
    text = out.read_text()
    assert "| dqn_trained |" in text and "| least_conn |" in text and "| 3-6 |" in text
    assert (tmp_path / "run" / "dqn_final.pth").is_file()
