"""Shared helpers for integration tests: free ports on 127.0.0.1 and real child processes
(backends, proxy) that are waited for until ready and always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
READY = "ready"
"""How lbproxy's /readyz body starts when it is ready: `wait_http_ok(..., body_prefix=READY)` tells it from
another server that took the same free port."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_http_ok(
    url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None, body_prefix: str | None = None
) -> None:
    """Poll `url` until it answers 2xx (and, with `body_prefix`, a body that starts with it); fail
    early if `proc` died. The prefix tells our process from another one that took the same free port
    between `free_port()` and the bind (parallel test workers): its 2xx is not a readiness."""
    deadline = time.monotonic() + timeout_s
    last: str | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if 200 <= resp.status < 300:
                    if body_prefix is None or resp.read().decode(errors="replace").startswith(body_prefix):
                        return
                    last = "an answer from another server"
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


PORT_ATTEMPTS = 3
"""A free port can be taken by another process before lbproxy binds it (parallel test workers start
servers too): lbproxy then exits with "already in use" and is started again on new ports."""


def start_on_free_ports(
    launch: Callable[[int, int], subprocess.Popen[bytes]], timeout_s: float = 60.0, log: Path | None = None
) -> Proc:
    """lbproxy started by `launch(port, admin_port)` on free loopback ports, returned once its own
    /readyz says ready; started again on new ports when a port was taken meanwhile. `log`: where
    `launch` sends its output, if not to a pipe (read for the bind error)."""
    for attempt in range(PORT_ATTEMPTS):
        port, admin = free_port(), free_port()
        proc = Proc(launch(port, admin), port, admin)
        try:
            wait_http_ok(f"{proc.admin_url}/readyz", timeout_s=timeout_s, proc=proc.popen, body_prefix=READY)
            return proc
        except Exception as exc:
            proc.stop()
            said = str(exc) + (log.read_text(errors="replace") if log is not None and log.exists() else "")
            if "already in use" not in said or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("PORT_ATTEMPTS is at least 1")


def lbproxy_argv(mode: str, port: int, admin: int) -> list[str]:
    return ["-m", "lbproxy", "--mode", mode, "--host", LOOPBACK, "--port", str(port), "--admin-port", str(admin)]


def start_proxy(backends: Sequence[str], *extra: str, mode: str = "serve", env: dict[str, str] | None = None) -> Proc:
    """`python -m lbproxy --mode MODE ...` on free ports, ready when the admin /readyz answers."""
    return start_on_free_ports(
        lambda port, admin: spawn([*lbproxy_argv(mode, port, admin), "--backends", ",".join(backends), *extra], env=env)
    )


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


class CaptureServer:
    """A raw-socket HTTP/1.1 server that records each request's exact body bytes (a real socket, so
    nothing in between can decompress or re-encode); replies 200 with the byte count."""

    def __init__(self, extra_reply_headers: bytes = b"") -> None:
        self.extra = extra_reply_headers
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen()
        self.sock.settimeout(0.1)  # accept() polls `_stop`, so close() can end the thread
        self._stop = threading.Event()
        self.port = self.sock.getsockname()[1]
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        """One thread per connection: a client stalled mid-body must not hold up the others."""
        with conn, contextlib.suppress(OSError, ConnectionError, ValueError):
            conn.settimeout(30.0)
            self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            self.heads.append(head)  # recorded on arrival: a request cut mid-body still reached us
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                chunked |= name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower()
            if chunked:
                body, data = self._chunked(conn, data)
            else:
                while len(data) < length:
                    more = conn.recv(65536)
                    if not more:
                        return  # the proxy gave up on this request mid-body
                    data += more
                body, data = data[:length], data[length:]
            self.bodies.append(body)
            reply = str(len(body)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (self.extra, len(reply), reply))

    @staticmethod
    def _chunked(conn: socket.socket, data: bytes) -> tuple[bytes, bytes]:
        """A chunked body (the proxy re-chunks uploads of unknown length); returns (body, rest)."""
        body = b""
        while True:
            while b"\r\n" not in data:
                data += conn.recv(65536)
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                more = conn.recv(65536)
                if not more:
                    raise ConnectionError("chunked body cut short")
                data += more
            if size == 0:
                return body, data[2:]
            body, data = body + data[:size], data[size + 2 :]

    def close(self) -> None:
        """Call after the proxy stopped (its connections are closed, so every `_one` has returned)."""
        self._stop.set()
        self.thread.join(30)
        self.sock.close()


POLICY_ONLY = ("--latency-eject-factor", "0")
"""Proxy flags for tests that compare routing policies: latency ejection (lbproxy/outlier.py, on by
default) takes a backend a load-blind policy overloads out of its rotation once its queue makes it a
latency outlier, and the policy would be scored on what ejection did for it (CI: round robin's p99
then beat a trained DQN's; round robin's share of an overloaded 1-worker backend fell to 0.9 %)."""
