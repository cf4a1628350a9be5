"""`--workers N`: N proxy processes accepting on one port, and the supervisor that keeps them running.

Why a supervisor of our own and not gunicorn. aiohttp's `GunicornUVLoopWebWorker` (the ecosystem's
convention for multi-process aiohttp) serves an `aiohttp.web.Application` on sockets the gunicorn
arbiter binds and shares. lbproxy's data plane is a low-level `web.Server` (no router or middleware on
the hot path: benchmarks/results/proxy_overhead.md) beside a separate admin listener, and that admin
listener has to show and change the whole proxy, which gunicorn does for no app. What gunicorn would
give (spawn, restart, signal forwarding) is the small part of this module; the admin fan-out and the
metrics aggregation are ours either way; and gunicorn would become a runtime dependency.

Processes. The supervisor binds, without listening on, the data port with SO_REUSEPORT: a port 0 is
resolved once, a port in use is a one-line error before any worker starts, and nobody else takes the
port while a worker restarts. Then it starts N workers (lbproxy/worker_process.py), each a full
serve-mode proxy (lbproxy/serve.py) listening on that port with SO_REUSEPORT; the kernel spreads new
connections over their listeners. Every worker has its own event loop (uvloop), pool, policy, inline
inference and active health checks; passive outlier detection judges each worker's own traffic (as
nginx and HAProxy workers without a shared memory zone do). Metrics: lbproxy/telemetry.py.

Control. Each worker holds one end of a socketpair. The supervisor sends the settings as one JSON line
(so an admin token never shows in `ps` or the environment; with --online also the names of the
learner's shared-memory blocks and the worker's slot in them), the worker answers with its private
loopback admin port, the supervisor replays the admin changes made so far through that port and says
"go", the worker binds the data port and reports "serving". EOF means the other side is gone: a worker
whose supervisor died drains and exits; a worker's EOF tells the supervisor it died (restarted after a
back-off when it keeps dying early, counted in lbproxy_worker_restarts_total, logged).

Admin: one public listener for the whole proxy (lbproxy/proxy/admin_workers.py).

Learning (`--online`, and live training): ONE learner process fed by every worker, started before the
workers and stopped after they drained (lbproxy/shared_learner.py). In live training (`--mode train`)
the supervisor also keeps the run (lbproxy/train/live_workers.py): the workers send their finished
episodes on the control socket, and it writes the rows, checkpoints and final model and stops the
workers after the last episode.

Stop. SIGTERM/SIGINT to the supervisor: /readyz answers 503, every worker is told to drain (EOF), stops
accepting, finishes its requests in flight (serve.DRAIN_TIMEOUT_S) and exits 0; the supervisor exits 0
when every worker did. Workers run in their own process group, so a terminal's Ctrl-C reaches the
supervisor alone and the stop has one path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lbproxy.config import Settings

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from lbproxy.proxy.admin_workers import AdminChanges
    from lbproxy.shared_learner import SharedLearner
    from lbproxy.train.live_workers import WorkersTraining

STOP_GRACE_S = 5.0
"""A draining worker gets serve.DRAIN_TIMEOUT_S plus this to exit before it is killed; a worker whose
control socket closed gets this to exit."""
RESTART_BACKOFF_S = 0.5
"""Delay before restarting a worker that died within QUICK_EXIT_S of starting for the second time in a
row (the first is restarted at once); doubles per such death, up to RESTART_BACKOFF_MAX_S: a worker
that cannot start must not spin a core."""
RESTART_BACKOFF_MAX_S = 30.0
QUICK_EXIT_S = 10.0
EXIT_WORKER_FAILED = 1

log = logging.getLogger("lbproxy")


@dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    index: int
    popen: subprocess.Popen[bytes]
    started_s: float
    writer: asyncio.StreamWriter | None = None
    admin_port: int | None = None
    policy_name: str = ""
    error: str | None = None
    """Why it could not serve (a ConfigError's one line), when it said so."""
    admitted: bool = False
    """Has every recorded admin change: later ones are forwarded to it."""
    serving: bool = False
    """Accepting on the data port."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def tell_to_stop(self) -> None:
        """EOF on its control socket: drain and exit (or, still starting, exit)."""
        if self.writer is not None and not self.writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()


def hold_port(host: str, port: int) -> socket.socket:
    """Bind (no listen) host:port with SO_REUSEPORT, as asyncio's listeners are set up; ConfigError
    naming --port when it is taken."""
    from lbproxy.proxy.app import bind_error

    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise bind_error("--port", host, port, exc) from None
    return sock


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Starts `settings.workers` workers, keeps them running, owns the one admin listener, drains them."""

    def __init__(self, settings: Settings, training: WorkersTraining | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        from lbproxy.proxy.admin_workers import AdminChanges

        self.settings = settings
        self.n = settings.workers
        self.workers: list[Worker | None] = [None] * self.n
        self.changes: AdminChanges = AdminChanges()
        self.metrics_dir: Path
        """PROMETHEUS_MULTIPROC_DIR of the workers (lbproxy/telemetry.py), made by `run`."""
        self.registry = CollectorRegistry()
        """The supervisor's own metrics, beside the workers' in /metrics."""
        self.restarts = Counter(
            "lbproxy_worker_restarts", "Worker processes restarted after an unexpected exit", registry=self.registry
        )
        Gauge("lbproxy_workers", "Worker processes accepting requests", registry=self.registry).set_function(
            lambda: sum(1 for w in self.live if w.serving)
        )
        self.port = settings.port
        self.admin_port = settings.admin_port
        self.session: aiohttp.ClientSession | None = None
        self.started = False
        """Every worker of the first generation is serving."""
        self.stopping = False
        self._stop_requested = asyncio.Event()
        self.restart_count = 0
        self._ready = asyncio.Event()
        self._failed: int | None = None
        """Exit status when a worker of the first generation could not start."""
        self._clean = True
        self.learner: SharedLearner | None = None
        """The one learner every worker feeds with --online (lbproxy/shared_learner.py), made by `run`."""
        self.training = training
        """Live training's run, kept here (lbproxy/train/live_workers.py); None when serving."""

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w is not None]

    @property
    def serving(self) -> list[Worker]:
        return [w for w in self.workers if w is not None and w.serving]

    # --- one worker -----------------------------------------------------------------------------------
    def _worker_settings(self, index: int) -> bytes:
        data = self.settings.model_dump(mode="json")
        data.update(admin_token=self.settings.admin_token, admin_host="127.0.0.1", admin_port=0, port=self.port)
        attach = None if self.learner is None else self.learner.attachment(index).to_json()
        plan = {} if self.training is None else self.training.worker_settings(data)
        return json.dumps({"settings": data, "learner": attach, **plan}).encode() + b"\n"

    async def _run_worker(self, index: int) -> Worker:
        """Start worker `index`, admit it, and return once its process has exited."""
        assert self.session is not None
        parent, child = socket.socketpair()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "lbproxy.worker_process", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=env,
                process_group=0,
            )
            if self.learner is not None and self.learner.worker_cpus:
                with contextlib.suppress(OSError):  # it may already have exited: reaped below as usual
                    os.sched_setaffinity(popen.pid, self.learner.worker_cpus)
        finally:
            child.close()
        w = self.workers[index] = Worker(index, popen, time.monotonic())
        reader, w.writer = await asyncio.open_unix_connection(sock=parent)
        try:
            w.writer.write(self._worker_settings(index))
            hello = json.loads(await reader.readline() or b"{}")
            if "error" in hello:
                w.error = str(hello["error"])
            elif hello and not self.stopping:
                w.admin_port, w.policy_name = int(hello["admin_port"]), str(hello["policy"])
                async with self.changes.lock:  # no change slips between the replay and "go"
                    await self.changes.replay(self.session, w)
                    w.writer.write(b'{"go": true}\n')
                    w.admitted = True
                msg = json.loads(await reader.readline() or b"{}")
                w.error = msg.get("error")
                if "serving" in msg:
                    w.serving = True
                    if all(x is not None and x.serving for x in self.workers):
                        self._ready.set()
            if self.stopping:  # the stop came while it was starting: `_stop` found no socket to close
                w.tell_to_stop()
            with contextlib.suppress(ConnectionError, ValueError):
                while line := await reader.readline():  # a training worker's episodes, until EOF
                    if self.training is not None:
                        self.training.on_message(json.loads(line))
        finally:
            w.admitted = w.serving = False
            w.writer.close()
            await self._reap(w)
        return w

    async def _reap(self, w: Worker) -> None:
        """Wait for the process whose control socket closed to exit (kill it if it lingers)."""
        from prometheus_client import multiprocess

        deadline = time.monotonic() + STOP_GRACE_S
        while w.popen.poll() is None:
            if time.monotonic() > deadline:
                self._kill(w, "closed its control socket but did not exit")
                break
            await asyncio.sleep(0.02)
        multiprocess.mark_process_dead(w.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]  # its live-gauge values go

    @staticmethod
    def _kill(w: Worker, why: str) -> None:
        log.warning("lbproxy: worker %d (pid %d) %s; killing it", w.index, w.pid, why)
        with contextlib.suppress(ProcessLookupError):
            w.popen.kill()
        w.popen.wait()

    async def _keep(self, index: int) -> None:
        """Run worker `index` until the supervisor stops; restart it whenever it exits."""
        quick_deaths = 0
        while True:
            w = await self._run_worker(index)
            code = w.popen.returncode
            if self.stopping:
                self._clean &= code == 0 or not w.admin_port  # one still starting may end any way
                return
            if not self.started:  # the first generation: a worker that cannot start ends the proxy
                if self._failed is None:  # the first to fail says why, once for all workers
                    why = w.error or f"worker {index} (pid {w.pid}) {_how_it_ended(code)} while starting"
                    print(f"lbproxy: {why}", file=sys.stderr, flush=True)
                    self._failed = 2 if w.error is not None else EXIT_WORKER_FAILED
                self._ready.set()
                return
            lived_s = time.monotonic() - w.started_s
            quick_deaths = quick_deaths + 1 if lived_s < QUICK_EXIT_S else 0
            delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (quick_deaths - 2)) if quick_deaths > 1 else 0.0
            self.restarts.inc()
            self.restart_count += 1
            log.warning(
                "lbproxy: worker %d (pid %d) %s after %.1f s%s; restarting it%s (restart %d)",
                index,
                w.pid,
                _how_it_ended(code),
                lived_s,
                f" ({w.error})" if w.error else "",
                f" in {delay:g} s" if delay else "",
                self.restart_count,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            if self.stopping:
                return

    # --- the whole proxy ------------------------------------------------------------------------------
    async def run(self) -> int:
        import aiohttp

        from lbproxy.proxy.admin_workers import start_admin
        from lbproxy.serve import check_serve_settings, print_serving

        check_serve_settings(self.settings)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        holder = hold_port(self.settings.host, self.settings.port)
        self.port = holder.getsockname()[1]
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="lbproxy-metrics-"))
        runner: web.AppRunner | None = None
        keeping: asyncio.Task[None] | None = None
        """Live training's episode counter (lbproxy/train/live_workers.py)."""
        try:
            if self.training is not None:
                self.learner = await self.training.start_learner(self.n, self.metrics_dir)
                keeping = loop.create_task(self.training.keep(stop))  # sets `stop` after the last episode
            elif self.settings.online and self.settings.policy == "dqn":
                from lbproxy.shared_learner import SharedLearner

                self.learner = await SharedLearner.start(self.settings, self.n, self.metrics_dir)
            runner, self.admin_port = await start_admin(self)
            self.session = aiohttp.ClientSession(trust_env=False)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            keepers = [loop.create_task(self._keep(i)) for i in range(self.n)]
            waits = [loop.create_task(stop.wait()), loop.create_task(self._ready.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self._failed is None and not stop.is_set():
                self.started = True
                pids = ", ".join(str(w.pid) for w in self.live)
                policy = self.live[0].policy_name
                print_serving(self.settings, self.port, policy, self.admin_port, f" in {self.n} workers (pids {pids})")
                await waits[0]
            for t in waits:
                t.cancel()
            code = await self._stop(keepers)
            if self.training is not None and keeping is not None and self._failed is None:
                await keeping  # its checkpoint under way, if any, is written (and its error raised)
                await asyncio.to_thread(self.training.finish)  # with the workers' last episodes
            return code
        finally:
            if keeping is not None:
                keeping.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self.session is not None:
                await self.session.close()
            if runner is not None:
                await runner.cleanup()
            holder.close()
            if self.learner is not None:
                await self.learner.stop()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _stop(self, tasks: list[asyncio.Task[None]]) -> int:
        """Tell every worker to drain; kill those still running past the drain allowance."""
        from lbproxy.serve import DRAIN_TIMEOUT_S

        self.stopping = True
        self._stop_requested.set()
        for w in self.live:
            w.tell_to_stop()
        _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S + STOP_GRACE_S)
        if late:
            for w in self.live:
                if w.popen.poll() is None:
                    self._kill(w, "did not finish draining in time")
            await asyncio.gather(*late)
        if self._failed is not None:
            return self._failed
        return 0 if self._clean else EXIT_WORKER_FAILED


def run_supervisor(settings: Settings) -> int:
    from lbproxy.serve import run_async

    async def main() -> int:
        return await Supervisor(settings).run()

    return run_async(main())
