"""Failure handling over real backends: 502/503/504 mappings, retry onto a healthy backend,
passive ejection and recovery, peak-EWMA steering away from a slowed backend, graceful drain, and
the memory bound when 200 MB stream through in each direction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import LOOPBACK, Proc, free_port, running, start_backend, start_proxy
from test_proxy import call

pytestmark = pytest.mark.timing


def fault(backend: Proc, **spec: object) -> None:
    status, _, body = call(
        backend.port, "POST", "/admin/fault", {"Content-Type": "application/json"}, json.dumps(spec).encode()
    )
    assert status == 200, body


def reset(backend: Proc) -> None:
    assert call(backend.port, "POST", "/admin/reset", {"Content-Type": "application/json"}, b"{}")[0] == 200


def backend_rows(proxy: Proc) -> dict[str, dict[str, object]]:
    status, _, body = call(proxy.admin_port or 0, "GET", "/admin/backends")
    assert status == 200
    return {r["url"]: r for r in json.loads(body)["backends"]}


def metric(proxy: Proc, name: str) -> float:
    text = call(proxy.admin_port or 0, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Proc, Proc]]:
    b1, b2 = start_backend(workers=16), start_backend(workers=16)
    with running(b1, b2):
        yield b1, b2


@pytest.fixture(autouse=True)
def _reset_faults(pair: tuple[Proc, Proc]) -> Iterator[None]:
    yield
    for b in pair:
        if b.popen.poll() is None:
            reset(b)


def test_502_when_the_only_backend_is_down() -> None:
    dead = f"http://{LOOPBACK}:{free_port()}"
    with running(start_proxy([dead], "--health-interval-s", "0")) as (proxy,):
        status, _, body = call(proxy.port, "GET", "/api/light")
        assert status == 502 and b"bad gateway" in body
        assert metric(proxy, 'lbproxy_upstream_errors_total{backend="127.0.0.1') >= 1


def test_503_when_no_backend_is_available(pair: tuple[Proc, Proc]) -> None:
    b1, _ = pair
    with running(start_proxy([b1.url], "--health-interval-s", "0")) as (proxy,):
        name = backend_rows(proxy)[b1.url]["name"]
        assert call(proxy.admin_port or 0, "DELETE", f"/admin/backends/{name}")[0] == 200
        status, _, body = call(proxy.port, "GET", "/api/light")
        assert status == 503 and b"no backend" in body
        assert call(proxy.admin_port or 0, "GET", "/readyz")[0] == 503


@pytest.mark.parametrize("flag", ["--read-timeout-s", "--total-timeout-s"])
def test_504_on_upstream_timeout(pair: tuple[Proc, Proc], flag: str) -> None:
    b1, _ = pair
    with running(start_proxy([b1.url], flag, "0.3", "--health-interval-s", "0")) as (proxy,):
        fault(b1, pause=True)
        # 504, not a client-side timeout (call() gives up after 30 s): the proxy's own timer fired
        status, _, body = call(proxy.port, "GET", "/api/light", timeout_s=30.0)
        assert status == 504 and b"timeout" in body


def test_retry_onto_a_healthy_backend(pair: tuple[Proc, Proc]) -> None:
    b1, _ = pair
    dead = f"http://{LOOPBACK}:{free_port()}"
    args = ["--policy", "round_robin", "--health-interval-s", "0", "--eject-consecutive-failures", "1000"]
    with running(start_proxy([dead, b1.url], *args)) as (proxy,):
        for _ in range(10):
            assert call(proxy.port, "GET", "/api/light")[0] == 200
        assert metric(proxy, "lbproxy_retries_total") >= 4
        # a request with a body is never replayed: some POSTs reach the dead backend and fail
        codes = {call(proxy.port, "POST", "/api/light", body=b"x" * 10)[0] for _ in range(6)}
        assert codes == {200, 502}


def test_retry_can_be_disabled(pair: tuple[Proc, Proc]) -> None:
    b1, _ = pair
    dead = f"http://{LOOPBACK}:{free_port()}"
    args = ["--no-retry", "--health-interval-s", "0", "--eject-consecutive-failures", "1000"]
    with running(start_proxy([dead, b1.url], *args)) as (proxy,):
        codes = [call(proxy.port, "GET", "/api/light")[0] for _ in range(6)]
        assert 502 in codes and 200 in codes


@pytest.mark.slow
def test_ejection_and_recovery(pair: tuple[Proc, Proc]) -> None:
    b1, b2 = pair
    # The ejection (base x 1) must outlast the ~25 requests that check it even on a loaded CI
    # machine: with 1 s, a slow run saw b1 come back (still failing) mid-check.
    args = ["--eject-consecutive-failures", "3", "--eject-base-s", "3", "--health-interval-s", "0"]
    with running(start_proxy([b1.url, b2.url], "--policy", "round_robin", *args)) as (proxy,):
        fault(b1, error_rate=1.0)
        codes = [call(proxy.port, "GET", "/api/light")[0] for _ in range(12)]
        assert codes == [200] * 12  # the 3 failures that eject b1 were each retried on b2
        rows = backend_rows(proxy)
        assert rows[b1.url]["available"] is False and rows[b1.url]["times_ejected"] == 1
        assert all(c == 200 for c in [call(proxy.port, "GET", "/api/light")[0] for _ in range(10)])
        assert metric(proxy, "lbproxy_ejections_total") == 1
        reset(b1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not backend_rows(proxy)[b1.url]["available"]:
            time.sleep(0.1)
        before = backend_rows(proxy)[b1.url]["requests"]
        assert all(call(proxy.port, "GET", "/api/light")[0] == 200 for _ in range(10))
        assert backend_rows(proxy)[b1.url]["requests"] >= before + 4  # back in rotation


def test_active_health_check_marks_down_and_up(pair: tuple[Proc, Proc]) -> None:
    b1, b2 = pair
    # probe a path that honours injected faults, so the check fails without killing the backend
    args = ["--health-interval-s", "0.1", "--health-fall", "2", "--health-rise", "2", "--health-path", "/api/light"]
    with running(start_proxy([b1.url, b2.url], *args)) as (proxy,):
        fault(b1, error_rate=1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["healthy"]:
            time.sleep(0.1)
        assert backend_rows(proxy)[b1.url]["healthy"] is False
        reset(b1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not backend_rows(proxy)[b1.url]["healthy"]:
            time.sleep(0.1)
        assert backend_rows(proxy)[b1.url]["available"] is True


async def _load(port: int, requests: int, concurrency: int, max_s: float = 30.0) -> int:
    """Closed-loop load: `requests` GETs from `concurrency` clients, stopped early after `max_s`
    (a bound, not a measurement: the count drives the test, so a loaded machine only makes it slower).
    Returns the number of requests completed."""
    sent = 0
    done = 0
    deadline = time.monotonic() + max_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, done
        while time.monotonic() < deadline and sent < requests:
            sent += 1
            async with session.get(f"http://{LOOPBACK}:{port}/api/light") as resp:
                assert resp.status == 200
                await resp.read()
            done += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return done


@pytest.mark.slow
async def test_peak_ewma_avoids_a_slowed_backend(pair: tuple[Proc, Proc]) -> None:
    b1, b2 = pair
    with running(start_proxy([b1.url, b2.url], "--policy", "peak_ewma", "--health-interval-s", "0")) as (proxy,):
        await _load(proxy.port, 100, 4)
        fault(b1, slowdown=10)
        await _load(proxy.port, 150, 4)  # a handful of slow responses move the peak-sensitive estimate
        before = {u: r["requests"] for u, r in backend_rows(proxy).items()}
        sent = await _load(proxy.port, 200, 4)
        after = {u: r["requests"] for u, r in backend_rows(proxy).items()}
        share_slow = (after[b1.url] - before[b1.url]) / max(1, sent)
        assert sent >= 50
        assert share_slow < 0.2, share_slow  # well below the 1/2 an even split would give


def test_drain_on_sigterm(pair: tuple[Proc, Proc]) -> None:
    """SIGTERM while a request is held by a paused backend: the proxy stops accepting, waits for it
    to finish once the backend resumes, and exits 0."""
    b1, _ = pair
    proxy = start_proxy([b1.url], "--health-interval-s", "0")
    with running(proxy):
        fault(b1, pause=True)
        result: dict[str, int] = {}

        def held() -> None:
            result["status"] = call(proxy.port, "GET", "/api/light", timeout_s=60.0)[0]

        t = threading.Thread(target=held)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["in_flight"] == 0:
            time.sleep(0.05)
        assert backend_rows(proxy)[b1.url]["in_flight"] == 1
        proxy.popen.send_signal(signal.SIGTERM)
        # Stopped accepting: poll until the listener is gone (bounded), then it must still be alive,
        # held by the request (the drain timeout is 10 s, far longer than this wait).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _accepts(proxy.port):
            time.sleep(0.05)
        assert proxy.popen.poll() is None  # still draining
        reset(b1)
        t.join(30)
        assert proxy.popen.wait(30) == 0
        assert result.get("status") == 200


class StaleKeepAliveServer:
    """A raw-socket HTTP/1.1 backend whose keep-alive connections go stale: it answers a connection's
    first request with 200 (no `Connection: close`, so the proxy pools the connection) and then,
    per `mode`:
    - "drop_next": reads the connection's next request and closes without a byte of response,
      exactly what a server does when its idle timeout fires as a reused request arrives;
    - "close_after_reply": closes right after the reply (the proxy may or may not notice first).
    Counts answered and dropped requests. Threads end on `close()` (no leaked sockets)."""

    def __init__(self, mode: str) -> None:
        import socket

        self.mode = mode
        self.answered = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen()
        self.sock.settimeout(0.1)  # the accept loop polls `_stop`
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30.0)
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _read_request(conn: Any, data: bytes) -> tuple[bytes | None, bytes]:
        """Read one request (head + Content-Length body); returns (method or None if the peer
        closed first, leftover bytes)."""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return head.split(b" ", 1)[0], rest[length:]

    def _serve(self, conn: Any) -> None:
        import contextlib

        with contextlib.suppress(OSError), conn:
            method, left = self._read_request(conn, b"")
            if method is None:
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
            conn.sendall(head if method == b"HEAD" else head + b"ok")
            with self._lock:
                self.answered += 1
            if self.mode == "drop_next":
                method, _ = self._read_request(conn, left)
                if method is not None:
                    with self._lock:
                        self.dropped += 1
            # leaving the `with` closes the socket: a FIN, no response

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; it then closes
        for t in self._threads:
            t.join(10)


@pytest.mark.parametrize("backends", [1, 2])
def test_stale_keepalive_connection_is_retried(backends: int) -> None:
    """A pooled connection the backend closed without `Connection: close`: idempotent requests are
    replayed (on a fresh connection, or the other backend) and the client sees 200, never 502; a
    POST with a body is not replayed."""
    servers = [StaleKeepAliveServer("drop_next") for _ in range(backends)]
    try:
        args = ["--policy", "round_robin", "--health-interval-s", "0", "--eject-consecutive-failures", "1000"]
        with running(start_proxy([s.url for s in servers], *args)) as (proxy,):
            methods = ["GET", "HEAD", "DELETE", "OPTIONS", "GET", "GET", "GET", "GET"]
            codes = [call(proxy.port, m, "/api/light")[0] for m in methods]
            assert codes == [200] * len(methods)
            dropped = sum(s.dropped for s in servers)
            assert dropped >= len(methods) - 2 * backends  # the stale path really was exercised
            assert metric(proxy, "lbproxy_retries_total") == dropped
            # not idempotent, body sent: never replayed, so a stale connection costs this one request
            post = [call(proxy.port, "POST", "/api/light", body=b"p" * 100)[0] for _ in range(2 * backends + 2)]
            assert 200 in post and set(post) <= {200, 502}
    finally:
        for s in servers:
            s.close()


def test_backend_closing_after_each_reply_never_gives_502() -> None:
    """The everyday race: the backend closes right after replying; whether or not the proxy saw the
    FIN before reusing the connection, the client gets 200."""
    server = StaleKeepAliveServer("close_after_reply")
    try:
        with running(start_proxy([server.url], "--health-interval-s", "0")) as (proxy,):
            assert [call(proxy.port, "GET", "/api/light")[0] for _ in range(20)] == [200] * 20
            assert server.answered >= 20
    finally:
        server.close()


def test_backend_restart_on_the_same_port_never_gives_502() -> None:
    """Kill the backend behind pooled connections and start a new one on the same port: the next
    GET goes out on a fresh connection (or is retried) and succeeds."""
    backend = start_backend(workers=4)
    try:
        with running(start_proxy([backend.url], "--health-interval-s", "0")) as (proxy,):
            assert all(call(proxy.port, "GET", "/api/light")[0] == 200 for _ in range(5))
            backend.stop()
            backend = start_backend(port=backend.port, workers=4)
            assert [call(proxy.port, "GET", "/api/light")[0] for _ in range(5)] == [200] * 5
    finally:
        backend.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
def test_200mb_each_way_with_bounded_memory(pair: tuple[Proc, Proc]) -> None:
    import http.client

    b1, _ = pair
    total = 200 * 1024 * 1024
    block = b"m" * (1024 * 1024)
    with running(start_proxy([b1.url], "--health-interval-s", "0")) as (proxy,):
        call(proxy.port, "GET", "/api/light?size=100000")  # warm up buffers and code paths
        pid = proxy.popen.pid
        hwm_before = _vm_kib(pid, "VmHWM")

        def upload() -> Iterator[bytes]:
            for _ in range(total // len(block)):
                yield block

        conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=60)
        conn.request("POST", "/api/light", body=upload(), headers={"Content-Length": str(total)})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200 and str(total).encode() in body

        conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=60)
        conn.request("GET", f"/api/light?size={total}")
        resp = conn.getresponse()
        got = 0
        while chunk := resp.read(1024 * 1024):
            got += len(chunk)
        conn.close()
        assert resp.status == 200 and got == total
        grown_mib = (_vm_kib(pid, "VmHWM") - hwm_before) / 1024
        print(f"proxy peak RSS grew by {grown_mib:.1f} MiB while 2 x 200 MiB streamed through")
        assert grown_mib < 30, f"proxy peak RSS grew by {grown_mib:.1f} MiB"


def test_client_abort_mid_stream_is_accounted(pair: tuple[Proc, Proc]) -> None:
    """A client that hangs up mid-download must not leak in-flight counts or poison connections."""
    b1, _ = pair
    with running(start_proxy([b1.url], "--health-interval-s", "0")) as (proxy,):
        for _ in range(3):
            with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as s:
                s.sendall(b"GET /api/light?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
                got = 0
                while got < 1_000_000:
                    chunk = s.recv(65536)
                    assert chunk
                    got += len(chunk)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["in_flight"] != 0:
            time.sleep(0.05)
        assert backend_rows(proxy)[b1.url]["in_flight"] == 0
        assert all(call(proxy.port, "GET", "/api/light")[0] == 200 for _ in range(5))
