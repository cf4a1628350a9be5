"""The live `dqn` policy: deadline and no-model fallbacks, mismatch errors, train -> checkpoint -> serve
round trip through the real CLI, and the acceptance test on real backends with one 4x slower."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from nets import column_net
from support import LOOPBACK, POLICY_ONLY, REPO, Proc, free_port, start_backend, start_proxy

from lbproxy.config import Settings
from lbproxy.observe import F_LATENCY_ALL, MAX_BACKENDS, ClusterView, Outcome
from lbproxy.policies.dqn import DqnPolicy
from lbproxy.policies.dqn_runtime import create_dqn_runtime
from lbproxy.policy import resolve
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.network import QNetwork, RowScorer
from lbproxy.telemetry import Metrics


def slow_lover() -> QNetwork:
    """Prefers the backend with the highest latency: the opposite of peak_ewma."""
    return column_net(F_LATENCY_ALL, 1.0)


def fast_lover() -> QNetwork:
    return column_net(F_LATENCY_ALL, -1.0)


def fallback_count(metrics: Metrics, reason: str) -> float:
    return float(metrics.registry.get_sample_value("lbproxy_decision_fallbacks_total", {"reason": reason}) or 0.0)


def skewed_view() -> ClusterView:
    """Two backends where peak_ewma always picks 0 (backend 1 just answered in 5 s)."""
    view = ClusterView.create(2)
    view.on_dispatch(1)
    view.on_complete(Outcome(backend=1, req_class=0, latency_s=5.0, error=False), now_s=1.0)
    return view


class SlowEngine(InferenceEngine):
    """A forward pass far slower than the deadline (e.g. a stalled device)."""

    def row_pass(self, rows: np.ndarray, ctx: np.ndarray, more: np.ndarray) -> tuple[RowScorer, np.ndarray]:
        time.sleep(0.005)
        return super().row_pass(rows, ctx, more)


async def test_deadline_miss_routes_by_peak_ewma_and_counts() -> None:
    metrics = Metrics()
    settings = Settings(mode="serve", device="cpu", decision_deadline_us=200, hidden=16, control_share=0.0)
    rt = create_dqn_runtime(settings, None, metrics, net=slow_lover(), engine_cls=SlowEngine)
    view = skewed_view()
    actions = []
    for _ in range(3):  # three loop iterations: three passes, each late
        actions += [(await resolve(rt.policy.decide(0, view, now_s=1.0)))[0] for _ in range(2)]
        await asyncio.sleep(0)
    assert actions == [0] * 6, "the network prefers 1; peak_ewma (the fallback) picks 0"
    assert fallback_count(metrics, "deadline") == 6
    assert fallback_count(metrics, "no_model") == 0


async def test_fast_engine_answers_within_the_deadline() -> None:
    metrics = Metrics()
    settings = Settings(mode="serve", device="cpu", decision_deadline_us=50_000, hidden=16, control_share=0.0)
    rt = create_dqn_runtime(settings, None, metrics, net=slow_lover())
    view = skewed_view()
    results = await asyncio.gather(*(resolve(rt.policy.decide(0, view, now_s=1.0)) for _ in range(50)))
    assert [a for a, _ in results] == [1] * 50
    assert fallback_count(metrics, "deadline") == 0
    await asyncio.sleep(0)  # the iteration ends: its pass is accounted
    rt.update_gauges()
    assert metrics.registry.get_sample_value("lbproxy_inference_batch_size_count") == 1
    assert metrics.registry.get_sample_value("lbproxy_inference_batch_size_sum") == 50


async def test_no_model_routes_by_peak_ewma_and_counts() -> None:
    metrics = Metrics()
    engine = InferenceEngine(MAX_BACKENDS)  # nothing loaded
    policy = DqnPolicy(engine, metrics=metrics)
    view = skewed_view()
    for _ in range(3):
        assert (await resolve(policy.decide(0, view, now_s=1.0)))[0] == 0
    assert fallback_count(metrics, "no_model") == 3


async def test_decision_never_targets_a_backend_that_went_away() -> None:
    settings = Settings(mode="serve", device="cpu", hidden=16, control_share=0.0)
    rt = create_dqn_runtime(settings, None, None, net=slow_lover())
    view = ClusterView.create(3)
    view.on_dispatch(1)
    view.on_complete(Outcome(1, 0, 5.0, False), now_s=1.0)  # the network's favourite ...
    view.set_available(1, False)  # ... is gone
    for _ in range(20):
        assert (await resolve(rt.policy.decide(0, view, now_s=0.0)))[0] in (0, 2)


# --- CLI: model errors --------------------------------------------------------------------------------
def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def old_format_model(path: Path) -> Path:
    """A model file of the old, slot-indexed format (lbproxy-dqn/1)."""
    torch.save({"format": "lbproxy-dqn/1", "arch": {}, "state_dict": {"body.0.weight": torch.zeros(4, 4)}}, path)
    return path


def test_serve_rejects_an_old_format_model(tmp_path: Path) -> None:
    path = old_format_model(tmp_path / "old.pth")
    port, admin = free_port(), free_port()
    proc = run_cli(
        *("--mode", "serve", "--policy", "dqn", "--model", str(path)),
        *("--backends", f"http://{LOOPBACK}:{free_port()}", "--host", LOOPBACK),
        *("--port", str(port), "--admin-port", str(admin)),
    )
    assert_one_line_error(proc, "old.pth", "lbproxy-dqn/1")


def test_live_train_rejects_a_mismatched_init_model(tmp_path: Path) -> None:
    path = old_format_model(tmp_path / "old.pth")
    proc = run_cli(
        *("--mode", "train", "--env", "live", "--init-model", str(path), "--run-dir", str(tmp_path / "run")),
        *("--backends", f"http://{LOOPBACK}:{free_port()}", "--host", LOOPBACK),
        *("--port", str(free_port()), "--admin-port", str(free_port())),
    )
    assert_one_line_error(proc, "old.pth", "lbproxy-dqn/1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_cuda_without_cuda_is_a_one_line_error() -> None:
    proc = run_cli(
        *("--mode", "serve", "--policy", "dqn", "--device", "cuda", "--host", LOOPBACK),
        *("--backends", f"http://{LOOPBACK}:{free_port()}", "--port", str(free_port())),
        *("--admin-port", str(free_port())),
    )
    assert_one_line_error(proc, "--device cuda")


def test_serve_without_a_model_file_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli(
        "--mode",
        "serve",
        "--policy",
        "dqn",
        "--model",
        str(tmp_path / "missing.pth"),
        "--backends",
        f"http://{LOOPBACK}:{free_port()}",
        "--host",
        LOOPBACK,
        "--port",
        str(free_port()),
        "--admin-port",
        str(free_port()),
    )
    assert_one_line_error(proc, "missing.pth")


# --- load driving ---------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    errors: int = 0

    def p99_s(self) -> float:
        lat = sorted(self.latencies_s)
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("inf")

    def mean_s(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else float("inf")

    def share(self, backend: str, last: int | None = None) -> float:
        seq = self.backends[-last:] if last else self.backends
        return Counter(seq)[backend] / max(1, len(seq))


def request_paths(n: int, seed: int) -> list[str]:
    """The replayed request sequence: mostly light, some heavy (same for every policy compared)."""
    rng = np.random.default_rng(seed)
    return ["/api/heavy" if x < 0.2 else "/api/light" for x in rng.random(n)]


async def drive(
    url: str, paths: Sequence[str], concurrency: int, time_limit_s: float, stop_early: Proc | None = None
) -> LoadResult:
    """`concurrency` closed-loop clients walk `paths` in order until done or the time limit."""
    res = LoadResult()
    deadline = time.monotonic() + time_limit_s
    it = iter(paths)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            for path in it:
                if time.monotonic() > deadline or (stop_early is not None and stop_early.popen.poll() is not None):
                    return
                t0 = time.perf_counter()
                try:
                    async with session.get(url + path) as resp:
                        await resp.read()
                        if resp.status != 200:
                            res.errors += 1
                            continue
                        res.latencies_s.append(time.perf_counter() - t0)
                        res.backends.append(resp.headers.get("X-Backend", "?"))
                except (TimeoutError, aiohttp.ClientError):
                    res.errors += 1
                    if stop_early is not None and stop_early.popen.poll() is not None:
                        return

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return res


def start_train(backends: Sequence[str], run_dir: Path, *extra: str) -> Proc:
    live = ("--env", "live", "--run-dir", str(run_dir), "--device", "cpu", "--health-interval-s", "0")
    return start_proxy(backends, *live, *extra, mode="train")


TINY_TRAIN = (
    "--hidden",
    "16",
    "--batch-size",
    "16",
    "--learning-starts",
    "32",
    "--updates-per-decision",
    "0.5",
    "--weight-sync-every",
    "5",
)


def wait_exit(proc: Proc, timeout_s: float) -> int:
    try:
        return proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise


def finish(proc: Proc) -> str:
    """Stop the process, return its output and close the pipe (no ResourceWarning under -W error)."""
    proc.stop()
    out = proc.output()
    if proc.popen.stdout is not None:
        proc.popen.stdout.close()
    return out


@pytest.fixture(scope="module")
def two_backends() -> object:
    a = start_backend(workers=4, speed=1.0)
    b = start_backend(workers=4, speed=1.0)
    try:
        yield a, b
    finally:
        finish(a)
        finish(b)


@pytest.mark.slow
async def test_train_checkpoint_resume_serve_round_trip(tmp_path: Path, two_backends: tuple[Proc, Proc]) -> None:
    urls = [p.url for p in two_backends]
    run_dir = tmp_path / "run"
    args = ("--episode-decisions", "40", "--checkpoint-every", "2", "--metrics-every", "3", *TINY_TRAIN)
    from lbproxy.rl.checkpoint import save_model

    init = tmp_path / "init.pth"
    save_model(init, fast_lover(), {"note": "prefers the fastest backend"})
    trainer = start_train(urls, run_dir, "--episodes", "4", "--init-model", str(init), *args)
    res = await drive(trainer.url, request_paths(2000, 1), concurrency=8, time_limit_s=40, stop_early=trainer)
    assert wait_exit(trainer, 30) == 0
    log = finish(trainer)
    assert "Traceback" not in log, log[-3000:]
    assert len(res.latencies_s) >= 160
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pth"))
    assert "dqn_episode_0002.pth" in ckpts and "dqn_episode_0004.pth" in ckpts
    assert (run_dir / "dqn_final.pth").is_file()
    with (run_dir / "metrics" / "training_metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["episode"] for r in rows][:2] == ["3", "4"]  # every 3 episodes, and the last at the stop
    assert all(r["phase"] == "live" for r in rows)
    from lbproxy.rl.checkpoint import load_checkpoint

    # A checkpoint between two rows keeps the episodes of the unfinished row (a resume writes it whole).
    assert len(load_checkpoint(run_dir / "checkpoints" / "dqn_episode_0002.pth")["window"]) == 2
    assert load_checkpoint(run_dir / "checkpoints" / "dqn_episode_0004.pth")["window"] == []

    # --resume continues at episode 4; SIGTERM mid-run drains, checkpoints and exits 0.
    trainer = start_train(urls, run_dir, "--episodes", "1000", "--resume", *args)
    await drive(trainer.url, request_paths(200, 2), concurrency=4, time_limit_s=20, stop_early=trainer)
    trainer.popen.send_signal(signal.SIGTERM)
    assert wait_exit(trainer, 30) == 0
    assert "Traceback" not in finish(trainer)
    ckpts = sorted((run_dir / "checkpoints").glob("dqn_episode_*.pth"))
    assert int(ckpts[-1].stem.split("_")[-1]) > 4

    # Serve the final model greedily through the real CLI.
    proxy = start_proxy(urls, "--policy", "dqn", "--model", str(run_dir / "dqn_final.pth"), "--device", "cpu")
    try:
        res = await drive(proxy.url, request_paths(200, 3), concurrency=4, time_limit_s=20)
        assert len(res.latencies_s) == 200 and res.errors == 0
        async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
        assert "lbproxy_inference_batch_size_count" in text
    finally:
        finish(proxy)


# --- acceptance: one backend 4x slower --------------------------------------------------------------
ACCEPT_CONCURRENCY = 12
EVAL_REQUESTS = 900


@pytest.fixture(scope="module")
def skewed_backends() -> object:
    """Three real backends; the third serves 4x slower (`--speed 0.25`)."""
    procs = [
        start_backend("--name", "fast1", "--seed", "1", workers=4, speed=1.0),
        start_backend("--name", "fast2", "--seed", "2", workers=4, speed=1.0),
        start_backend("--name", "slow", "--seed", "3", workers=4, speed=0.25),
    ]
    try:
        yield procs
    finally:
        for p in procs:
            finish(p)


async def replay_eval(url: str) -> LoadResult:
    """The same request sequence and concurrency for every policy compared."""
    return await drive(url, request_paths(EVAL_REQUESTS, 99), ACCEPT_CONCURRENCY, time_limit_s=30)


async def heuristic_result(urls: list[str], policy: str) -> LoadResult:
    proxy = start_proxy(urls, "--policy", policy, "--health-interval-s", "0", *POLICY_ONLY)
    try:
        await drive(proxy.url, request_paths(100, 7), ACCEPT_CONCURRENCY, time_limit_s=10)  # warm-up
        return await replay_eval(proxy.url)
    finally:
        finish(proxy)


def sim_trained_model(tmp_path: Path) -> Path:
    """The shipped default model if present, else a tiny one trained in the simulator now."""
    from lbproxy.rl.checkpoint import default_model_path

    path = default_model_path()
    if path.is_file():
        return path
    run_dir = tmp_path / "sim"
    proc = run_cli(
        "--mode",
        "train",
        "--env",
        "sim",
        "--run-dir",
        str(run_dir),
        "--episodes",
        "60",
        "--device",
        "cpu",
        timeout_s=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir / "dqn_final.pth"


@pytest.mark.slow
@pytest.mark.timing
async def test_acceptance_dqn_learns_to_avoid_the_slow_backend(tmp_path: Path, skewed_backends: list[Proc]) -> None:
    urls = [p.url for p in skewed_backends]
    # Live training: ε decays over the first 30% of 40 x 100 decisions, then the agent is ~greedy.
    trainer = start_train(
        urls,
        tmp_path / "live",
        "--episodes",
        "40",
        "--episode-decisions",
        "100",
        "--eps-fraction",
        "0.3",
        "--hidden",
        "32",
        "--batch-size",
        "32",
        "--learning-starts",
        "200",
        "--updates-per-decision",
        "0.5",
        "--weight-sync-every",
        "10",
        "--lr",
        "0.003",
        "--target-update-every",
        "100",
        *POLICY_ONLY,
    )
    try:
        training = await drive(
            trainer.url, request_paths(2600, 5), ACCEPT_CONCURRENCY, time_limit_s=40, stop_early=trainer
        )
        # Still in train mode (ε at its floor): the replayed evaluation load.
        dqn = await replay_eval(trainer.url)
    finally:
        log = finish(trainer)
    assert trainer.popen.returncode == 0, log[-3000:]
    first = Counter(training.backends[:400])["slow"] / 400  # ε ~ 1: routed by peak_ewma (safe exploration)
    late = dqn.share("slow")
    assert late < 0.25, f"the slow backend kept {late:.2f} of the traffic (round robin: 1/3); first {first:.2f}"
    rr = await heuristic_result(urls, "round_robin")
    rnd = await heuristic_result(urls, "random")
    print(
        f"slow share first {first:.3f} final {late:.3f}; p99 ms dqn {dqn.p99_s() * 1e3:.1f} "
        f"round_robin {rr.p99_s() * 1e3:.1f} random {rnd.p99_s() * 1e3:.1f}; training requests {len(training.backends)}"
    )
    assert dqn.p99_s() < rr.p99_s(), (dqn.p99_s(), rr.p99_s())
    assert dqn.p99_s() < rnd.p99_s(), (dqn.p99_s(), rnd.p99_s())

    # A simulator-trained model, served live greedily, beats round_robin from its first requests.
    model = sim_trained_model(tmp_path)
    proxy = start_proxy(
        urls, "--policy", "dqn", "--model", str(model), "--device", "cpu", "--health-interval-s", "0", *POLICY_ONLY
    )
    try:
        served = await replay_eval(proxy.url)
    finally:
        finish(proxy)
    print(
        f"sim-trained model {model.name}: mean ms {served.mean_s() * 1e3:.1f} p99 {served.p99_s() * 1e3:.1f} vs "
        f"round_robin mean {rr.mean_s() * 1e3:.1f} p99 {rr.p99_s() * 1e3:.1f}; slow share {served.share('slow'):.3f}"
    )
    assert served.mean_s() < rr.mean_s(), (served.mean_s(), rr.mean_s())
