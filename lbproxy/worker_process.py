"""One `--workers` worker process: `python -m lbproxy.worker_process CONTROL_FD`, started by the
supervisor (lbproxy/workers.py, which describes the control protocol), and its end of the control socket.

The worker is a full serve-mode proxy (lbproxy/serve.py `serve(settings, link)` drives the link): it
reads its settings (and, with `--online`, its slot of the supervisor's learner) from the socket,
reports its private admin port, waits for "go", reports the data port it serves, and drains when the
socket reaches EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from typing import TYPE_CHECKING, Any

from lbproxy.config import ConfigError, Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from lbproxy.live_episodes import EpisodeTracker
    from lbproxy.proxy import ProxyServer
    from lbproxy.rl.shared_replay import Attachment
    from lbproxy.train.live_workers import WorkerPlan


class SupervisorGone(Exception):
    """The worker's control socket reached EOF before the worker accepted: nothing to serve for."""


class WorkerLink:
    """A worker's end of its control socket (lbproxy/serve.py `serve(settings, link)` drives it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.learner: Attachment | None = None
        self.training: WorkerPlan | None = None
        """Live training (lbproxy/train/live_workers.py): the run's ε schedule; episodes go to the supervisor."""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None

    def read_settings(self) -> Settings | None:
        """The settings line (blocking, before any loop runs); None when the supervisor is gone. It also
        says which slot of the supervisor's learner this worker feeds (`learner`), when there is one."""
        from lbproxy.rl.shared_replay import Attachment
        from lbproxy.train.live_workers import WorkerPlan

        with self.sock.makefile("rb") as fh:  # closing the file leaves the socket open
            line = fh.readline()
        if not line:
            return None
        msg = json.loads(line)
        self.learner = Attachment.from_json(msg["learner"]) if msg.get("learner") else None
        self.training = WorkerPlan.from_json(msg["training"]) if msg.get("training") else None
        return Settings.model_validate(msg["settings"])

    async def admitted(self, server: ProxyServer) -> None:
        """`ProxyServer.start(before_accepting=...)`: report the admin port, wait for "go" (the
        supervisor replays its admin changes meanwhile)."""
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._send({"admin_port": server.admin_port, "policy": server.policy_name})
        if not await self._reader.readline():
            raise SupervisorGone

    def serving(self, server: ProxyServer, on_stop: Callable[[], None]) -> None:
        """Report the data port; call `on_stop` when the supervisor asks for a stop or is gone."""
        self._send({"serving": server.port})
        self._watch = asyncio.get_running_loop().create_task(self._wait_eof(on_stop))

    async def _wait_eof(self, on_stop: Callable[[], None]) -> None:
        assert self._reader is not None
        with contextlib.suppress(ConnectionError):
            await self._reader.read()
        on_stop()

    async def failed(self, exc: ConfigError) -> None:
        """Tell the supervisor why this worker cannot serve (it prints the line once for all workers)."""
        line = json.dumps({"error": str(exc)}).encode() + b"\n"
        try:
            if self._writer is None:  # it failed before it was admitted: the socket is still ours
                self.sock.setblocking(False)
                await asyncio.get_running_loop().sock_sendall(self.sock, line)
            else:
                self._writer.write(line)
                await self._writer.drain()
        except OSError:
            print(f"lbproxy: {exc}", file=sys.stderr, flush=True)

    def send_episodes(self, tracker: EpisodeTracker, fallbacks: int) -> None:
        """The tracker's finished episodes (and the fallback decisions since the last) to the supervisor."""
        from lbproxy.train.live_workers import episode_message

        if self._writer is not None and not self._writer.is_closing():
            self._send(episode_message(tracker.completed, fallbacks))
        tracker.completed.clear()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg).encode() + b"\n")


async def _serve_worker(settings: Settings, link: WorkerLink) -> int:
    from lbproxy.serve import serve

    try:
        return await serve(settings, link)
    except SupervisorGone:
        return 0
    except ConfigError as exc:  # e.g. a model file that cannot be used
        await link.failed(exc)
        return 2


def worker_main(argv: list[str]) -> int:
    """`python -m lbproxy.worker_process CONTROL_FD`: one worker, started by the supervisor."""
    from lbproxy.serve import run_async

    link = WorkerLink(socket.socket(fileno=int(argv[0])))
    try:
        settings = link.read_settings()
        return 0 if settings is None else run_async(_serve_worker(settings, link))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
