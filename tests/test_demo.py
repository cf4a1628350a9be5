"""`lbproxy demo`: its pure helpers, and the real thing end to end (quick mode, scaled down) — backends,
live-training proxy, Locust, the comparison of every policy and the report — leaving nothing running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from lbproxy.demo.locust_runs import locust_args
from lbproxy.demo.metrics import parse_snapshot, quantile_from_buckets
from lbproxy.demo.plan import COMPARE_POLICIES
from loadgen import total_duration_s
from tests.support import REPO

DEMO_LIMIT_S = 170.0
"""The quick demo at duration scale 0.5 takes ~50 s here; the test must stay well under 3 minutes."""


def test_quantile_from_buckets_interpolates_like_prometheus() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(0.01)
    assert quantile_from_buckets(buckets, 0.7) == pytest.approx(0.01 + 0.09 * 0.5)
    assert quantile_from_buckets({0.1: 0.0, float("inf"): 0.0}, 0.99) != quantile_from_buckets(buckets, 0.99)


def test_parse_snapshot_sums_requests_and_buckets_over_labels() -> None:
    text = (
        "# HELP lbproxy_requests_total Requests\n# TYPE lbproxy_requests_total counter\n"
        'lbproxy_requests_total{backend="a:1",code="200"} 5.0\n'
        'lbproxy_requests_total{backend="a:1",code="500"} 1.0\n'
        'lbproxy_requests_total{backend="b:2",code="200"} 4.0\n'
        "# TYPE lbproxy_request_duration_seconds histogram\n"
        'lbproxy_request_duration_seconds_bucket{backend="a:1",le="0.01"} 2.0\n'
        'lbproxy_request_duration_seconds_bucket{backend="a:1",le="+Inf"} 6.0\n'
        'lbproxy_request_duration_seconds_bucket{backend="b:2",le="0.01"} 3.0\n'
        'lbproxy_request_duration_seconds_bucket{backend="b:2",le="+Inf"} 4.0\n'
        "# TYPE lbproxy_reward gauge\nlbproxy_reward -0.25\n"
        "# TYPE lbproxy_learner_updates_total counter\nlbproxy_learner_updates_total 7.0\n"
    )
    snap = parse_snapshot(text, t=1.5)
    assert (snap.t, snap.requests) == (1.5, 10.0)
    assert snap.per_backend == {"a:1": 6.0, "b:2": 4.0}
    assert snap.buckets == {0.01: 5.0, float("inf"): 10.0}
    assert snap.gauges == {"lbproxy_reward": -0.25, "lbproxy_learner_updates_total": 7.0}


def test_locust_args_squeeze_the_three_phases() -> None:
    args, schedule = locust_args(30.0, seed=3)
    assert total_duration_s(schedule) == pytest.approx(30.0)
    assert args[args.index("--lb-seed") + 1] == "3"
    assert all(p.spawn_rate <= p.users * 4 for p in schedule)


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lbproxy", "demo", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _assert_nothing_left(run_dir: Path) -> None:
    """No process mentions the run directory (proxies, Locust, Prometheus) and no backend port answers."""
    time.sleep(0.5)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            assert str(run_dir) not in cmdline or "pytest" in cmdline, f"left running: {pid} {cmdline}"
    cluster = tomllib.loads((run_dir / "cluster.toml").read_text())
    for server in cluster["server"]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", server["port"])) != 0, f"backend {server['name']} still listening"


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path) -> None:
    for args in (["--duration-scale", "0"], ["--model", str(tmp_path / "missing.pth")]):
        proc = _demo(*args, "--run-dir", str(tmp_path / "run"))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        assert out.count("\n") == 1 and "Traceback" not in out


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    proc = _demo("--quick", "--duration-scale", "0.5", "--run-dir", str(run_dir), "--seed", "1", "--with-prometheus")
    try:
        out, _ = proc.communicate(timeout=DEMO_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert "[" in out and "train phase 1/3" in out, "expected progress lines"
    report = (run_dir / "report.md").read_text()
    rows: dict[str, str] = {}
    for line in report.splitlines():
        if line.startswith("| "):  # the first table (requests, latency); later ones (traffic share) repeat names
            rows.setdefault(line.split("|")[1].strip(), line)
    for policy in COMPARE_POLICIES:
        assert policy in rows, f"{policy} missing from the report:\n{report}"
        assert int(rows[policy].split("|")[2]) > 0, f"{policy} served no requests:\n{report}"
    assert (run_dir / "train" / "dqn_final.pth").is_file()
    assert (run_dir / "comparison.png").stat().st_size > 0
    assert f"report: {run_dir / 'report.md'}" in out
    _assert_nothing_left(run_dir)


@pytest.mark.slow
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    proc = _demo("--quick", "--run-dir", str(run_dir))
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "training the DQN live" in line or time.monotonic() > deadline:
                break
        time.sleep(2)  # Locust and the training proxy are running now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    _assert_nothing_left(run_dir)
