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

With `--workers N` the N workers route and feed ONE learner process, and the supervisor keeps this
run (lbproxy/train/live_workers.py): both drivers write through one `LiveRun`, so the CSV, the
checkpoints and `--resume` are the same whatever the worker count, and a run may resume with another.

Resume (`--resume`) restores weights, target, optimizer, update count, ε position, the episode
counter and the episodes of the row being accumulated. The replay buffer is NOT checkpointed live
(100k transitions is ~70 MB per checkpoint, and live traffic refills it in seconds); learning
restarts once `learning_starts` transitions arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lbproxy.config import ConfigError, Settings
from lbproxy.live_episodes import EpisodeTracker
from lbproxy.observe import learning_width
from lbproxy.policies.dqn_runtime import DqnRuntime, create_dqn_runtime
from lbproxy.serve import run_async
from lbproxy.telemetry import Metrics
from lbproxy.train.report import MetricsWindow, Progress, metrics_row
from lbproxy.train.run_dir import RunDir

if TYPE_CHECKING:
    from lbproxy.observe import WindowSummary
    from lbproxy.proxy import ProxyServer
    from lbproxy.rl.network import QNetwork

LIVE_FORMAT = "lbproxy-live/2"
"""/2: the checkpoint holds the episodes of the unfinished CSV row; /1 is refused."""
DRAIN_TIMEOUT_S = 10.0


class Trainee(Protocol):
    """What a row, a checkpoint and the final model read from the learning side, wherever it runs."""

    @property
    def last_loss(self) -> float: ...
    @property
    def total_updates(self) -> int: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def fallbacks(self) -> int: ...
    @property
    def decisions(self) -> int:
        """Decisions of the whole run, those before a --resume included (the ε position)."""

    def snapshot(self) -> dict[str, Any]:
        """The learner's state (off the loop: it may wait for a learner process)."""


class LiveRun:
    """One live-training run's bookkeeping, whoever routes: the episode count, the CSV rows and progress
    lines, the checkpoints and the final model, in RUN_DIR (train/run_dir.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = RunDir(settings.run_dir)
        self.total_episodes = settings.resolved_episodes()
        self.episode = 0
        self.start_step = 0
        self.window = MetricsWindow()
        self.progress = Progress(self.total_episodes, 0)
        self.t0 = time.monotonic()
        self.arch: dict[str, Any] = {"hidden": settings.hidden, "width": learning_width(max(1, len(settings.backends)))}
        """The trained network's, for checkpoints: --init-model's hidden size when one is given."""
        self.csv: Any = None

    def initial_state(self) -> tuple[QNetwork | None, dict[str, Any] | None]:
        """(init network or None, learner state or None) from --resume / --init-model; opens the CSV."""
        from lbproxy.rl.checkpoint import CheckpointError, load_model

        s = self.settings
        opened = self.run_dir.open(resume=s.resume, fmt=LIVE_FORMAT, trainer="live-training")
        net: QNetwork | None = None
        state: dict[str, Any] | None = None
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
                state = dict(payload["learner"])
        elif s.init_model is not None:
            if not Path(s.init_model).is_file():
                raise ConfigError(f"--init-model {str(s.init_model)!r} not found; pass an existing model file")
            try:
                net, _meta = load_model(Path(s.init_model), device="cpu")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            self.arch["hidden"] = net.hidden
        self.progress = Progress(self.total_episodes, self.episode)
        self.csv = self.run_dir.metrics_writer()
        return net, state

    @property
    def done(self) -> bool:
        return self.episode >= self.total_episodes

    @property
    def total_decisions(self) -> int:
        """What the ε schedule runs over."""
        return self.total_episodes * self.settings.episode_decisions

    def add(self, summaries: list[WindowSummary], trainee: Trainee) -> bool:
        """Count finished episodes (those past --episodes are dropped) up to the next one due a
        checkpoint: True when `episode` is, so that the caller saves it before counting on."""
        s = self.settings
        while summaries and not self.done:
            self.window.add(summaries.pop(0), trainee.last_loss)
            self.episode += 1
            if self.episode % s.metrics_every == 0 or self.done:
                self.write_row(trainee)
            if self.episode % s.checkpoint_every == 0:
                return True
        return False

    def write_row(self, trainee: Trainee) -> None:
        """The row of the episodes since the last one, and the progress line."""
        if not self.window.rows:
            return
        means = self.window.means()
        self.window = MetricsWindow()
        updates = trainee.total_updates
        wall_s = time.monotonic() - self.t0
        epsilon = trainee.epsilon
        self.csv.write(metrics_row(self.episode, "live", means, epsilon=epsilon, updates=updates, wall_s=wall_s))
        extra = f"  updates {updates}  fallbacks {trainee.fallbacks}"
        self.progress.row(self.episode, "live", means, epsilon=epsilon, wall_s=wall_s, extra=extra)

    def save_checkpoint(self, trainee: Trainee) -> Path:
        payload = {
            "format": LIVE_FORMAT,
            "episode": self.episode,
            "decisions": trainee.decisions,
            "learner": trainee.snapshot(),
            "arch": dict(self.arch),
            "seed": self.settings.seed,
            "window": self.window.state(),
        }
        return self.run_dir.save_checkpoint(self.episode, payload, self.settings.keep_checkpoints)

    def finish(self, trainee: Trainee, leftover: list[WindowSummary], what: str) -> None:
        """After the stop and the drain: the last episodes and row, a checkpoint, dqn_final.pth, the line."""
        from lbproxy.rl.network import QNetwork

        while self.add(leftover, trainee):
            self.save_checkpoint(trainee)
        self.write_row(trainee)
        ckpt = self.save_checkpoint(trainee)
        state = trainee.snapshot()
        net = QNetwork(self.arch["hidden"])
        net.load_state_dict({k: v.cpu() for k, v in state["online"].items()})
        final = self.run_dir.save_final(net, {"env": "live", "episodes": self.episode, "decisions": trainee.decisions})
        self.csv.close()
        print(
            f"lbproxy train ({what}): stopped after episode {self.episode}; checkpoint {ckpt}, model {final}",
            file=sys.stderr,
            flush=True,
        )


async def until_stopped(stop: asyncio.Event, wake: asyncio.Event, step: Callable[[], Awaitable[None]]) -> None:
    """Await `step()` after every `wake` until `stop` is set (a step under way is finished)."""
    while not stop.is_set():
        stop_wait = asyncio.ensure_future(stop.wait())
        wake_wait = asyncio.ensure_future(wake.wait())
        await asyncio.wait({stop_wait, wake_wait}, return_when=asyncio.FIRST_COMPLETED)
        for f in (stop_wait, wake_wait):
            f.cancel()
        wake.clear()
        await step()


@contextlib.contextmanager
def stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` while the block runs."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class RuntimeTrainee:
    """The single-process trainee: this proxy's dqn runtime and its learner."""

    def __init__(self, rt: DqnRuntime, start_step: int) -> None:
        assert rt.learner is not None
        self.rt = rt
        self.learner = rt.learner
        self.start_step = start_step

    @property
    def last_loss(self) -> float:
        return self.learner.last_loss

    @property
    def total_updates(self) -> int:
        return self.learner.total_updates

    @property
    def epsilon(self) -> float:
        return self.rt.policy.epsilon

    @property
    def fallbacks(self) -> int:
        return sum(self.rt.policy.fallback_counts.values())

    @property
    def decisions(self) -> int:
        return self.start_step + self.rt.policy.decisions

    def snapshot(self) -> dict[str, Any]:
        return self.learner.snapshot()


