"""`lbproxy --mode train` on live traffic: the real proxy routes with the DQN while it learns.

Episodes are `episode_decisions` routed decisions (lbproxy/live_episodes.py). The run directory and
the reports are the simulator trainer's (train/run_dir.py, train/report.py): every `metrics_every`
episodes a CSV row (phase = "live", the mean over the episodes it closes) and a progress line, every
`checkpoint_every` episodes a checkpoint, the run's warnings and errors in logs/training_errors.log.
On SIGINT/SIGTERM or after `--episodes` episodes the proxy stops accepting, drains in-flight
requests, checkpoints and writes RUN_DIR/dqn_final.pth, then exits 0: live training has no natural
end, a stop signal is how it ends (the simulator trainer, whose run is unfinished when stopped, exits
143 instead). A SIGKILL loses only what came after the last checkpoint: checkpoints are written
atomically (lbproxy/rl/checkpoint.py).

Resume (`--resume`) restores weights, target, optimizer, update count, ε position, the episode
counter and the episodes of the row being accumulated. The replay buffer is NOT checkpointed live
(100k transitions is ~70 MB per checkpoint, and live traffic refills it in seconds); learning
restarts once `learning_starts` transitions arrived.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbproxy.config import ConfigError, Settings
from lbproxy.live_episodes import EpisodeTracker
from lbproxy.policies.dqn_runtime import DqnRuntime, create_dqn_runtime
from lbproxy.serve import run_async
from lbproxy.telemetry import Metrics
from lbproxy.train.report import MetricsWindow, Progress, metrics_row
from lbproxy.train.run_dir import RunDir

if TYPE_CHECKING:
    from lbproxy.proxy import ProxyServer
    from lbproxy.rl.network import QNetwork

LIVE_FORMAT = "lbproxy-live/2"
"""/2: the checkpoint holds the episodes of the unfinished CSV row; /1 is refused."""
DRAIN_TIMEOUT_S = 10.0


class LiveTrainer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = RunDir(settings.run_dir)
        self.total_episodes = settings.resolved_episodes()
        self.episode = 0
        self.start_step = 0
        self.metrics = Metrics()
        self.window = MetricsWindow()
        self.progress = Progress(self.total_episodes, 0)
        self.t0 = time.monotonic()
        self.rt: DqnRuntime | None = None
        # Gini is capacity-normalised: configured weights are the live capacity (DESIGN.md §6).
        self.capacity = [b.weight for b in settings.backends]

    # --- set-up ---------------------------------------------------------------------------------
    def _initial_state(self) -> tuple[QNetwork | None, dict[str, Any] | None]:
        """(init network or None, learner state or None) from --resume / --init-model."""
        from lbproxy.rl.checkpoint import CheckpointError, load_model

        s = self.settings
        opened = self.run_dir.open(resume=s.resume, fmt=LIVE_FORMAT, trainer="live-training")
        if opened is not None:
            path, payload = opened
            with RunDir.restoring(path):
                hidden = payload["arch"]["hidden"]
                if hidden != s.hidden:
                    raise ConfigError(
                        f"--resume: checkpoint network hidden={hidden} differs from --hidden {s.hidden}; "
                        "pass the same network settings"
                    )
                self.episode = int(payload["episode"])
                self.start_step = int(payload["decisions"])
                self.window = MetricsWindow.from_state(payload["window"])
                return None, dict(payload["learner"])
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
            stats = tracker.completed.pop(0)
            cap = (self.capacity + [1.0] * len(stats.load))[: len(stats.load)]  # backends added at runtime: 1.0
            self.window.add(stats.summary(cap), rt.learner.last_loss if rt.learner is not None else float("nan"))
            self.episode += 1
            self.metrics.episode.set(self.episode)
            if self.episode % s.metrics_every == 0 or self.episode == self.total_episodes:
                self._write_row()
            if self.episode % s.checkpoint_every == 0:
                due.append(self.episode)
            if self.episode >= self.total_episodes:
                stop.set()
        return due

    def _write_row(self) -> None:
        """The row of the episodes since the last one, and the progress line."""
        if not self.window.rows:
            return
        rt = self.rt
        assert rt is not None
        means = self.window.means()
        self.window = MetricsWindow()
        lrn = rt.learner
        updates = lrn.total_updates if lrn is not None else 0
        wall_s = time.monotonic() - self.t0
        epsilon = rt.policy.epsilon
        self.csv.write(metrics_row(self.episode, "live", means, epsilon=epsilon, updates=updates, wall_s=wall_s))
        fallbacks = sum(rt.policy.fallback_counts.values())
        extra = f"  updates {updates}  fallbacks {fallbacks}"
        self.progress.row(self.episode, "live", means, epsilon=epsilon, wall_s=wall_s, extra=extra)

    # --- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        rt = self.rt
        assert rt is not None and rt.learner is not None and rt.arch is not None
        payload = {
            "format": LIVE_FORMAT,
            "episode": self.episode,
            "decisions": self.start_step + rt.policy.decisions,
            "learner": rt.learner.snapshot(),
            "arch": dict(rt.arch),
            "seed": self.settings.seed,
            "window": self.window.state(),
        }
        return self.run_dir.save_checkpoint(self.episode, payload, self.settings.keep_checkpoints)

    def _save_final(self) -> Path:
        from lbproxy.rl.network import QNetwork

        rt = self.rt
        assert rt is not None and rt.learner is not None and rt.arch is not None
        state = rt.learner.snapshot()
        net = QNetwork(rt.arch["hidden"])
        net.load_state_dict({k: v.cpu() for k, v in state["online"].items()})
        meta = {"env": "live", "episodes": self.episode, "decisions": self.start_step + rt.policy.decisions}
        return self.run_dir.save_final(net, meta)

    # --- main -----------------------------------------------------------------------------------
    async def _start(self) -> tuple[ProxyServer, EpisodeTracker]:
        """The runtime (learner in train mode) behind a started proxy."""
        from lbproxy.proxy import ProxyServer
        from lbproxy.proxy.admin import admin_token
        from lbproxy.serve import tune_gc

        s = self.settings
        admin_token(s)  # an exposed admin listener without a token: refuse before loading anything
        net, learner_state = self._initial_state()
        self.progress = Progress(self.total_episodes, self.episode)
        tracker = EpisodeTracker(len(s.backends), s.episode_decisions, s.error_penalty)
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
        rt.report = self.run_dir.log.error  # a dead learner: on stderr and in the run's error log
        self.csv = self.run_dir.metrics_writer()
        server = ProxyServer(s, rt.policy, self.metrics)
        server.lifespans.append(rt.lifespan)  # learner thread + gauges start/stop with the proxy
        await server.start()
        tune_gc()
        print(
            f"lbproxy train (live): proxy on {s.host}:{server.port}, admin {s.admin_host}:{server.admin_port}, "
            f"{len(s.backends)} backends, episodes {self.episode}->{self.total_episodes} x {s.episode_decisions} "
            f"decisions, run dir {self.run_dir.root}",
            file=sys.stderr,
            flush=True,
        )
        return server, tracker

    async def _train(self, tracker: EpisodeTracker) -> None:
        """Until a stop signal or the last episode: consume episodes, checkpoint those due."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        wake = asyncio.Event()
        tracker.on_episode = wake.set
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
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

    async def run(self) -> int:
        server, tracker = await self._start()
        with self.run_dir.log.capturing():
            try:
                await self._train(tracker)
            except Exception as exc:
                self.run_dir.log.write("ERROR", f"live training stopped: {type(exc).__name__}: {exc}", exc)
                raise
            finally:
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
