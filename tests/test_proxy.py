"""The proxy over real emulated backends (real processes, real sockets on 127.0.0.1): streaming,
header rules, bodiless responses, gzip passthrough, not-an-open-proxy, admin endpoints, gauges.
Failure handling (502/503/504, retry, ejection, live policy behaviour, memory bound) is in
test_proxy_faults.py."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from support import LOOPBACK, CaptureServer, Proc, free_port, running, start_backend, start_proxy

from lbproxy.proxy.headers import request_headers, response_headers

Response = tuple[int, http.client.HTTPMessage, bytes]


def call(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout_s: float = 10.0,
) -> Response:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def raw_call(port: int, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send bytes as they are (for targets http.client would not produce) and read the reply."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def echoed_headers(body: bytes) -> dict[str, str]:
    """Headers the backend saw, from its `?echo=headers` JSON (lower-cased names)."""
    data: Any = json.loads(body)
    if isinstance(data, dict) and isinstance(data.get("headers"), dict | list):
        data = data["headers"]
    items = data.items() if isinstance(data, dict) else data
    out: dict[str, str] = {}
    for k, v in items:
        out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, Proc, Proc]]:
    b1, b2 = start_backend(workers=16), start_backend(workers=16)
    try:
        proxy = start_proxy([b1.url, b2.url], "--policy", "round_robin")
    except Exception:
        b1.stop()
        b2.stop()
        raise
    with running(proxy, b1, b2):
        yield proxy, b1, b2


@pytest.fixture(scope="module")
def proxy(cluster: tuple[Proc, Proc, Proc]) -> Proc:
    return cluster[0]


# --- header rules ------------------------------------------------------------------------------------
def test_request_header_rules_unit() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    incoming = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "shop.example:8443"),
                ("Connection", "keep-alive, X-Secret"),
                ("X-Secret", "s"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic eA=="),
                ("Proxy-Connection", "keep-alive"),
                ("X-Forwarded-For", "1.1.1.1"),
                ("X-Forwarded-For", "2.2.2.2"),
                ("Via", "1.0 edge"),
                ("Accept-Encoding", "gzip"),
            ]
        )
    )
    out = request_headers(incoming, "10.0.0.9", "http")
    assert out["Host"] == "shop.example:8443"
    assert out["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 10.0.0.9"
    assert out["X-Forwarded-Host"] == "shop.example:8443"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["Via"] == "1.0 edge, 1.1 lbproxy"
    assert out["Accept-Encoding"] == "gzip"
    for gone in ("Connection", "X-Secret", "Keep-Alive", "TE", "Transfer-Encoding", "Upgrade"):
        assert gone not in out
    assert "Proxy-Authorization" not in out and "Proxy-Connection" not in out


def test_response_header_rules_unit() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    upstream = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Content-Type", "text/plain"),
                ("Content-Encoding", "gzip"),
                ("Connection", "close, X-Internal"),
                ("X-Internal", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Proxy-Authenticate", "Basic"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]
        )
    )
    out = response_headers(upstream)
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Encoding"] == "gzip" and out["Via"] == "1.1 lbproxy"
    for gone in ("Connection", "X-Internal", "Transfer-Encoding", "Proxy-Authenticate"):
        assert gone not in out


def test_batched_metrics_match_prometheus() -> None:
    """The hot path counts locally and flushes; the exposition must equal direct observation."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from lbproxy.proxy.batched_metrics import BatchedCounter, BatchedHistogram

    reg = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    direct = Histogram("d", "d", ["x"], buckets=buckets, registry=reg).labels("a")
    batched_h = Histogram("b", "b", ["x"], buckets=buckets, registry=reg).labels("a")
    counter = Counter("c", "c", registry=reg)
    bh, bc = BatchedHistogram(batched_h), BatchedCounter(counter)
    values = [0.0005, 0.001, 0.0011, 0.05, 0.1, 0.5, 2.0, 7.0, 0.01]
    for v in values:
        direct.observe(v)
        bh.observe(v)
        bc.inc()
    bh.flush()
    bc.flush()
    bh.flush()  # idempotent when nothing new was counted
    for le in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
        assert reg.get_sample_value("b_bucket", {"x": "a", "le": le}) == reg.get_sample_value(
            "d_bucket", {"x": "a", "le": le}
        )
    assert reg.get_sample_value("b_sum", {"x": "a"}) == pytest.approx(sum(values))
    assert reg.get_sample_value("c_total") == len(values)


