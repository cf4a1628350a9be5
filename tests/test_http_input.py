"""Hostile client input against a real proxy process, on raw sockets: request-smuggling shapes,
oversize heads, body limits, slowloris heads and stalled bodies, and a bounded fuzz of the request
path. Every probe is also checked on the backend side (CaptureServer records the exact bytes it
was sent): a rejected request must never reach a backend."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import LOOPBACK, CaptureServer, Proc, running, start_proxy

from lbproxy.proxy.http_server import MAX_HEADER_FIELD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES

pytestmark = pytest.mark.timing

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_BODY = 1000


@pytest.fixture(scope="module")
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def proxy(capture: CaptureServer) -> Iterator[Proc]:
    args = (
        "--client-header-timeout-s",
        str(HEADER_TIMEOUT_S),
        "--client-body-timeout-s",
        str(BODY_TIMEOUT_S),
        "--max-body-bytes",
        str(MAX_BODY),
    )
    with running(start_proxy([f"http://{LOOPBACK}:{capture.port}"], *args)) as (p,):
        yield p


def exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `data` and read one response: its head, then its Content-Length body or up to the close
    (a keep-alive answer without a length is read until the timeout)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as s:
        s.sendall(data)
        return read_reply(s)


def read_reply(s: socket.socket) -> bytes:
    out = b""
    want: int | None = None
    while want is None or len(out) < want:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
        if want is None and b"\r\n\r\n" in out:
            head, _, _ = out.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    want = len(head) + 4 + int(value)
    return out


def read_to_close(s: socket.socket) -> bytes:
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply


def status_of(reply: bytes) -> int:
    line = reply.split(b"\r\n", 1)[0].split()
    assert len(line) >= 2 and line[0] in (b"HTTP/1.0", b"HTTP/1.1"), reply[:200]
    return int(line[1])


H = b"Host: example.test\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
EMPTY_CHUNKED = b"0\r\n\r\n"


def post(fields: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST / " + version + b"\r\n" + H + fields + b"\r\n" + body


def get(fields: bytes = b"", line: bytes = b"GET / HTTP/1.1") -> bytes:
    return line + b"\r\n" + H + fields + b"\r\n"


MANY_FIELDS = b"".join(b"X-%d: a\r\n" % i for i in range(MAX_HEADERS + 5))
PROBES: dict[str, tuple[bytes, int]] = {
    "content-length and transfer-encoding": (post(b"Content-Length: 4\r\n" + TE, EMPTY_CHUNKED), 400),
    "conflicting content-length": (post(b"Content-Length: 4\r\nContent-Length: 5\r\n", b"abcde"), 400),
    "duplicate content-length": (post(b"Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd"), 400),
    "content-length list": (post(b"Content-Length: 4, 4\r\n", b"abcd"), 400),
    "signed content-length": (post(b"Content-Length: +4\r\n", b"abcd"), 400),
    "invalid chunk size": (post(TE, b"zz\r\nabc\r\n" + EMPTY_CHUNKED), 400),
    "negative chunk size": (post(TE, b"-1\r\nabc\r\n" + EMPTY_CHUNKED), 400),
    "chunk size overflow": (post(TE, b"fffffffffffffffff1\r\nabc\r\n" + EMPTY_CHUNKED), 400),
    "bare LF in a chunk": (post(TE, b"3\nabc\r\n" + EMPTY_CHUNKED), 400),
    "obs-fold header": (get(b"X-A: a\r\n b\r\n"), 400),
    "bare LF": (b"GET / HTTP/1.1\nHost: example.test\n\n", 400),
    "transfer-encoding gzip": (post(b"Transfer-Encoding: gzip\r\n", b"abcd"), 400),
    "transfer-encoding gzip, chunked": (post(b"Transfer-Encoding: gzip, chunked\r\n", EMPTY_CHUNKED), 400),
    "transfer-encoding chunked twice": (post(TE + TE, EMPTY_CHUNKED), 400),
    "space before the colon": (post(b"Transfer-Encoding : chunked\r\n", EMPTY_CHUNKED), 400),
    "transfer-encoding xchunked": (post(b"Transfer-Encoding: xchunked\r\n", EMPTY_CHUNKED), 400),
    "transfer-encoding from HTTP/1.0": (post(TE, EMPTY_CHUNKED, b"HTTP/1.0"), 400),
    "NUL in a header value": (get(b"X-A: a\x00b\r\n"), 400),
    "two Host fields": (get(b"Host: other.test\r\n"), 400),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "unknown HTTP version": (get(line=b"GET / HTTP/2.0"), 505),
    "malformed version": (get(line=b"GET / HTTP/1.x"), 400),
    "request line too long": (get(line=b"GET /" + b"a" * (MAX_REQUEST_LINE_BYTES + 10) + b" HTTP/1.1"), 414),
    "header field too large": (get(b"X-A: " + b"a" * (MAX_HEADER_FIELD_BYTES + 10) + b"\r\n"), 431),
    "too many header fields": (get(MANY_FIELDS), 431),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "absolute-form for another host": (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    "declared body over the limit": (post(b"Content-Length: %d\r\n" % (MAX_BODY + 1)), 413),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_hostile_request_is_refused_and_never_reaches_a_backend(proxy: Proc, capture: CaptureServer, name: str) -> None:
    data, expected = PROBES[name]
    before = len(capture.heads)
    reply = exchange(proxy.port, data)
    assert status_of(reply) == expected, reply[:300]
    assert len(capture.heads) == before, capture.heads[before:]
    assert b"Traceback" not in reply


def test_absolute_form_naming_the_proxy_is_served_unless_it_carries_userinfo(proxy: Proc) -> None:
    target = b"http://127.0.0.1:%d/" % proxy.port
    assert status_of(exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")) == 200
    with_userinfo = target.replace(b"http://", b"http://user:pw@")
    assert status_of(exchange(proxy.port, b"GET " + with_userinfo + b" HTTP/1.1\r\n" + H + b"\r\n")) == 400


def test_a_well_formed_request_still_passes(proxy: Proc, capture: CaptureServer) -> None:
    """The probes' control: the same framing done right reaches the backend, body intact."""
    chunked = (
        b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    sized = b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nConnection: close\r\n\r\nabcd"
    for data, body in ((chunked, b"abc"), (sized, b"abcd")):
        reply = exchange(proxy.port, data)
        assert status_of(reply) == 200 and reply.endswith(str(len(body)).encode())
        assert capture.bodies[-1] == body


def test_a_chunked_body_over_the_limit_is_cut_with_413(proxy: Proc, capture: CaptureServer) -> None:
    chunk = b"x" * 400
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    reply = exchange(proxy.port, b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert status_of(reply) == 413
    assert not any(len(b) > MAX_BODY for b in capture.bodies)  # the backend never got more than the limit


def test_slowloris_heads_are_cut_without_starving_other_clients(proxy: Proc) -> None:
    """Twenty connections trickle a head one field at a time, and one never sends a byte: a normal
    client is served all along, and every slow one gets 408 and is closed."""
    slow: list[socket.socket] = []
    for _ in range(20):
        s = socket.create_connection((LOOPBACK, proxy.port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\n" + H)
        slow.append(s)
    silent = socket.create_connection((LOOPBACK, proxy.port), timeout=10)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        served = 0
        deadline = time.monotonic() + 3 * HEADER_TIMEOUT_S
        while time.monotonic() < deadline:
            reply = exchange(proxy.port, b"GET /ok HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
            assert status_of(reply) == 200
            served += 1
        assert served >= 5
    finally:
        stop.set()
        feeder.join(5)
    for s in [*slow, silent]:
        with s:
            s.settimeout(10)
            assert status_of(read_to_close(s)) == 408  # answered and closed (recv returned b"")


def test_a_stalled_body_is_cut_with_408_and_the_backend_is_not_blamed(proxy: Proc) -> None:
    with socket.create_connection((LOOPBACK, proxy.port), timeout=30) as s:
        s.sendall(b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        assert status_of(read_reply(s)) == 408
    metrics = exchange(proxy.admin_port or 0, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b'kind="client_body"' in metrics  # counted as the client's failure, not the backend's


class TricklingServer:
    """A backend that answers with a small Content-Length body it sends one byte at a time, each only
    after the client saw the previous one (`release`): a proxy that buffers small bodies deadlocks."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.release = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
            for byte in (b"a", b"b", b"c"):
                conn.sendall(byte)
                if byte != b"c" and not self.release.acquire(timeout=20):
                    return


def test_a_slow_small_response_streams_to_the_client() -> None:
    backend = TricklingServer()
    with (
        running(start_proxy([f"http://{LOOPBACK}:{backend.port}"])) as (p,),
        socket.create_connection((LOOPBACK, p.port), timeout=15) as s,
    ):
        s.sendall(b"GET /poll HTTP/1.1\r\n" + H + b"\r\n")
        data = b""
        while not data.endswith(b"abc"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
            if data.endswith((b"\r\n\r\na", b"\r\n\r\nab")):
                backend.release.release()  # the client saw this byte before the backend sent the next
    assert status_of(data) == 200
    backend.sock.close()


# --- fuzz ---------------------------------------------------------------------------------------
TOKENS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "G\x00T", ""])
TARGETS = st.one_of(
    st.sampled_from(["/", "/api/light", "*", "http://example.com/", "//x", "/%00", "/a?b=c#d", "http://127.0.0.1/"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.10", "http/1.1", "HTTP/1.1 x", ""])
NAMES = st.one_of(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Upgrade", "X-A", "TE"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=12),
)
VALUES = st.one_of(
    st.sampled_from(["chunked", "0", "5", "-1", "100-continue", "close", "keep-alive", "gzip, chunked", "h"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20),
)
SEPARATORS = st.sampled_from(["\r\n", "\n", "\r", "\r\n "])


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    sep = draw(SEPARATORS) if draw(st.booleans()) else "\r\n"
    line = f"{draw(TOKENS)} {draw(TARGETS)} {draw(VERSIONS)}"
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    if draw(st.booleans()):
        fields.insert(0, ("Host", "example.test"))
    head = sep.join([line, *(f"{k}: {v}" for k, v in fields)]) + sep + sep
    body = draw(st.binary(max_size=64))
    return head.encode("latin-1") + body


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same 150 requests every run: a failure in CI reproduces locally
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=raw_requests())
def test_fuzzed_requests_never_crash_hang_or_500(proxy: Proc, data: bytes) -> None:
    """Whatever arrives, the proxy answers with a well-formed status that is not its own 500, or
    closes, within the head/body timeouts; and it serves the next client."""
    reply = exchange(proxy.port, data, timeout_s=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 8)
    if reply:
        assert status_of(reply) != 500, reply[:300]
        assert b"Traceback" not in reply
    ok = exchange(proxy.port, b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert status_of(ok) == 200


# --- what a backend may send back --------------------------------------------------------------
class ScriptedServer:
    """A backend that answers every request with the raw bytes `reply` (settable), then closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    conn.sendall(self.reply)


OK = b"Content-Length: 2\r\n\r\nok"
BAD_REPLIES: dict[str, tuple[bytes, int]] = {
    "content-length and transfer-encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        502,
    ),
    "conflicting content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 502),
    "not HTTP": (b"NOT HTTP AT ALL\r\n\r\n", 502),
    "nothing": (b"", 502),
    "oversize header": (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 20000 + b"\r\n" + OK, 502),
    "CR inside a header": (b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: x=1\r\n" + OK, 502),
    "negative content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok", 502),
    "unasked protocol switch": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nraw",
        502,
    ),
    "interim 100 then the answer": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + OK, 200),
    "interim 103 then the answer": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n" + OK, 200),
}


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedServer, Proc]]:
    backend = ScriptedServer(b"")
    try:
        with running(start_proxy([f"http://{LOOPBACK}:{backend.port}"], "--no-retry")) as (p,):
            yield backend, p
    finally:
        backend.sock.close()


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_malformed_backend_replies_become_502_not_a_hang(scripted: tuple[ScriptedServer, Proc], name: str) -> None:
    backend, p = scripted
    backend.reply, expected = BAD_REPLIES[name]
    for method in (b"GET", b"POST"):  # the lean client (no body) and aiohttp's (with one)
        framing = b"Content-Length: 2\r\n\r\nhi" if method == b"POST" else b"\r\n"
        got = exchange(p.port, method + b" /x HTTP/1.1\r\n" + H + framing, timeout_s=10)
        assert status_of(got) == expected, got[:200]
        if expected == 200:
            assert got.endswith(b"ok")
