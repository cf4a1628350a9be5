"""The admin listener (loopback by default): metrics, liveness, readiness and backend management.

Kept off the data port so a scrape or an operator call never competes with the hot path's
low-level server, and so it can be bound to a private interface.

Access. Reads (GET/HEAD: /metrics, /healthz, /readyz, GET /admin/backends) are open, so Prometheus
and probes need no secret. Every other method, on every route (those added through
`ProxyServer.admin_routes` too), needs `Authorization: Bearer TOKEN` whenever a token is configured
(`--admin-token`, `LBPROXY_ADMIN_TOKEN` or `--admin-token-file`), compared in constant time. A listener
on anything but loopback without a token refuses to start (:func:`admin_token`): one typo in
`--admin-host` must not hand backend management to the network.

Input. Every body is read to at most ADMIN_MAX_BODY_BYTES (413 past it), must be a JSON object with
known keys and values of the right type and range; anything else is a one-line 400 naming the problem.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from lbproxy.config import ConfigError, Settings
from lbproxy.config_values import BackendSpec

if TYPE_CHECKING:
    from lbproxy.proxy.app import ProxyServer

SERVER_KEY: web.AppKey[ProxyServer] = web.AppKey("proxy_server")
TOKEN_KEY: web.AppKey[bytes | None] = web.AppKey("admin_token")

ADMIN_MAX_BODY_BYTES = 64 * 1024
"""Largest admin request body (a backend or model request is under 1 KiB); 413 past it."""
MIN_TOKEN_CHARS = 16
"""Shortest admin token accepted: 16 random characters are out of reach of guessing over a network."""
MAX_BACKEND_WEIGHT = 1e6
"""Weights are relative capacities; beyond a million to one, a value is a typo."""
MAX_URL_CHARS = 2048
MAX_PATH_CHARS = 4096
NAME_RE = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,128}")
"""Backend names: they become Prometheus label values and /admin/backends/NAME path segments
(default names are HOST:PORT, IPv6 literals included)."""
SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
BACKEND_KEYS = ("url", "weight", "name")
BACKEND_EXAMPLE = '{"url": "http://HOST:PORT", "weight": 1, "name": "optional"}'
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

log = logging.getLogger("lbproxy")

ModelReload = Callable[[Path], Awaitable[dict[str, Any]]]
"""Loads a model file and swaps it in (off the loop); raises CheckpointError and changes nothing if
the file cannot be used. `DqnRuntime.reload_model`."""


class AdminInputError(Exception):
    """A rejected admin request: HTTP status and one line saying what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n", content_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """One line of JSON: `{"error": "..."}`."""
    text = json.dumps({"error": " ".join(message.split())}) + "\n"
    return web.Response(status=status, text=text, content_type="application/json", headers=headers)


# --- access -----------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or a loopback name; "" and 0.0.0.0/:: (every interface) are not."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def admin_token(settings: Settings) -> str | None:
    """The configured admin token (from --admin-token or the first line of --admin-token-file), or
    None. ConfigError (one line) when it is unusable, or when the listener is not on loopback and
    there is none."""
    token = settings.admin_token or None
    path = settings.admin_token_file
    if token is not None and path is not None:
        raise ConfigError(
            "invalid setting --admin-token-file (LBPROXY_ADMIN_TOKEN_FILE): set either it or --admin-token "
            "(LBPROXY_ADMIN_TOKEN), not both"
        )
    where = "--admin-token (LBPROXY_ADMIN_TOKEN)"
    if path is not None:
        where = f"--admin-token-file {str(path)!r}"
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(f"invalid setting {where}: cannot read it ({why}); pass a readable file") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"invalid setting {where}: the file is empty; write the token on its first line")
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(
                f"invalid setting {where}: the admin token must be at least {MIN_TOKEN_CHARS} printable ASCII "
                "characters without spaces, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return token
    if not is_loopback(settings.admin_host):
        raise ConfigError(
            f"--admin-host {settings.admin_host or '(every interface)'!r} is not loopback, so state-changing admin "
            "requests need a token: set LBPROXY_ADMIN_TOKEN or --admin-token-file FILE (16+ characters), "
            "or keep --admin-host 127.0.0.1"
        )
    return None


@web.middleware
async def _require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request but a read needs the bearer token, when one is configured."""
    token = request.app[TOKEN_KEY]
    if token is not None and request.method not in SAFE_METHODS:
        scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        sent = credentials.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, token):
            request.app[SERVER_KEY].metrics.admin_denied.inc()
            why = "invalid admin token" if scheme.lower() == "bearer" else "admin token required"
            return error_response(
                401,
                f"{why}: send Authorization: Bearer TOKEN (the configured --admin-token)",
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="lbproxy-admin"'},
            )
    try:
        return await handler(request)
    except AdminInputError as exc:
        return error_response(exc.status, str(exc))


