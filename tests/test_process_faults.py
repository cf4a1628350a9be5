"""Process faults (SECURITY.md, "Process faults"), on real processes: SIGTERM drains responses that are
still streaming (none cut) and stops accepting; SIGTERM in simulator training checkpoints and exits 143,
and `--resume` continues from that checkpoint; SIGKILLs at random moments never leave a torn checkpoint
visible and the resumed run ends bit-identical to an uninterrupted one; a dying learner (thread or
process) is logged once and counted, and requests keep being routed.

(Live training's SIGTERM -> drain, checkpoint, exit 0 -> --resume is tests/test_dqn_live.py::
test_train_checkpoint_resume_serve_round_trip.)"""

from __future__ import annotations

import asyncio
import csv
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import LOOPBACK, REPO, Proc, running, start_backend, start_proxy
from test_proxy_faults import _accepts

from lbproxy.rl.checkpoint import CHECKPOINT_RE, latest_checkpoint, load_checkpoint
from lbproxy.train.sim import TRAIN_FORMAT
from lbproxy.train.stop import EXIT_TERMINATED


# --- serve: SIGTERM drains streaming responses ------------------------------------------------------------
class SlowStreamServer:
    """A raw-socket HTTP/1.1 backend whose answers take PARTS x GAP_S to stream: `/chunked` in chunks,
    `/sized` with a Content-Length. `streaming` counts responses whose first body bytes are out."""

    PARTS = 12
    GAP_S = 0.15

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.streaming = 0
        self.finished = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @classmethod
    def part(cls, i: int) -> bytes:
        return f"part {i:02d} of a response that must arrive whole\n".encode()

    @classmethod
    def body(cls) -> bytes:
        return b"".join(cls.part(i) for i in range(cls.PARTS))

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            request_line = reader.readline()
            while reader.readline() not in (b"\r\n", b""):
                pass  # the headers: nothing in them changes the answer
            chunked = request_line.split(b" ")[1].startswith(b"/chunked")
            head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(self.body())}\r\n\r\n"
            conn.sendall(head.encode())
            for i in range(self.PARTS):
                part = self.part(i)
                conn.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                if i == 0:
                    with self._lock:
                        self.streaming += 1
                time.sleep(self.GAP_S)
            if chunked:
                conn.sendall(b"0\r\n\r\n")
            with self._lock:
                self.finished += 1

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for t in self._threads:
            t.join(10)


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, decoded body) of one HTTP/1.1 response; raises if the connection ends early."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the head: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            while b"\r\n" not in rest:
                chunk = sock.recv(65536)
                assert chunk, f"cut inside a chunk size line after {len(body)} bytes"
                rest += chunk
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                assert chunk, f"cut mid-chunk after {len(body)} bytes"
                rest += chunk
            if size == 0:
                return head, body
            body, rest = body + rest[:size], rest[size + 2 :]
    length = int(next(line for line in lower.split(b"\r\n") if line.startswith(b"content-length:")).split(b":")[1])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, f"cut after {len(rest)} of {length} bytes"
        rest += chunk
    return head, rest[:length]


def test_sigterm_drains_streaming_responses_and_stops_accepting() -> None:
    upstream = SlowStreamServer()
    try:
        proxy = start_proxy([upstream.url], "--health-interval-s", "0")
        with running(proxy):
            results: dict[str, tuple[bytes, bytes] | BaseException] = {}

            def fetch(path: str) -> None:
                try:
                    with socket.create_connection((LOOPBACK, proxy.port), timeout=30) as s:
                        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        results[path] = _read_response(s)
                except BaseException as exc:  # reported by the assertions below
                    results[path] = exc

            clients = [threading.Thread(target=fetch, args=(p,)) for p in ("/chunked", "/sized")]
            for t in clients:
                t.start()
            deadline = time.monotonic() + 20
            while upstream.streaming < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert upstream.streaming == 2 and upstream.finished == 0  # both mid-response now
            proxy.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _accepts(proxy.port):
                time.sleep(0.02)
            assert not _accepts(proxy.port)  # stopped accepting ...
            assert upstream.finished < 2 and proxy.popen.poll() is None  # ... while still streaming
            for t in clients:
                t.join(30)
            assert proxy.popen.wait(30) == 0
        for path in ("/chunked", "/sized"):
            got = results[path]
            assert not isinstance(got, BaseException), (path, got)
            assert got[0].startswith(b"HTTP/1.1 200") and got[1] == SlowStreamServer.body(), path
    finally:
        upstream.close()


