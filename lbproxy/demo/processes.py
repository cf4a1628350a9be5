"""The demo's child processes: each starts in its own process group with its output in
RUN_DIR/logs/NAME.log, is waited for until it answers HTTP, and is stopped with SIGTERM, then SIGKILL.

Own process groups (start_new_session) so that a stop reaches a child's whole tree, and a terminal
Ctrl-C does not hit the children before the demo stops them in order (the live trainer must get its
SIGTERM to drain and write its model)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
"""Time for a proxy to become ready: importing torch on a busy 2-core machine takes several seconds."""
STOP_TIMEOUT_S = 20.0
"""SIGTERM grace: the live trainer drains, checkpoints and writes dqn_final.pth before exiting."""


class DemoError(Exception):
    """A user-facing failure: one line, exit code 2."""


class Children:
    """Every process the demo starts, so that all of them can be stopped, newest first, on any exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        try:
            popen = subprocess.Popen(
                list(args),
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self.procs.append((name, popen, log))
        return popen

    def stop(self, popen: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; returns the exit code."""
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        for i, (_name, p, log) in enumerate(self.procs):
            if p is popen:
                log.close()
                del self.procs[i]
                break
        return int(popen.returncode)

    def stop_all(self) -> None:
        for _name, popen, _log in reversed(list(self.procs)):
            self.stop(popen)

    def tail(self, name: str, lines: int = 5) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(ln.strip() for ln in text.splitlines()[-lines:] if ln.strip())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout_s: float = 2.0) -> str | None:
    """The body of a 2xx answer; None for an error status or no answer (a child not up yet, or gone)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        exc.close()
        return None
    except (OSError, ValueError):
        return None


def wait_ready(url: str, popen: subprocess.Popen[bytes], what: str, children: Children, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise DemoError(f"{what} exited with code {popen.returncode}: {children.tail(name, 3)}")
        if http_get(url, 1.0) is not None:
            return
        time.sleep(0.1)
    raise DemoError(f"{what} not ready after {START_TIMEOUT_S:.0f} s; see {children.log_dir / (name + '.log')}")