# --- input ------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


async def read_body(request: web.Request, example: str) -> bytes:
    """The request body, read to at most ADMIN_MAX_BODY_BYTES (AdminInputError 413 naming `example` past it)."""
    limit = ADMIN_MAX_BODY_BYTES
    too_big = AdminInputError(413, f"request body over {limit} bytes; send a JSON object like {example}")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: web.Request, example: str) -> dict[str, Any]:
    """The request body as a JSON object: at most ADMIN_MAX_BODY_BYTES (413), strict JSON (no NaN,
    no duplicate keys), an object at the top (400 with `example` otherwise)."""
    raw = await read_body(request, example)
    try:
        body = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        why = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise AdminInputError(400, f"body is not valid JSON ({why}); send {example}") from None
    if not isinstance(body, dict):
        raise AdminInputError(400, f"body must be a JSON object like {example}, not a {type(body).__name__}")
    return body


def _check_keys(body: dict[str, Any], allowed: tuple[str, ...], example: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise AdminInputError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(allowed)} (e.g. {example})")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdminInputError(
            400, "name must be 1-128 characters of letters, digits and . _ : - [ ] (e.g. fast-1 or 10.0.0.5:8081)"
        )
    return name


def backend_spec(body: dict[str, Any]) -> BackendSpec:
    """A validated BackendSpec from a POST /admin/backends body, or AdminInputError (400)."""
    _check_keys(body, BACKEND_KEYS, BACKEND_EXAMPLE)
    url = body.get("url")
    if not isinstance(url, str) or not url:
        raise AdminInputError(400, f"field 'url' is required and must be a string; send {BACKEND_EXAMPLE}")
    if len(url) > MAX_URL_CHARS or not url.isascii() or not url.isprintable() or " " in url:
        raise AdminInputError(400, f"url must be at most {MAX_URL_CHARS} printable ASCII characters: http://HOST:PORT")
    weight = body.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise AdminInputError(400, f"weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or not 0 < weight <= MAX_BACKEND_WEIGHT:
        raise AdminInputError(400, f"weight must be > 0 and <= {MAX_BACKEND_WEIGHT:g}, got {weight!r}")
    name = body.get("name", "")
    if name != "":
        check_name(name)
    try:
        spec = BackendSpec(url=url, weight=float(weight), name=name)
    except (ValidationError, ValueError) as exc:
        msg = exc.errors()[0].get("msg", "invalid") if isinstance(exc, ValidationError) else str(exc)
        msg = str(msg).removeprefix("Value error, ")
        raise AdminInputError(400, msg if "URL" in msg else f"malformed backend URL {url!r}: {msg}") from None
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise AdminInputError(400, "url must not carry credentials (user:password@); expected http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AdminInputError(400, f"url {url!r} has a path, query or fragment; expected http://HOST:PORT")
    check_name(spec.name)  # a default HOST:PORT name, e.g. of an odd host name
    return spec


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    if server.forwarder is not None:
        server.forwarder.flush_metrics()  # per-request counts are batched; make the scrape current
    body = generate_latest(server.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    if not server.started:
        return web.Response(status=503, text="not ready: starting\n")
    # not `candidates`: panic mode routes over unavailable backends too
    return web.Response(status=200 if any(server.view.available) else 503, text=readiness(server) + "\n")


def readiness(server: ProxyServer) -> str:
    """One line: ready or not, and when backends are down, why (a health path they do not serve
    looks exactly like an outage; saying which check failed tells the operator which it is)."""
    active = server.pool.active
    up = sum(1 for b in active if b.available)
    unhealthy = sum(1 for b in active if not b.healthy)
    ejected = sum(1 for b in active if b.ejected)
    why: list[str] = []
    if unhealthy:
        why.append(f"{unhealthy} failing active health checks on {server.settings.health_path}")
    if ejected:
        why.append(f"{ejected} ejected as outliers")
    detail = f" ({'; '.join(why)})" if why else ""
    if up == 0:
        return f"not ready: no backend is available, {len(active)} configured{detail}"
    if server.pool.panic:
        return f"ready: panic mode, {up} of {len(active)} backends available{detail}; routing over all of them"
    return f"ready: {up} of {len(active)} backends available{detail}"


async def list_backends(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    pool = server.pool
    now = server.loop_time()
    return json_response(
        {
            "policy": server.policy_name,
            "policy_state": describe() if (describe := getattr(server.policy, "describe", None)) else None,
            "panic": pool.panic,
            "candidates": [pool.backends[i].name for i in server.view.candidates],
            "backends": pool.describe(now),
        }
    )


async def add_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    spec = backend_spec(await read_json_object(request, BACKEND_EXAMPLE))
    try:
        b = server.pool.add(spec)
    except ValueError as exc:
        return error_response(409, str(exc))
    return json_response(server.pool.describe(server.loop_time())[b.index], 201)


async def remove_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    name = check_name(request.match_info["name"])
    try:
        b = server.pool.remove(name)
    except KeyError:
        return error_response(404, f"no backend named {name!r}; GET /admin/backends lists them")
    return json_response({"removed": b.name, "index": b.index})


MODEL_EXAMPLE = '{"path": "/data/models/dqn_final.pth"}'


def model_routes(reload: ModelReload | None) -> list[web.RouteDef]:
    """POST /admin/model {"path": FILE}: serve another model without a restart (the dqn policy).

    A file that cannot be used (code in a pickle, truncated, not a model, another shape or format)
    changes nothing: the proxy keeps routing on the model it had, the failure is logged in one line
    and counted (lbproxy_model_load_failures_total), and the caller gets a one-line 400.
    `reload=None` (the proxy learns online: the learner owns the weights) answers 409."""
    from lbproxy.rl.checkpoint import CheckpointError

    async def load_model(request: web.Request) -> web.Response:
        server = request.app[SERVER_KEY]
        body = await read_json_object(request, MODEL_EXAMPLE)
        _check_keys(body, ("path",), MODEL_EXAMPLE)
        path = body.get("path")
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "\x00" in path:
            raise AdminInputError(
                400, f"field 'path' must be a file path of 1-{MAX_PATH_CHARS} characters; send {MODEL_EXAMPLE}"
            )
        if reload is None:
            return error_response(
                409,
                "this proxy learns online (--online or train mode): the learner owns the weights; "
                "restart with --model PATH to serve another model",
            )
        try:
            info = await reload(Path(path))
        except CheckpointError as exc:
            server.metrics.model_load_failures.inc()
            log.warning("lbproxy: model reload refused, still serving the current model: %s", exc)
            return error_response(400, str(exc))
        return json_response(info)

    return [web.post("/admin/model", load_model)]


def build_admin_app(server: ProxyServer) -> web.Application:
    """The admin app; ConfigError when the admin token settings are unusable (see `admin_token`)."""
    token = admin_token(server.settings)
    app = web.Application(middlewares=[_require_token], client_max_size=ADMIN_MAX_BODY_BYTES)
    app[SERVER_KEY] = server
    app[TOKEN_KEY] = token.encode() if token is not None else None
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/backends", list_backends)
    app.router.add_post("/admin/backends", add_backend)
    app.router.add_delete("/admin/backends/{name}", remove_backend)
    app.router.add_routes(server.admin_routes)
    return app
