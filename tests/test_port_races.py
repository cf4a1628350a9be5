"""A free port taken by another process before our server binds it (parallel test workers start
servers too): readiness must not be fooled by the other server, and lbproxy is started again on new
ports (support.start_on_free_ports, which every single-proxy launcher of the tests and benchmarks
uses). Real sockets and a real lbproxy process."""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from collections.abc import Iterator

import pytest
import support
from support import LOOPBACK, READY, REPO, free_port, start_proxy, wait_http_ok

sys.path.insert(0, str(REPO / "benchmarks"))
from common import admin_backends


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"hello": "not lbproxy"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    """Another HTTP server answering 200 to every GET, on a loopback port; yields the port."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_readiness_with_a_body_prefix_is_not_fooled_by_another_server(other_server: int) -> None:
    url = f"http://{LOOPBACK}:{other_server}/readyz"
    wait_http_ok(url, timeout_s=5.0)  # any 2xx
    with pytest.raises(TimeoutError, match="another server"):
        wait_http_ok(url, timeout_s=0.5, body_prefix=READY)


def test_lbproxy_is_started_again_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first admin port handed out is already bound and listening (as another worker's server
    would be): the proxy exits with 'already in use', and it is started again on fresh ports."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind((LOOPBACK, 0))
    taken.listen()
    taken_port = int(taken.getsockname()[1])
    ports = iter([free_port(), taken_port])
    monkeypatch.setattr(support, "free_port", lambda: next(ports, None) or free_port())
    try:
        proc = start_proxy([f"http://{LOOPBACK}:9"], "--policy", "round_robin", "--health-interval-s", "0")
    finally:
        taken.close()
    try:
        assert proc.admin_port != taken_port
        rows = admin_backends(proc.admin_url)
        assert [r["index"] for r in rows] == [0]
    finally:
        proc.stop()