# --- simulator training: SIGTERM, SIGKILL ----------------------------------------------------------------
TRAIN_ARGS = [
    "--mode", "train", "--env", "sim", "--scenario", "heterogeneous", "--episode-decisions", "32",
    "--buffer-size", "4000", "--learning-starts", "64", "--batch-size", "16", "--hidden", "16",
    "--target-update-every", "20", "--seed", "7", "--device", "cpu", "--metrics-every", "1",
    "--checkpoint-every", "1", "--keep-checkpoints", "2",
]  # fmt: skip


def _train(run_dir: Path, episodes: int, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "lbproxy", *TRAIN_ARGS, "--episodes", str(episodes), "--run-dir", str(run_dir)]
    return subprocess.Popen([*argv, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics" / "training_metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _wait_rows(proc: subprocess.Popen[str], run_dir: Path, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and len(_csv_rows(run_dir)) < n:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    assert len(_csv_rows(run_dir)) >= n


def _finish(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    try:
        return proc.communicate(timeout=timeout_s)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow  # two training processes: ~8 s
def test_sigterm_checkpoints_exits_143_and_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _train(run_dir, 100_000)
    _wait_rows(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == EXIT_TERMINATED == 143, err
    assert "Traceback" not in err and "SIGTERM" in err and "--resume" in err
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    first = int(load_checkpoint(ckpt)["episode"])
    assert first >= 3 and int(_csv_rows(run_dir)[-1]["episode"]) == first

    proc = _train(run_dir, 100_000, "--resume")
    _wait_rows(proc, run_dir, first + 2)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 143, err
    assert f"from episode {first}" in err  # continued from the SIGTERM checkpoint
    second = int(load_checkpoint(latest_checkpoint(run_dir) or Path())["episode"])
    assert second >= first + 2
    assert [int(r["episode"]) for r in _csv_rows(run_dir)] == list(range(1, second + 1))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(run_dir / "dqn_final.pth", weights_only=True)["state_dict"])


def _visible_checkpoints_are_whole(run_dir: Path) -> None:
    folder = run_dir / "checkpoints"
    for p in folder.iterdir() if folder.is_dir() else []:
        if CHECKPOINT_RE.fullmatch(p.name):
            state = load_checkpoint(p)  # raises on a torn file
            assert state["format"] == TRAIN_FORMAT and f"{int(state['episode']):04d}" in p.name


def _latest_episode(run_dir: Path) -> int:
    found = latest_checkpoint(run_dir)
    m = CHECKPOINT_RE.fullmatch(found.name) if found is not None else None
    return int(m.group(1)) if m else 0


@pytest.mark.slow  # a reference run plus five killed and resumed runs: ~35 s on 2 cores
def test_sigkill_at_random_moments_resumes_to_the_same_model(tmp_path: Path) -> None:
    """One kill during start-up, four while training (checkpoints are written every episode, so many
    land mid-save); after each, every file under a checkpoint name loads. Then the resumed run ends
    exactly where an uninterrupted one does: same weights, same CSV rows."""
    episodes = 80
    reference = tmp_path / "reference"
    ref = _train(reference, episodes)
    _finish(ref, 180)
    assert ref.returncode == 0

    run_dir = tmp_path / "killed"
    rng = random.Random(20261201)  # fixed: the same kill moments every run
    in_training = 0
    for attempt in range(5):
        before = _latest_episode(run_dir)
        proc = _train(run_dir, episodes, *(["--resume"] if before else []))
        if attempt == 0:
            time.sleep(rng.uniform(0.2, 1.5))  # importing torch, reading settings
        else:
            deadline = time.monotonic() + 60
            while proc.poll() is None and _latest_episode(run_dir) <= before and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next episodes and their saves
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            in_training += attempt > 0
        _finish(proc)
        _visible_checkpoints_are_whole(run_dir)  # a torn file is never visible under a checkpoint name
    assert in_training >= 2, "the runs finished before they could be killed: make the run longer"
    assert _latest_episode(run_dir) < episodes

    proc = _train(run_dir, episodes, "--resume")
    err = _finish(proc, 180)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # cleaned up
    a, b = _final_weights(reference), _final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in _csv_rows(reference)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in _csv_rows(run_dir)]


# --- the learner dying while the proxy serves ---------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> Iterator[Proc]:
    b = start_backend(workers=16)
    with running(b):
        yield b


async def _serve_dqn(backend: Proc, **extra: Any) -> tuple[Any, Any, Any]:
    """`lbproxy --mode serve --policy dqn --online` in this process (so a test can reach its learner)."""
    from lbproxy.config import load_settings
    from lbproxy.serve import build_server
    from lbproxy.telemetry import Metrics

    settings = load_settings(
        {
            "backends": backend.url,
            "host": LOOPBACK,
            "port": 0,
            "admin_port": 0,
            "health_interval_s": 0,
            "policy": "dqn",
            "online": True,
            "device": "cpu",
            "control_share": 0,
            "learning_starts": 16,
            "batch_size": 8,
            "updates_per_decision": 1.0,
            "weight_sync_every": 1,
            **extra,
        }
    )
    metrics = Metrics()
    server = build_server(settings, metrics)
    await server.start()
    return server, server.policy, metrics


async def _requests(port: int, n: int) -> list[int]:
    import aiohttp

    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(f"http://{LOOPBACK}:{port}/api/light") as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


async def _until_counted(port: int, metrics: Any, timeout_s: float = 20.0) -> None:
    """Keep requests flowing until the failure is counted (the runtime looks once a second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert set(await _requests(port, 10)) == {200}
        if metrics.registry.get_sample_value("lbproxy_learner_failures_total"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("learner failure not detected")


def _assert_reported_once(metrics: Any, capfd: pytest.CaptureFixture[str], why: str) -> None:
    assert metrics.registry.get_sample_value("lbproxy_learner_failures_total") == 1.0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "learner stopped" in line]
    assert len(lines) == 1 and why in lines[0] and "Traceback" not in err, err


@pytest.mark.slow  # waits for the runtime's once-a-second check: ~4 s
async def test_learner_thread_dying_is_counted_and_routing_goes_on(
    backend: Proc, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from lbproxy.rl.learner import Learner

    real_update = Learner.update
    calls = {"n": 0}

    def failing_update(self: Learner, batch: Any) -> float:
        calls["n"] += 1
        if calls["n"] > 3:  # a few good updates (weights published), then the step itself fails
            raise RuntimeError("injected learner fault")
        return float(real_update(self, batch))

    monkeypatch.setattr(Learner, "update", failing_update)
    server, policy, metrics = await _serve_dqn(backend)
    try:
        await _until_counted(server.port, metrics)
        version = policy.engine.version
        decided = policy.decisions
        assert set(await _requests(server.port, 40)) == {200}  # still routed, by the model
        assert policy.decisions >= decided + 40 and policy.engine.version == version  # no new weights
        assert policy.fallback_counts["no_model"] == 0
    finally:
        await server.stop(5.0)
    _assert_reported_once(metrics, capfd, "injected learner fault")


@pytest.mark.slow  # spawns the learner process (imports torch): ~6 s
async def test_learner_process_killed_is_counted_and_routing_goes_on(
    backend: Proc, capfd: pytest.CaptureFixture[str]
) -> None:
    server, policy, metrics = await _serve_dqn(backend, learner_process=True)
    try:
        published = policy.engine.version  # every update publishes (weight_sync_every=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and policy.engine.version < published + 2:  # up and learning
            assert set(await _requests(server.port, 10)) == {200}
        assert policy.engine.version >= published + 2
        (learner_process,) = multiprocessing.active_children()
        assert learner_process.pid is not None
        os.kill(learner_process.pid, signal.SIGKILL)
        await _until_counted(server.port, metrics)
        assert set(await _requests(server.port, 40)) == {200}
        assert policy.fallback_counts["no_model"] == 0
    finally:
        await server.stop(5.0)
    _assert_reported_once(metrics, capfd, "exited with code -9")