def test_forwarded_headers_live(proxy: Proc) -> None:
    status, headers, body = call(
        proxy.port,
        "GET",
        "/api/light?echo=headers",
        {
            "Host": "shop.example",
            "X-Forwarded-For": "203.0.113.7",
            "Connection": "X-Secret",
            "X-Secret": "do-not-forward",
            "Proxy-Authorization": "Basic eA==",
            "TE": "trailers",
            "X-Custom": "kept",
        },
    )
    assert status == 200, body
    seen = echoed_headers(body)
    assert seen["host"] == "shop.example"  # Host preserved
    assert seen["x-forwarded-for"] == f"203.0.113.7, {LOOPBACK}"  # appended
    assert seen["x-forwarded-host"] == "shop.example"
    assert seen["x-forwarded-proto"] == "http"
    assert "1.1 lbproxy" in seen["via"]
    assert seen["x-custom"] == "kept"
    for gone in ("x-secret", "proxy-authorization", "te", "connection"):
        assert gone not in seen
    assert "1.1 lbproxy" in headers["Via"]


# --- bodies --------------------------------------------------------------------------------------------
def test_sized_body_round_trip(proxy: Proc) -> None:
    for size in (0, 1, 100_000, 3_000_000):
        status, headers, body = call(proxy.port, "GET", f"/api/light?size={size}")
        assert status == 200
        assert len(body) == size
        assert headers["Content-Length"] == str(size)


def test_chunked_response_streams(proxy: Proc) -> None:
    status, headers, body = call(proxy.port, "GET", "/chunked")
    assert status == 200
    assert headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in headers
    direct_status, _, direct = call(_backend_port(proxy), "GET", "/chunked")
    assert direct_status == 200 and body == direct


def _backend_port(proxy: Proc) -> int:
    status, _, body = call(proxy.admin_port or 0, "GET", "/admin/backends")
    assert status == 200
    url = json.loads(body)["backends"][0]["url"]
    return int(url.rsplit(":", 1)[1])


def test_upload_is_streamed_to_the_backend(proxy: Proc) -> None:
    payload = b"u" * 2_500_000
    status, _, body = call(proxy.port, "POST", "/api/light", body=payload)
    assert status == 200
    assert str(len(payload)).encode() in body


def test_chunked_upload(proxy: Proc) -> None:
    def gen() -> Iterator[bytes]:
        for _ in range(10):
            yield b"c" * 1000

    conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=10)
    try:
        conn.request("PUT", "/api/light", body=gen(), encode_chunked=True)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and b"10000" in body


def test_head_has_no_body(proxy: Proc) -> None:
    status, headers, body = call(proxy.port, "HEAD", "/api/light?size=1234")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == "1234"


@pytest.mark.parametrize("code", [204, 304])
def test_bodiless_statuses(proxy: Proc, code: int) -> None:
    status, headers, body = call(proxy.port, "GET", f"/api/light?status={code}")
    assert status == code and body == b""
    assert "Transfer-Encoding" not in headers
    # the connection stays usable: a follow-up on a fresh request still works
    assert call(proxy.port, "GET", "/api/light")[0] == 200


def test_status_codes_pass_through(proxy: Proc) -> None:
    for code in (201, 404, 418, 500):
        assert call(proxy.port, "GET", f"/api/light?status={code}")[0] == code


