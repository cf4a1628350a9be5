"""`lbproxy --mode train` on live traffic: the real proxy routes with the DQN while it learns.

Episodes are `episode_decisions` routed decisions. Every `metrics_every` episodes a row goes to
RUN_DIR/metrics/training_metrics.csv (same columns as the simulator trainer, phase = "live"); every
`checkpoint_every` episodes a checkpoint goes to RUN_DIR/checkpoints/; on SIGINT/SIGTERM or after
`--episodes` episodes the proxy stops accepting, drains in-flight requests, checkpoints and writes
RUN_DIR/dqn_final.pth, then exits 0: live training has no natural end, a stop signal is how it ends
(the simulator trainer, whose run is unfinished when stopped, exits 143 instead). A SIGKILL loses
only what came after the last checkpoint: checkpoints are written atomically (lbproxy/rl/checkpoint.py).

Resume (`--resume`) restores weights, target, optimizer, update count, ε position and the episode
counter. The replay buffer is NOT checkpointed live (100k transitions is ~70 MB per checkpoint, and
live traffic refills it in seconds); learning restarts once `learning_starts` transitions arrived.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lbproxy.config import ConfigError, Settings
from lbproxy.live_episodes import EpisodeTracker, merge_windows
from lbproxy.observe import WindowStats, WindowSummary
from lbproxy.policies.dqn_runtime import DqnRuntime, create_dqn_runtime
from lbproxy.serve import run_async
from lbproxy.telemetry import TRAINING_METRIC_FIELDS, CsvMetricsWriter, Metrics

CSV_FIELDS = TRAINING_METRIC_FIELDS
"""A row pools the decisions of the episodes it closes."""
LIVE_FORMAT = "lbproxy-live/1"
PROGRESS_EVERY_EPISODES = 10
DRAIN_TIMEOUT_S = 10.0


class LiveTrainer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.total_episodes = settings.resolved_episodes()
        self.episode = 0
        self.start_step = 0
        self.metrics = Metrics()
        self.windows: list[WindowStats] = []
        self.t0 = time.monotonic()
        self.last_summary: WindowSummary | None = None
        self.rt: DqnRuntime | None = None
        # Gini is capacity-normalised: configured weights are the live capacity (DESIGN.md §6).
        self.capacity = [b.weight for b in settings.backends]

    # --- set-up ---------------------------------------------------------------------------------
    def _initial_state(self) -> tuple[Any, dict[str, Any] | None]:
        """(init network or None, learner state or None) from --resume / --init-model."""
        from lbproxy.rl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model

        s = self.settings
        if s.resume:
            path = latest_checkpoint(self.run_dir)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint in {str(self.ckpt_dir)!r}; run without --resume to start")
            try:
                payload = load_checkpoint(path)
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            if payload.get("format") != LIVE_FORMAT:
                raise ConfigError(
                    f"--resume: {str(path)!r} is not a live-training checkpoint; "
                    "use a fresh --run-dir for live training"
                )
            arch = payload.get("arch", {})
            if arch.get("hidden") != s.hidden:
                raise ConfigError(
                    f"--resume: checkpoint network hidden={arch.get('hidden')} differs from --hidden {s.hidden}; "
                    "pass the same network settings"
                )
            self.episode = int(payload["episode"])
            self.start_step = int(payload["decisions"])
            return None, payload["learner"]
        if s.init_model is not None:
            if not Path(s.init_model).is_file():
                raise ConfigError(f"--init-model {str(s.init_model)!r} not found; pass an existing model file")
            try:
                net, _meta = load_model(Path(s.init_model), device="cpu")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            return net, None
        return None, None

    # --- episode bookkeeping --------------------------------------------------------------------
    def _on_episodes(self, tracker: EpisodeTracker, stop: asyncio.Event) -> list[int]:
        """Consume completed episode windows; returns the episode numbers that need a checkpoint."""
        due: list[int] = []
        s = self.settings
        rt = self.rt
        assert rt is not None
        while tracker.completed and self.episode < self.total_episodes:
            self.windows.append(tracker.completed.pop(0))
            self.episode += 1
            self.metrics.episode.set(self.episode)
            if self.episode % s.metrics_every == 0 or self.episode == self.total_episodes:
                self._write_row()
            if self.episode % PROGRESS_EVERY_EPISODES == 0:
                self._progress()
            if self.episode % s.checkpoint_every == 0:
                due.append(self.episode)
            if self.episode >= self.total_episodes:
                stop.set()
        return due

    def _write_row(self) -> None:
        if not self.windows:
            return
        rt = self.rt
        assert rt is not None
        merged = merge_windows(self.windows)
        cap = (self.capacity + [1.0] * len(merged.load))[: len(merged.load)]  # backends added at runtime: 1.0
        summary = merged.summary(cap)
        self.windows = []
        self.last_summary = summary
        loss = rt.learner.last_loss if rt.learner is not None else float("nan")
        self.csv.write(
            {
                "episode": self.episode,
                "phase": "live",
                "mean_reward": f"{summary.mean_reward:.5f}",
                "gini": f"{summary.gini:.4f}",
                "accuracy": f"{summary.accuracy:.4f}",
                "mean_ms": f"{summary.mean_latency_s * 1000:.3f}",
                "p50_ms": f"{summary.p50_s * 1000:.3f}",
                "p99_ms": f"{summary.p99_s * 1000:.3f}",
                "error_rate": f"{summary.error_rate:.4f}",
                "loss": f"{loss:.6g}",
                "epsilon": f"{rt.policy.epsilon:.4f}",
                "updates": rt.learner.total_updates if rt.learner is not None else 0,
                "wall_s": f"{time.monotonic() - self.t0:.2f}",
            }
        )

    def _progress(self) -> None:
        rt = self.rt
        assert rt is not None
        sm = self.last_summary
        lrn = rt.learner
        parts = [
            f"episode {self.episode}/{self.total_episodes}",
            "live",
            f"reward {sm.mean_reward:.3f}" if sm else "",
            f"p99 {sm.p99_s * 1000:.1f} ms" if sm else "",
            f"eps {rt.policy.epsilon:.3f}",
            f"loss {lrn.last_loss:.4f}" if lrn is not None else "",
            f"updates {lrn.updates}" if lrn is not None else "",
            f"fallbacks {sum(rt.policy.fallback_counts.values())}",
            f"{time.monotonic() - self.t0:.0f}s",
        ]
        print("lbproxy train: " + ", ".join(p for p in parts if p), file=sys.stderr, flush=True)

    # --- checkpoints ----------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        rt = self.rt
        assert rt is not None and rt.learner is not None and rt.arch is not None
        return {
            "format": LIVE_FORMAT,
            "episode": self.episode,
            "decisions": self.start_step + rt.policy.decisions,
            "learner": rt.learner.snapshot(),
            "arch": dict(rt.arch),
            "seed": self.settings.seed,
        }

    def _save_checkpoint(self) -> Path:
        from lbproxy.rl.checkpoint import checkpoint_path, save_checkpoint

        path = checkpoint_path(self.run_dir, self.episode)
        save_checkpoint(path, self._payload())
        return path

    def _save_final(self) -> Path:
        from lbproxy.rl.checkpoint import save_model
        from lbproxy.rl.network import QNetwork

        rt = self.rt
        assert rt is not None and rt.learner is not None and rt.arch is not None
        state = rt.learner.snapshot()
        net = QNetwork(rt.arch["hidden"])
        net.load_state_dict({k: v.cpu() for k, v in state["online"].items()})
        path = self.run_dir / "dqn_final.pth"
        save_model(
            path,
            net,
            {"env": "live", "episodes": self.episode, "decisions": self.start_step + rt.policy.decisions},
        )
        return path

    # --- main -----------------------------------------------------------------------------------
    async def run(self) -> int:
        from lbproxy.proxy import ProxyServer
        from lbproxy.proxy.admin import admin_token
        from lbproxy.rl.checkpoint import remove_partial_writes
        from lbproxy.serve import tune_gc

        s = self.settings
        admin_token(s)  # an exposed admin listener without a token: refuse before loading anything
        net, learner_state = self._initial_state()
        remove_partial_writes(self.run_dir)  # a save cut by SIGKILL: never a checkpoint, only litter
        n = len(s.backends)
        tracker = EpisodeTracker(n, s.episode_decisions, s.error_penalty)
        self.rt = rt = create_dqn_runtime(
            s,
            None,
            self.metrics,
            train=True,
            net=net,
            total_decisions=self.total_episodes * s.episode_decisions,
            learner_state=learner_state,
            epsilon_start_step=self.start_step,
            tracker=tracker,
        )
        self.csv = CsvMetricsWriter(self.run_dir / "metrics" / "training_metrics.csv", CSV_FIELDS)
        server = ProxyServer(s, rt.policy, self.metrics)
        server.lifespans.append(rt.lifespan)  # learner thread + gauges start/stop with the app
        await server.start()
        tune_gc()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        wake = asyncio.Event()
        tracker.on_episode = wake.set
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"lbproxy train (live): proxy on {s.host}:{server.port}, admin {s.admin_host}:{server.admin_port}, "
            f"{n} backends, episodes {self.episode}->{self.total_episodes} x {s.episode_decisions} decisions, "
            f"run dir {self.run_dir}",
            file=sys.stderr,
            flush=True,
        )
        if self.episode >= self.total_episodes:
            stop.set()
        try:
            while not stop.is_set():
                stop_wait = asyncio.ensure_future(stop.wait())
                wake_wait = asyncio.ensure_future(wake.wait())
                await asyncio.wait({stop_wait, wake_wait}, return_when=asyncio.FIRST_COMPLETED)
                for f in (stop_wait, wake_wait):
                    f.cancel()
                wake.clear()
                for _ep in self._on_episodes(tracker, stop):
                    await asyncio.to_thread(self._save_checkpoint)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await server.stop(DRAIN_TIMEOUT_S)  # drains in-flight requests, then stops the learner
            self._on_episodes(tracker, asyncio.Event())
            self._write_row()
            ckpt = await asyncio.to_thread(self._save_checkpoint)
            final = await asyncio.to_thread(self._save_final)
            self.csv.close()
            print(
                f"lbproxy train (live): stopped after episode {self.episode}; checkpoint {ckpt}, model {final}",
                file=sys.stderr,
                flush=True,
            )
        return 0


def run_train_live(settings: Settings) -> int:
    """Entry point for `lbproxy --mode train` with backends (or `--env live`)."""
    if not settings.backends:
        raise ConfigError("live training needs backends; pass --backends URL[,URL] or --cluster-file FILE")
    return run_async(LiveTrainer(settings).run())
