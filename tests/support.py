"""Shared helpers for integration tests: free ports on 127.0.0.1 and real child processes
(backends, proxy) that are waited for until ready and always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 2xx; fail early if `proc` died."""
    deadline = time.monotonic() + timeout_s
    last: str | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if 200 <= resp.status < 300:
                    return
        except urllib.error.HTTPError as exc:
            # A non-2xx answer (e.g. /readyz 503 while the proxy binds its data port) holds the open
            # socket: close it now. Left to the garbage collector (exc <-> traceback is a cycle), it
            # surfaces as "unclosed socket" ResourceWarning in whichever later test triggers a GC pass.
            exc.close()
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = repr(exc)  # a string: keeping the exception would keep its frames (and sockets) alive
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    admin_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None and not self.popen.stdout.closed:
            # Keep the output for `output()` and close the pipe: an unclosed pipe raises a
            # ResourceWarning at garbage collection, an error under filterwarnings=error.
            # Non-blocking: a surviving grandchild holding the pipe must not hang the test run.
            os.set_blocking(self.popen.stdout.fileno(), False)
            try:
                data = self.popen.stdout.read() or b""
            except BlockingIOError:
                data = b""
            self._output = data.decode(errors="replace")
            self.popen.stdout.close()
        return self.popen.returncode

    def output(self) -> str:
        if getattr(self, "_output", None) is not None:
            return str(self._output)
        if self.popen.stdout is None or self.popen.poll() is None:
            return ""
        return self.popen.stdout.read().decode(errors="replace")


def spawn(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def start_backend(*extra: str, port: int | None = None, workers: int = 4, speed: float = 1.0) -> Proc:
    """`python -m backends --port P --workers W --speed S [extra...]`, ready when /health answers."""
    port = port or free_port()
    p = spawn(
        [
            "-m",
            "backends",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--speed",
            str(speed),
            *extra,
        ]
    )
    proc = Proc(p, port)
    try:
        wait_http_ok(f"{proc.url}/health", proc=p)
    except Exception:
        proc.stop()
        raise
    return proc


def start_proxy(backends: Sequence[str], *extra: str, mode: str = "serve", env: dict[str, str] | None = None) -> Proc:
    """`python -m lbproxy --mode MODE ...` on free ports, ready when the admin /readyz answers."""
    port, admin = free_port(), free_port()
    argv = ["-m", "lbproxy", "--mode", mode, "--host", LOOPBACK, "--port", str(port), "--admin-port", str(admin)]
    p = spawn([*argv, "--backends", ",".join(backends), *extra], env=env)
    proc = Proc(p, port, admin)
    try:
        wait_http_ok(f"{proc.admin_url}/readyz", proc=p)
    except Exception:
        proc.stop()
        raise
    return proc


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()
