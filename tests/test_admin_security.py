"""The admin surface (SECURITY.md, "Admin surface"): reads open, every state-changing request behind
the bearer token when one is set, a non-loopback listener without a token refused at start, and
every admin input validated with a one-line 4xx — on a real proxy process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import LOOPBACK, REPO, Proc, running, start_backend, start_proxy
from test_proxy import call

from lbproxy.config import ConfigError, Settings
from lbproxy.proxy.admin import ADMIN_MAX_BODY_BYTES, admin_token, is_loopback

TOKEN = "admin-security-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


# --- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("admin.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_needs_no_token() -> None:
    assert admin_token(Settings()) is None


def test_exposed_listener_without_token_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        admin_token(Settings(admin_host="0.0.0.0"))
    msg = str(info.value)
    assert "\n" not in msg and "LBPROXY_ADMIN_TOKEN" in msg and "--admin-token-file" in msg


def test_token_from_the_environment_and_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBPROXY_ADMIN_TOKEN", TOKEN)
    assert admin_token(Settings(admin_host="0.0.0.0")) == TOKEN
    monkeypatch.delenv("LBPROXY_ADMIN_TOKEN")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert admin_token(Settings(admin_host="0.0.0.0", admin_token_file=secret)) == TOKEN
    assert TOKEN not in repr(Settings(admin_token=TOKEN))  # never printed with the settings


@pytest.mark.parametrize(
    ("settings", "expect"),
    [
        ({"admin_token": "short"}, "at least 16"),
        ({"admin_token": "sixteen chars with spaces"}, "without spaces"),
        ({"admin_token_file": "/nonexistent/token"}, "cannot read it"),
        ({"admin_token": TOKEN, "admin_token_file": "/etc/hostname"}, "not both"),
    ],
)
def test_unusable_token_settings_are_one_line(settings: dict[str, Any], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect) as info:
        admin_token(Settings(**settings))
    assert "\n" not in str(info.value)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        admin_token(Settings(admin_token_file=empty))


def test_cli_refuses_an_exposed_admin_listener_without_token() -> None:
    """Refused before anything binds: nothing listens on 0.0.0.0 even for a moment."""
    argv = [sys.executable, "-m", "lbproxy", "--mode", "serve", "--backends", "http://127.0.0.1:9"]
    proc = subprocess.run(
        [*argv, "--admin-host", "0.0.0.0", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("LBPROXY_")},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "not loopback" in lines[0] and "LBPROXY_ADMIN_TOKEN" in lines[0]


# --- a real proxy with a token ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc]]:
    """A proxy whose token comes from a file, its backend, and a second backend to add and remove."""
    secret = tmp_path_factory.mktemp("secret") / "admin_token"
    secret.write_text(TOKEN + "\n")
    b1, b2 = start_backend(), start_backend()
    with running(b1, b2):
        proxy = start_proxy([b1.url], "--admin-token-file", str(secret))
        with running(proxy):
            yield proxy, b1, b2


def _backends(proxy: Proc) -> dict[str, dict[str, Any]]:
    status, _, body = call(proxy.admin_port or 0, "GET", "/admin/backends")  # open: no token
    assert status == 200
    return {r["url"]: r for r in json.loads(body)["backends"] if not r.get("removed")}


def _one_line_error(status: int, body: bytes) -> str:
    assert body.count(b"\n") == 1 and body.endswith(b"\n"), body
    return str(json.loads(body)["error"])


def test_reads_need_no_token(setup: tuple[Proc, Proc, Proc]) -> None:
    proxy = setup[0]
    for path in ("/metrics", "/healthz", "/readyz", "/admin/backends"):
        assert call(proxy.admin_port or 0, "GET", path)[0] == 200, path
    assert call(proxy.admin_port or 0, "HEAD", "/healthz")[0] == 200


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
)
def test_state_changes_need_the_token(setup: tuple[Proc, Proc, Proc], auth: dict[str, str]) -> None:
    proxy, b1, b2 = setup
    admin = proxy.admin_port or 0
    before = _backends(proxy)
    body = json.dumps({"url": b2.url}).encode()
    status, headers, reply = call(admin, "POST", "/admin/backends", {**JSON, **auth}, body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), reply
    assert "Authorization: Bearer" in _one_line_error(status, reply)
    name = before[b1.url]["name"]
    assert call(admin, "DELETE", f"/admin/backends/{name}", auth)[0] == 401
    assert call(admin, "POST", "/admin/anything-else", auth, b"{}")[0] == 401  # routes added later too
    assert set(_backends(proxy)) == set(before)
    assert call(proxy.port, "GET", "/api/light")[0] == 200


def test_denials_are_counted(setup: tuple[Proc, Proc, Proc]) -> None:
    proxy = setup[0]
    call(proxy.admin_port or 0, "POST", "/admin/backends", JSON, b"{}")
    text = call(proxy.admin_port or 0, "GET", "/metrics")[2].decode()
    denied = [line for line in text.splitlines() if line.startswith("lbproxy_admin_denied_total ")]
    assert denied and float(denied[0].split()[1]) >= 1


def test_add_and_remove_with_the_token(setup: tuple[Proc, Proc, Proc]) -> None:
    proxy, _b1, b2 = setup
    admin = proxy.admin_port or 0
    body = json.dumps({"url": b2.url, "weight": 2, "name": "second"}).encode()
    status, _, reply = call(admin, "POST", "/admin/backends", {**JSON, **AUTH}, body)
    assert status == 201, reply
    assert json.loads(reply)["name"] == "second" and b2.url in _backends(proxy)
    status, _, reply = call(admin, "DELETE", "/admin/backends/second", AUTH)
    assert status == 200, reply
    assert b2.url not in _backends(proxy)
    status, _, reply = call(admin, "DELETE", "/admin/backends/second", AUTH)
    assert status == 404 and "GET /admin/backends" in _one_line_error(status, reply)


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"http://127.0.0.1:1"', "JSON object"),
    (b"{}", "'url' is required"),
    (b'{"url": 7}', "'url' is required"),
    (b'{"url": ""}', "'url' is required"),
    (b'{"url": "nope"}', "malformed backend URL"),
    (b'{"url": "ftp://127.0.0.1:21"}', "malformed backend URL"),
    (b'{"url": "http://127.0.0.1:99999"}', "malformed backend URL"),
    (b'{"url": "http://127.0.0.1:8/admin"}', "path, query or fragment"),
    (b'{"url": "http://127.0.0.1:8?x=1"}', "path, query or fragment"),
    (b'{"url": "http://127.0.0.1:8#f"}', "path, query or fragment"),
    (b'{"url": "http://u:p@127.0.0.1:8"}', "credentials"),
    (b'{"url": "http://127.0.0.1:8\\r\\nX: y"}', "printable ASCII"),
    (b'{"url": "http://' + b"a" * 3000 + b':8"}', "printable ASCII"),
    (b'{"url": "http://127.0.0.1:8", "weight": 0}', "weight must be > 0"),
    (b'{"url": "http://127.0.0.1:8", "weight": -1}', "weight must be > 0"),
    (b'{"url": "http://127.0.0.1:8", "weight": 1e300}', "weight must be > 0"),
    (b'{"url": "http://127.0.0.1:8", "weight": NaN}', "not a JSON number"),
    (b'{"url": "http://127.0.0.1:8", "weight": Infinity}', "not a JSON number"),
    (b'{"url": "http://127.0.0.1:8", "weight": "2"}', "weight must be a number"),
    (b'{"url": "http://127.0.0.1:8", "weight": true}', "weight must be a number"),
    (b'{"url": "http://127.0.0.1:8", "weight": null}', "weight must be a number"),
    (b'{"url": "http://127.0.0.1:8", "name": "a b"}', "name must be"),
    (b'{"url": "http://127.0.0.1:8", "name": "x/y"}', "name must be"),
    (b'{"url": "http://127.0.0.1:8", "name": 5}', "name must be"),
    (b'{"url": "http://127.0.0.1:8", "name": "' + b"n" * 200 + b'"}', "name must be"),
    (b'{"url": "http://127.0.0.1:8", "extra": 1}', "unknown field 'extra'"),
    (b'{"url": "http://127.0.0.1:8", "url": "http://127.0.0.1:9"}', "appears twice"),
    (b"[" * 10_000 + b"]" * 10_000, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "expect"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_invalid_backend_bodies_are_one_line_400s(setup: tuple[Proc, Proc, Proc], body: bytes, expect: str) -> None:
    proxy = setup[0]
    before = _backends(proxy)
    status, _, reply = call(proxy.admin_port or 0, "POST", "/admin/backends", {**JSON, **AUTH}, body)
    assert status == 400, reply
    assert expect in _one_line_error(status, reply)
    assert set(_backends(proxy)) == set(before)


def test_invalid_name_in_delete_is_a_400(setup: tuple[Proc, Proc, Proc]) -> None:
    proxy = setup[0]
    status, _, reply = call(proxy.admin_port or 0, "DELETE", "/admin/backends/a%20b", AUTH)
    assert status == 400 and "name must be" in _one_line_error(status, reply)


def test_oversize_body_is_413_without_reading_it(setup: tuple[Proc, Proc, Proc]) -> None:
    """Declared too large: refused on the headers. Chunked and too large: cut at the limit."""
    proxy = setup[0]
    admin = proxy.admin_port or 0
    big = b'{"url": "' + b"x" * (ADMIN_MAX_BODY_BYTES + 10) + b'"}'
    status, _, reply = call(admin, "POST", "/admin/backends", {**JSON, **AUTH}, big)
    assert status == 413 and "over" in _one_line_error(status, reply)

    with socket.create_connection((LOOPBACK, admin), timeout=10) as s:
        head = f"POST /admin/backends HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"a" * 8192
        try:
            for _ in range(ADMIN_MAX_BODY_BYTES // len(chunk) + 4):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy answered and stopped reading: the answer is still there to read
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_extra_admin_routes_are_protected_in_process(setup: tuple[Proc, Proc, Proc]) -> None:
    """A route another module adds through ProxyServer.admin_routes gets the same check."""
    import asyncio

    from aiohttp import web

    from lbproxy.config import load_settings
    from lbproxy.proxy import ProxyServer
    from lbproxy.telemetry import Metrics

    b1 = setup[1]
    hits: list[str] = []

    async def change(request: web.Request) -> web.Response:
        hits.append(request.method)
        return web.Response(text="changed\n")

    async def main() -> tuple[int, int, int]:
        settings = load_settings(
            {"backends": b1.url, "host": LOOPBACK, "port": 0, "admin_port": 0, "admin_token": TOKEN}
        )
        from lbproxy.policies import make_policy

        server = ProxyServer(settings, make_policy("round_robin", 0), Metrics())
        server.admin_routes.append(web.post("/admin/extra", change))
        server.admin_routes.append(web.get("/admin/extra", change))
        await server.start()
        try:
            port = server.admin_port

            def go(method: str, headers: dict[str, str]) -> int:
                conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
                try:
                    conn.request(method, "/admin/extra", body=b"" if method == "POST" else None, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    return resp.status
                finally:
                    conn.close()

            return (
                await asyncio.to_thread(go, "POST", {}),
                await asyncio.to_thread(go, "POST", AUTH),
                await asyncio.to_thread(go, "GET", {}),
            )
        finally:
            await server.stop(2.0)

    assert asyncio.run(main()) == (401, 200, 200)
    assert hits == ["POST", "GET"]


def test_entrypoint_generates_a_token_once(tmp_path: Path) -> None:
    """deploy/entrypoint.sh: with no token configured it writes one (0600) and passes it as a file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    fake = bindir / "lbproxy"
    fake.write_text(
        '#!/bin/sh\necho "FILE=${LBPROXY_ADMIN_TOKEN_FILE:-} TOKEN=${LBPROXY_ADMIN_TOKEN:-unset} ARGS=$*"\n'
    )
    fake.chmod(0o755)
    token_path = tmp_path / "runs" / "admin_token"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "ADMIN_TOKEN_PATH": str(token_path), "LBPROXY_ADMIN_TOKEN": ""}
    script = str(REPO / "deploy" / "entrypoint.sh")
    first = subprocess.run(["sh", script, "--mode", "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert f"FILE={token_path} TOKEN=unset ARGS=--mode serve" in first.stdout
    token = token_path.read_text().strip()
    assert len(token) >= 32 and oct(token_path.stat().st_mode & 0o777) == "0o600"
    admin_token(Settings(admin_host="0.0.0.0", admin_token_file=token_path))  # lbproxy accepts it
    again = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30)
    assert token_path.read_text().strip() == token and "generated" not in again.stderr  # kept across restarts
    given = subprocess.run(
        ["sh", script], env={**env, "LBPROXY_ADMIN_TOKEN": TOKEN}, capture_output=True, text=True, timeout=30
    )
    assert f"FILE= TOKEN={TOKEN}" in given.stdout  # an operator's token wins
