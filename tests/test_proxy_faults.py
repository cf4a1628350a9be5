"""Failure handling over real backends: 502/503/504 mappings, retry onto a healthy backend,
passive ejection and recovery, peak-EWMA steering away from a slowed backend, graceful drain, and
the memory bound when 200 MB stream through in each direction."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support import LOOPBACK, Proc, free_port, running, start_backend, start_proxy
from test_proxy import call


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
        t0 = time.monotonic()
        status, _, body = call(proxy.port, "GET", "/api/light")
        assert status == 504 and b"timeout" in body
        assert time.monotonic() - t0 < 5.0


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


def test_ejection_and_recovery(pair: tuple[Proc, Proc]) -> None:
    b1, b2 = pair
    args = ["--eject-consecutive-failures", "3", "--eject-base-s", "1", "--health-interval-s", "0"]
    with running(start_proxy([b1.url, b2.url], "--policy", "round_robin", *args)) as (proxy,):
        fault(b1, error_rate=1.0)
        codes = [call(proxy.port, "GET", "/api/light")[0] for _ in range(12)]
        assert codes.count(500) == 3  # exactly the consecutive failures that trigger the ejection
        rows = backend_rows(proxy)
        assert rows[b1.url]["available"] is False and rows[b1.url]["times_ejected"] == 1
        assert all(c == 200 for c in [call(proxy.port, "GET", "/api/light")[0] for _ in range(10)])
        assert metric(proxy, "lbproxy_ejections_total") == 1
        reset(b1)
        deadline = time.monotonic() + 5
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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["healthy"]:
            time.sleep(0.1)
        assert backend_rows(proxy)[b1.url]["healthy"] is False
        reset(b1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not backend_rows(proxy)[b1.url]["healthy"]:
            time.sleep(0.1)
        assert backend_rows(proxy)[b1.url]["available"] is True


async def _load(port: int, seconds: float, concurrency: int, max_requests: int) -> int:
    """Closed-loop load from `concurrency` clients, bounded in time and count; returns requests sent."""
    sent = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            async with session.get(f"http://{LOOPBACK}:{port}/api/light") as resp:
                await resp.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return sent


async def test_peak_ewma_avoids_a_slowed_backend(pair: tuple[Proc, Proc]) -> None:
    b1, b2 = pair
    with running(start_proxy([b1.url, b2.url], "--policy", "peak_ewma", "--health-interval-s", "0")) as (proxy,):
        await _load(proxy.port, 1.0, 4, 400)
        fault(b1, slowdown=10)
        await _load(proxy.port, 2.0, 4, 600)  # within a few seconds the estimate has moved
        before = {u: r["requests"] for u, r in backend_rows(proxy).items()}
        sent = await _load(proxy.port, 2.0, 4, 300)
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
            result["status"] = call(proxy.port, "GET", "/api/light")[0]

        t = threading.Thread(target=held)
        t.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["in_flight"] == 0:
            time.sleep(0.05)
        proxy.popen.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.popen.poll() is None  # still draining
        reset(b1)
        t.join(15)
        assert proxy.popen.wait(15) == 0
        assert result.get("status") == 200


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
    import socket

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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and backend_rows(proxy)[b1.url]["in_flight"] != 0:
            time.sleep(0.05)
        assert backend_rows(proxy)[b1.url]["in_flight"] == 0
        assert all(call(proxy.port, "GET", "/api/light")[0] == 200 for _ in range(5))
