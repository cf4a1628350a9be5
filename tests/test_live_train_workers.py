"""`lbproxy --mode train --workers 2` on real processes (lbproxy/train/live_workers.py): both workers
route and feed the one learner, the supervisor writes the run's rows, checkpoints and final model from
their episodes and stops after the last; the run resumes with one worker and again with two; a killed
worker is replaced mid-run and SIGTERM still ends it with a checkpoint and exit 0."""

from __future__ import annotations

import csv
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Proc, start_backend, start_proxy
from test_dqn_live import TINY_TRAIN, finish, wait_exit
from test_workers import fetch, get_json, is_dead, per_worker, wait_for

pytestmark = pytest.mark.slow  # three trainer runs of a 2-worker proxy: ~60 s on 2 busy cores

EPISODE = ("--episode-decisions", "40", "--checkpoint-every", "2", "--metrics-every", "3", "--keep-checkpoints", "0")


@pytest.fixture(scope="module")
def backends() -> Iterator[list[str]]:
    procs = [start_backend(workers=4), start_backend(workers=4, speed=0.5)]
    try:
        yield [p.url for p in procs]
    finally:
        for p in procs:
            finish(p)


def start_train(urls: list[str], run_dir: Path, workers: int, *extra: str) -> Proc:
    live = ("--env", "live", "--run-dir", str(run_dir), "--device", "cpu", "--health-interval-s", "0")
    return start_proxy(urls, *live, "--workers", str(workers), *EPISODE, *TINY_TRAIN, *extra, mode="train")


class Traffic:
    """Requests on fresh connections (SO_REUSEPORT spreads connections) from 4 threads until stopped
    or the trainer exits."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.done = threading.Event()
        self.ok = 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(4)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        while not self.done.is_set() and self.proc.popen.poll() is None:
            try:
                if fetch(self.proc.port) == 200:
                    self.ok += 1
            except OSError:
                pass

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics" / "training_metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def no_model(worker: dict[str, Any]) -> int:
    """A worker's decisions routed by the fallback because its engine served no model."""
    return int(worker["policy_state"]["fallbacks"]["no_model"])


def served_version(worker: dict[str, Any]) -> int:
    """The weights versions a worker's engine has served (0: none, the fallback routes)."""
    return int(worker["policy_state"]["model_version"])


def checkpoint(run_dir: Path, episode: int) -> dict[str, object]:
    from lbproxy.rl.checkpoint import load_checkpoint

    return dict(load_checkpoint(run_dir / "checkpoints" / f"dqn_episode_{episode:04d}.pth"))


def test_two_workers_train_one_model_and_the_run_resumes_with_any_worker_count(
    tmp_path: Path, backends: list[str]
) -> None:
    run_dir = tmp_path / "run"
    trainer = start_train(backends, run_dir, 2, "--episodes", "8")
    # From scratch the fresh weights route nothing: until the learner's first published update (none
    # before any traffic) the workers serve no model and route by the fallback, as one process does.
    assert [served_version(w) for w in per_worker(trainer)] == [0, 0]
    traffic = Traffic(trainer)
    try:
        state: dict[str, list[int]] = {}

        def both_fed() -> bool:
            state.update(get_json(trainer.admin_url + "/admin/backends")["learner"])
            return all(n > 0 for n in state["fed_per_slot"])

        wait_for("both workers' transitions in the one learner", both_fed, timeout_s=60)
        assert wait_exit(trainer, 90) == 0  # it stops itself after episode 8
    finally:
        traffic.stop()
    log = finish(trainer)
    assert "Traceback" not in log, log[-3000:]
    assert "lbproxy train (live, 2 workers): stopped after episode 8" in log
    assert [r["episode"] for r in rows(run_dir)] == ["3", "6", "8"]
    assert all(r["phase"] == "live" for r in rows(run_dir))
    first = checkpoint(run_dir, 8)
    assert int(first["decisions"]) >= 8 * 40  # both workers' decisions: the ε position of the whole run
    assert len(checkpoint(run_dir, 4)["window"]) == 1 and first["window"] == []
    from lbproxy.rl.checkpoint import load_model

    net, meta = load_model(run_dir / "dqn_final.pth", device="cpu")
    assert net.hidden == 16 and meta["episodes"] == 8

    # The same run resumed with ONE worker: the checkpoint does not depend on the worker count.
    trainer = start_train(backends, run_dir, 1, "--episodes", "10", "--resume")
    traffic = Traffic(trainer)
    try:
        assert wait_exit(trainer, 90) == 0
    finally:
        traffic.stop()
    assert "Traceback" not in finish(trainer)
    assert [r["episode"] for r in rows(run_dir)] == ["3", "6", "8", "9", "10"]
    second = checkpoint(run_dir, 10)
    assert int(second["decisions"]) > int(first["decisions"])
    learner_2 = second["learner"]
    learner_1 = first["learner"]
    assert isinstance(learner_1, dict) and isinstance(learner_2, dict)
    assert learner_2["updates"] > learner_1["updates"]  # the optimizer state went on, not restarted

    # And with two again, open-ended: a worker killed mid-run is replaced, SIGTERM ends the run cleanly.
    trainer = start_train(backends, run_dir, 2, "--episodes", "1000", "--resume")
    assert all(served_version(w) >= 1 for w in per_worker(trainer)), "resumed weights route at once"
    traffic = Traffic(trainer)
    try:
        victim = next(w for w in per_worker(trainer) if w["worker"] == 0)
        os.kill(int(victim["pid"]), signal.SIGKILL)
        wait_for("worker 0 dead", lambda: is_dead(int(victim["pid"])))

        def replaced() -> bool:
            return {w["worker"]: w["pid"] for w in per_worker(trainer)}.get(0) not in (None, victim["pid"])

        wait_for("a new worker 0", replaced, timeout_s=60)
        # Resumed weights route from the first request, in the replaced worker too.
        assert all(no_model(w) == 0 for w in per_worker(trainer))
        wait_for(
            "two more episodes",
            lambda: len(rows(run_dir)) > 5 or (run_dir / "checkpoints" / "dqn_episode_0012.pth").is_file(),
            timeout_s=60,
        )
        trainer.popen.send_signal(signal.SIGTERM)
        assert wait_exit(trainer, 60) == 0
    finally:
        traffic.stop()
    log = finish(trainer)
    assert "Traceback" not in log, log[-3000:]
    assert "restarting it" in log
    last = sorted((run_dir / "checkpoints").glob("dqn_episode_*.pth"))[-1]
    assert int(last.stem.split("_")[-1]) >= 12
