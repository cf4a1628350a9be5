"""Simulator training on Ray (`--actors N`, lbproxy/train/ray_sim.py): a 2-actor run through the CLI
writes the single-process layout, a split run resumes to the same weights, another actor count is
refused, Ctrl-C checkpoints and takes the command's local Ray with it, and without Ray `--actors` is
one line.

One local Ray serves most of the module (the trainer keeps a session it did not start): those runs go
through `lbproxy.cli.main` in this process and share Ray's worker processes, so only the first pays
their start-up. The Ctrl-C test runs the command in a subprocess, with its own local Ray."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the optional extra lbproxy[distributed] and is not installed")

from test_train import TINY, csv_rows, final_weights  # noqa: E402

from lbproxy.cli import main  # noqa: E402
from lbproxy.config import ConfigError, load_settings  # noqa: E402
from lbproxy.rl.checkpoint import latest_checkpoint, load_checkpoint, load_model  # noqa: E402
from lbproxy.train.ray_sim import RAY_MISSING  # noqa: E402
from lbproxy.train.sim import RAY_TRAIN_FORMAT, run_train_sim  # noqa: E402
from lbproxy.train.stop import EXIT_INTERRUPTED  # noqa: E402

pytestmark = pytest.mark.slow  # Ray's start-up: ~25 s for the module on an idle 2-vCPU machine

REPO = Path(__file__).resolve().parent.parent
RAY_TINY: dict[str, Any] = {**TINY, "episodes": 20, "actors": 2}
"""checkpoint_every 5 with 2 actors: the rounds end after episodes 2, 4, 5 | 7, 9, 10 | ... (cut at each
checkpoint)."""


def flags(run_dir: Path, **extra: Any) -> list[str]:
    out = []
    for key, value in {**RAY_TINY, "run_dir": run_dir, **extra}.items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole")
    assert main(flags(run_dir)) == 0
    return run_dir


def test_two_actors_write_the_single_process_layout(whole: Path) -> None:
    assert [r["episode"] for r in csv_rows(whole)] == ["10", "20"]
    assert float(csv_rows(whole)[-1]["loss"]) > 0 and int(csv_rows(whole)[-1]["updates"]) > 0
    names = sorted(p.name for p in (whole / "checkpoints").iterdir())
    assert names == [f"dqn_episode_{e:04d}.pth" for e in (5, 10, 15, 20)]
    state = load_checkpoint(whole / "checkpoints" / "dqn_episode_0010.pth")
    assert state["format"] == RAY_TRAIN_FORMAT and state["fingerprint"]["actors"] == 2
    net, meta = load_model(whole / "dqn_final.pth")
    assert net.hidden == 16 and meta["episodes"] == 20 and "--actors 2" in meta["trained_by"]


def test_split_run_resumes_to_the_same_weights(whole: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    settings = load_settings({**RAY_TINY, "run_dir": split})
    # A stop after episode 6 lands mid-round (episodes 6 and 7): the checkpoint is the round's end, mid-row.
    assert run_train_sim(settings, stop_after=6) == EXIT_INTERRUPTED
    assert load_checkpoint(split / "checkpoints" / "dqn_episode_0007.pth")["episode"] == 7
    assert main([*flags(split), "--resume"]) == 0
    a, b = final_weights(whole), final_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(whole)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in csv_rows(split)]


def test_generated_clusters_train_on_two_actors(tmp_path: Path) -> None:
    """`--scenario generated` (the shipped model's distribution): a new cluster an episode, 16-row states."""
    run_dir = tmp_path / "generated"
    gen = {"scenario": "generated", "episodes": 6, "checkpoint_every": 3, "metrics_every": 3, "gamma": 0.0}
    assert main(flags(run_dir, **gen)) == 0
    assert [r["episode"] for r in csv_rows(run_dir)] == ["3", "6"]
    assert load_checkpoint(run_dir / "checkpoints" / "dqn_episode_0006.pth")["fingerprint"]["width"] == 16


@pytest.mark.parametrize(("actors", "says"), [(3, "actors=2, now actors=3"), (0, "--actors 2, now --actors 0")])
def test_resume_with_another_actor_count_is_refused(
    whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], actors: int, says: str
) -> None:
    run_dir = tmp_path / "other"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = whole / "checkpoints" / "dqn_episode_0010.pth"
    (run_dir / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    assert main([*flags(run_dir, actors=actors), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


def test_actors_with_live_training_is_one_line() -> None:
    with pytest.raises(ConfigError, match="--actors"):
        load_settings({"mode": "train", "env": "live", "actors": 2, "backends": "http://127.0.0.1:9"})


def _in_session(sid: int) -> list[str]:
    """Commands of the processes still in session `sid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
            found.append(stat.parent.name)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_checkpoints_and_the_local_ray_goes_with_the_command(tmp_path: Path) -> None:
    """The command's own local Ray: Ctrl-C (SIGINT to the process group, as a terminal sends it) ends
    the round, saves it, exits 130 with the resume command; no process of the session stays behind."""
    run_dir = tmp_path / "ctrl_c"
    args = flags(run_dir, episodes=100_000, metrics_every=1, checkpoint_every=100_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbproxy", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    csv_path = run_dir / "metrics" / "training_metrics.csv"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "--resume" in err and "--actors 2" in err
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and int(csv_rows(run_dir)[-1]["episode"]) == load_checkpoint(ckpt)["episode"]
    deadline = time.monotonic() + 10
    while _in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _in_session(proc.pid) == []


def test_actors_without_ray_is_one_line(tmp_path: Path) -> None:
    """Ray made unimportable by a `ray` module first on the path that raises ImportError."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('ray is blocked for this test')\n")
    path = [str(shim), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "lbproxy", *flags(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lbproxy: {RAY_MISSING}"], proc.stderr


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port} (Connection refused); start the cluster"),
        ("ray://127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port} (Connection refused); start the cluster"),
        ("not-an-address", "expected auto, HOST:PORT or ray://HOST:PORT"),
    ],
)
def test_a_ray_address_nobody_answers_at_is_one_line(tmp_path: Path, address: str, says: str) -> None:
    """Refused at once, not after Ray's own minute of retries (the subprocess timeout bounds it)."""
    from support import free_port

    port = free_port()  # bound and released: nothing listens there
    address, says = address.format(port=port), says.format(port=port)
    proc = subprocess.run(
        [sys.executable, "-m", "lbproxy", *flags(tmp_path / "run", actors=1, ray_address=address)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lbproxy: --ray-address {address}: {says}"), proc.stderr


def test_the_ray_training_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/ray_training.py end to end with tiny settings (it starts its own local Ray, beside
    this module's, as the Ctrl-C test's command does). Here rather than in test_benchmarks.py: the
    Ray runs of the suite stay in one file, so one test worker runs them one after another."""
    out = tmp_path / "ray_training.md"
    script = REPO / "benchmarks" / "ray_training.py"
    args = ["--episodes", "2", "--rounds", "1", "--wall-episodes", "0", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "machine" in text.lower() and "transitions/s" in text