class LiveTrainer:
    """`--workers 1`: this process routes, learns (thread, or process with --learner-process) and keeps the run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run = LiveRun(settings)
        self.metrics = Metrics()

    async def _start(self) -> tuple[ProxyServer, EpisodeTracker, RuntimeTrainee]:
        """The runtime (learner in train mode) behind a started proxy."""
        from lbproxy.proxy import ProxyServer
        from lbproxy.proxy.admin import admin_token
        from lbproxy.serve import tune_gc

        s, run = self.settings, self.run
        admin_token(s)  # an exposed admin listener without a token: refuse before loading anything
        net, learner_state = run.initial_state()
        tracker = EpisodeTracker(len(s.backends), s.episode_decisions, s.error_penalty, [b.weight for b in s.backends])
        rt = create_dqn_runtime(
            s,
            None,
            self.metrics,
            train=True,
            net=net,
            total_decisions=run.total_decisions,
            learner_state=learner_state,
            epsilon_start_step=run.start_step,
            tracker=tracker,
        )
        rt.report = run.run_dir.log.error  # a dead learner: on stderr and in the run's error log
        server = ProxyServer(s, rt.policy, self.metrics)
        server.lifespans.append(rt.lifespan)  # learner thread + gauges start/stop with the proxy
        await server.start()
        tune_gc()
        print(
            f"lbproxy train (live): proxy on {s.host}:{server.port}, admin {s.admin_host}:{server.admin_port}, "
            f"{len(s.backends)} backends, episodes {run.episode}->{run.total_episodes} x {s.episode_decisions} "
            f"decisions, run dir {run.run_dir.root}",
            file=sys.stderr,
            flush=True,
        )
        return server, tracker, RuntimeTrainee(rt, run.start_step)

    async def main(self) -> int:
        server, tracker, trainee = await self._start()
        run = self.run
        stop, wake = asyncio.Event(), asyncio.Event()
        tracker.on_episode = wake.set

        async def step() -> None:
            while run.add(tracker.completed, trainee):
                await asyncio.to_thread(run.save_checkpoint, trainee)
            self.metrics.episode.set(run.episode)
            if run.done:
                stop.set()

        with run.run_dir.log.capturing():
            try:
                if run.done:
                    stop.set()
                with stopped_by_signals(stop):
                    await until_stopped(stop, wake, step)
            except Exception as exc:
                run.run_dir.log.write("ERROR", f"live training stopped: {type(exc).__name__}: {exc}", exc)
                raise
            finally:
                await server.stop(DRAIN_TIMEOUT_S)  # drains in-flight requests, then stops the learner
                await asyncio.to_thread(run.finish, trainee, tracker.completed, "live")
        return 0


def run_train_live(settings: Settings) -> int:
    """Entry point for `lbproxy --mode train` with backends (or `--env live`); `--workers N` above 1
    runs the workers under the supervisor, which keeps the run (lbproxy/train/live_workers.py)."""
    if not settings.backends:
        raise ConfigError("live training needs backends; pass --backends URL[,URL] or --cluster-file FILE")
    if settings.workers > 1:
        from lbproxy.train.live_workers import run_train_workers

        return run_train_workers(settings)
    return run_async(LiveTrainer(settings).main())
