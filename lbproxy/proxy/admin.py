"""The admin listener (loopback by default): metrics, liveness, readiness and backend management.

Kept off the data port so a scrape or an operator call never competes with the hot path's
low-level server, and so it can be bound to a private interface.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from lbproxy.config import BackendSpec

if TYPE_CHECKING:
    from lbproxy.proxy.app import ProxyServer

SERVER_KEY: web.AppKey[ProxyServer] = web.AppKey("proxy_server")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n", content_type="application/json")


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
    return _json(
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
    try:
        body = await request.json()
    except ValueError:
        return _json({"error": 'body must be JSON like {"url": "http://HOST:PORT", "weight": 1}'}, 400)
    if not isinstance(body, dict) or "url" not in body:
        return _json({"error": 'body must be JSON like {"url": "http://HOST:PORT", "weight": 1}'}, 400)
    try:
        spec = BackendSpec(**{k: v for k, v in body.items() if k in ("url", "weight", "name")})
    except ValidationError as exc:
        msg = str(exc.errors()[0].get("msg", "invalid backend")).removeprefix("Value error, ")
        return _json({"error": msg}, 400)
    try:
        b = server.pool.add(spec)
    except ValueError as exc:
        return _json({"error": str(exc)}, 409)
    return _json(server.pool.describe(server.loop_time())[b.index], 201)


async def remove_backend(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    name = request.match_info["name"]
    try:
        b = server.pool.remove(name)
    except KeyError:
        return _json({"error": f"no backend named {name!r}; GET /admin/backends lists them"}, 404)
    return _json({"removed": b.name, "index": b.index})


def build_admin_app(server: ProxyServer) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/backends", list_backends)
    app.router.add_post("/admin/backends", add_backend)
    app.router.add_delete("/admin/backends/{name}", remove_backend)
    app.router.add_routes(server.admin_routes)
    app.cleanup_ctx.extend(server.lifespans)
    return app