def test_gzip_passthrough(proxy: Proc) -> None:
    status, headers, body = call(proxy.port, "GET", "/api/light?size=20000&gzip=1", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Length"] == str(len(body))
    assert len(gzip.decompress(body)) == 20000  # compressed bytes arrived unchanged


def test_gzip_request_body_is_not_decompressed() -> None:
    capture = CaptureServer()
    try:
        with running(start_proxy([f"http://{LOOPBACK}:{capture.port}"], "--health-interval-s", "0")) as (proxy,):
            raw = gzip.compress(b"z" * 50_000)
            headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
            status, _, body = call(proxy.port, "POST", "/upload", headers, raw)
            assert status == 200 and body == str(len(raw)).encode()
            assert capture.bodies[-1] == raw  # byte for byte, still compressed
    finally:
        capture.close()


def test_hop_by_hop_headers_stripped_both_ways_live() -> None:
    """Exact bytes on the upstream socket, and the reply's hop-by-hop fields removed on the way back."""
    capture = CaptureServer(b"Connection: keep-alive, X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n")
    try:
        with running(start_proxy([f"http://{LOOPBACK}:{capture.port}"], "--health-interval-s", "0")) as (proxy,):
            status, headers, _ = call(
                proxy.port,
                "GET",
                "/x?q=1",
                {"Host": "h.example", "Connection": "keep-alive, X-Drop", "X-Drop": "1", "Upgrade": "websocket"},
            )
            assert status == 200
            assert "X-Internal" not in headers and "Keep-Alive" not in headers
            assert headers["Via"] == "1.1 lbproxy"
            head = capture.heads[-1].decode().lower()
            assert head.startswith("get /x?q=1 http/1.1\r\n")
            assert "x-drop" not in head and "upgrade" not in head and "connection:" not in head
            assert "host: h.example\r\n" in head + "\r\n" and "via: 1.1 lbproxy" in head
    finally:
        capture.close()


# --- not an open proxy -------------------------------------------------------------------------------
def test_connect_is_refused(proxy: Proc) -> None:
    reply = raw_call(proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405")


def test_absolute_form_for_other_host_is_refused(proxy: Proc) -> None:
    reply = raw_call(proxy.port, b"GET http://example.com/api/light HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")


def test_absolute_form_for_the_proxy_itself_is_served(proxy: Proc) -> None:
    req = f"GET http://{LOOPBACK}:{proxy.port}/api/light HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert raw_call(proxy.port, req.encode()).startswith(b"HTTP/1.1 200")


# --- admin -------------------------------------------------------------------------------------------
def test_admin_endpoints(cluster: tuple[Proc, Proc, Proc]) -> None:
    proxy, b1, b2 = cluster
    admin = proxy.admin_port or 0
    for _ in range(10):
        call(proxy.port, "GET", "/api/light")
    assert call(admin, "GET", "/healthz")[0] == 200
    assert call(admin, "GET", "/readyz")[0] == 200
    status, headers, body = call(admin, "GET", "/admin/backends")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert data["policy"] == "round_robin"
    rows = {r["url"]: r for r in data["backends"]}
    assert set(rows) == {b1.url, b2.url}
    for r in rows.values():
        assert r["available"] is True and r["requests"] >= 5 and r["ejected_until"] is None
        assert {"name", "weight", "in_flight", "latency_cost_s", "error_rate"} <= set(r)
    status, _, body = call(admin, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'lbproxy_requests_total{backend="' in text
    assert "lbproxy_request_duration_seconds_bucket" in text
    assert 'lbproxy_decision_duration_seconds_count{policy="round_robin"}' in text
    assert "lbproxy_backend_available" in text


@pytest.mark.slow  # > 2 s by design: it waits for a 1 s window full of traffic
def test_quality_gauges_are_published(proxy: Proc) -> None:
    """The gauges come from the last closed 1 s window. Keep traffic going for over two windows
    before reading them, so that window lies wholly inside the traffic: reading right after a short
    burst could see a window holding one request (a Gini of 0.5 for two backends, whatever the policy)."""
    import time

    from lbproxy.proxy.quality import QUALITY_WINDOW_S

    start = time.monotonic()
    sent = 0
    while (time.monotonic() - start < 2.2 * QUALITY_WINDOW_S or sent < 20) and sent < 5000:
        assert call(proxy.port, "GET", "/api/light")[0] == 200
        sent += 1
    text = call(proxy.admin_port or 0, "GET", "/metrics")[2].decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("lbproxy_gini ", "lbproxy_reward ", "lbproxy_decision_accuracy "))
    }
    assert values["lbproxy_reward"] < 0.0  # -latency/scale: negative once any request completed
    assert 0.0 <= values["lbproxy_gini"] < 0.4  # round robin over equal backends is nearly fair
    assert 0.0 <= values["lbproxy_decision_accuracy"] <= 1.0


def test_add_and_remove_backend_at_runtime(cluster: tuple[Proc, Proc, Proc]) -> None:
    _, b1, b2 = cluster  # the module's backends, behind a second proxy that starts with b1 only
    # Slow start off: the ramp of an added backend is tested in test_retry_live.py; here, its full turn.
    proxy = start_proxy([b1.url], "--policy", "round_robin", "--slow-start-window-s", "0")
    with running(proxy):
        admin = proxy.admin_port or 0
        body = json.dumps({"url": b2.url, "weight": 2}).encode()
        status, _, reply = call(admin, "POST", "/admin/backends", {"Content-Type": "application/json"}, body)
        assert status == 201, reply
        added = json.loads(reply)
        assert added["url"] == b2.url and added["weight"] == 2.0
        assert call(admin, "POST", "/admin/backends", body=body)[0] == 409  # duplicate
        assert call(admin, "POST", "/admin/backends", body=b'{"url": "nope"}')[0] == 400
        for _ in range(12):
            assert call(proxy.port, "GET", "/api/light")[0] == 200
        rows = {r["url"]: r for r in json.loads(call(admin, "GET", "/admin/backends")[2])["backends"]}
        assert rows[b2.url]["requests"] >= 4  # the new backend takes traffic
        name = rows[b1.url]["name"]
        assert call(admin, "DELETE", f"/admin/backends/{name}")[0] == 200
        assert call(admin, "DELETE", f"/admin/backends/{name}")[0] == 404
        before = rows[b1.url]["requests"]
        for _ in range(6):
            assert call(proxy.port, "GET", "/api/light")[0] == 200
        rows = {r["url"]: r for r in json.loads(call(admin, "GET", "/admin/backends")[2])["backends"]}
        assert rows[b1.url]["requests"] == before and rows[b1.url]["removed"] is True


class RecordingAsyncPolicy:
    """An AsyncPolicy (the DQN's shape) that records what the proxy hands it."""

    name = "recording"

    def __init__(self) -> None:
        self.next_id = 100
        self.decided: list[int] = []
        self.observed: list[tuple[int, int, bool]] = []

    async def decide(self, req_class: int, view: Any, now_s: float) -> tuple[int, int]:
        self.next_id += 1
        self.decided.append(self.next_id)
        return view.candidates[self.next_id % len(view.candidates)], self.next_id

    def observe(self, outcome: Any, view: Any, now_s: float) -> None:
        self.observed.append((outcome.decision_id, outcome.backend, outcome.error))


async def test_async_policy_contract_in_process(cluster: tuple[Proc, Proc, Proc]) -> None:
    """ProxyServer built in-process (as live training does) awaits `decide` and passes each decision
    id back through `observe`; decisions are timed under the policy's label; extra admin routes work."""
    import aiohttp
    from aiohttp import web

    from lbproxy.config import load_settings
    from lbproxy.policy import AsyncPolicy
    from lbproxy.proxy import ProxyServer
    from lbproxy.telemetry import Metrics

    _, b1, b2 = cluster
    settings = load_settings(
        {"backends": f"{b1.url},{b2.url}", "host": LOOPBACK, "port": 0, "admin_port": 0, "health_interval_s": 0}
    )
    policy = RecordingAsyncPolicy()
    assert isinstance(policy, AsyncPolicy)
    metrics = Metrics()
    server = ProxyServer(settings, policy, metrics)
    entered: list[str] = []

    async def lifespan() -> Any:
        entered.append("start")
        yield
        entered.append("stop")

    async def extra(request: web.Request) -> web.Response:
        return web.Response(text="extra")

    server.lifespans.append(lifespan)
    server.admin_routes.append(web.get("/extra", extra))
    await server.start()
    try:
        assert server.port != 0 and server.admin_port != 0 and entered == ["start"]
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.get(f"http://{LOOPBACK}:{server.port}/api/light") as resp:
                    assert resp.status == 200
                    await resp.read()
            async with session.get(f"http://{LOOPBACK}:{server.admin_port}/extra") as resp:
                assert await resp.text() == "extra"
            async with session.get(f"http://{LOOPBACK}:{server.admin_port}/metrics") as resp:
                await resp.read()
    finally:
        await server.stop(5.0)
    assert entered == ["start", "stop"]
    assert [d for d, _, _ in policy.observed] == policy.decided
    assert {b for _, b, _ in policy.observed} == {0, 1}
    assert not any(err for _, _, err in policy.observed)
    assert metrics.registry.get_sample_value("lbproxy_decision_duration_seconds_count", {"policy": "recording"}) == 6
    assert server.view.in_flight == [0, 0]


async def test_lean_upstream_client_pools_and_expires(cluster: tuple[Proc, Proc, Proc]) -> None:
    """The body-less fast path reuses one keep-alive connection, closes idle ones on demand, maps a
    closed port to a connect error and relays HEAD without waiting for a body."""
    import aiohttp

    from lbproxy.proxy.upstream_client import UpstreamClient

    _, b1, _ = cluster
    client = UpstreamClient(connect_timeout_s=2.0, read_timeout_s=5.0, total_timeout_s=10.0)
    client.set_backend(0, LOOPBACK, b1.port)
    client.set_backend(1, LOOPBACK, free_port())  # nothing listens there
    head = f"GET /api/light?size=10 HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()
    for _ in range(3):
        resp = await client.request(0, False, head)
        assert resp.status == 200 and resp.content_length == 10
        assert await resp.read() == b"x" * 10
        resp.release()
        assert client.stats() == {0: 1}  # the same connection, back in the pool
    resp = await client.request(0, True, f"HEAD /api/light?size=99 HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
    assert resp.status == 200 and resp.headers["Content-Length"] == "99" and await resp.read() == b""
    resp.release()
    assert client.expire_idle(0.0) == 1 and client.stats() == {0: 0}
    with pytest.raises(aiohttp.ClientConnectorError):
        await client.request(1, False, head)
    client.close_idle()
