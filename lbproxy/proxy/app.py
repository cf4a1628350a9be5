"""`ProxyServer`: the data-plane listener, the admin listener and the objects they share.

Serve mode (lbproxy/serve.py) and live training (lbproxy/train/live.py) both build one, with
different policies; extra admin routes and lifespans (e.g. the DQN learner) hook in through
`admin_routes` and `lifespans` before `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from lbproxy.config import ConfigError, Settings
from lbproxy.policy import AsyncPolicy, Policy
from lbproxy.proxy.admin import build_admin_app
from lbproxy.proxy.forward import Forwarder
from lbproxy.proxy.headers import UPSTREAM_SKIP_AUTO_HEADERS
from lbproxy.proxy.http_server import GuardedServer
from lbproxy.proxy.quality import QUALITY_WINDOW_S, QualityWindow
from lbproxy.proxy.upstream_client import UpstreamClient
from lbproxy.telemetry import Metrics
from lbproxy.upstream import Backend, Pool, pool_config_from

CONNECTIONS_PER_BACKEND = 512
"""Upper bound of pooled keep-alive connections per backend; beyond it requests wait for one in
aiohttp's connector. Large enough not to be the limit for any backend this project emulates."""

UPSTREAM_KEEPALIVE_S = 30.0
"""Idle upstream connections are closed after this; below aiohttp servers' 75 s so the proxy, not
the backend, closes first (fewer stale keep-alive races; the rest are retried)."""

DNS_CACHE_TTL_S = 300.0
"""Backend names are resolved once per this interval, not per request."""

LISTEN_BACKLOG = 1024

CLIENT_KEEPALIVE_S = 75.0
"""Idle client connections are closed after this (nginx's keepalive_timeout default: 75 s)."""

log = logging.getLogger("lbproxy")


def bind_error(flag: str, host: str, port: int, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use"
    elif exc.errno == errno.EACCES:
        why = "needs privileges to bind"
    else:
        why = f"cannot be bound ({exc.strerror or exc})"
    env = "LBPROXY_" + flag.removeprefix("--").replace("-", "_").upper()
    return ConfigError(f"{flag} {port} on {host} {why}; choose another with {flag} or {env}")


class ProxyServer:
    """Owns the pool (and its ClusterView), the upstream ClientSession and both listeners."""

    def __init__(
        self, settings: Settings, policy: Policy | AsyncPolicy, metrics: Metrics, pool: Pool | None = None
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.policy_name: str = policy.name
        self.metrics = metrics
        self.pool = pool if pool is not None else Pool(settings.backends, pool_config_from(settings))
        self.view = self.pool.view
        self.port = settings.port
        self.admin_port = settings.admin_port
        self.reuse_port = False
        """Bind the data port with SO_REUSEPORT: N worker processes share it (lbproxy/workers.py)."""
        self.admin_routes: list[web.AbstractRouteDef] = []
        """Extra routes for the admin app (add before `start`)."""
        self.lifespans: list[Callable[[], AsyncIterator[None]]] = []
        """Async generators (one yield) entered in order before the listeners bind and left after the
        proxy drained and closed: the DQN's learner and gauges live as long as the proxy, not the
        admin app."""
        self._entered = contextlib.AsyncExitStack()
        self.session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        self.fast: UpstreamClient | None = None
        self.quality: QualityWindow | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._admin_runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = False
        """True once both listeners are bound (readyz answers 503 before, e.g. while the DQN loads)."""
        self._available_children: dict[int, Any] = {}
        self._reported_panic = False
        self._reported_ejections: dict[int, int] = {}
        self.pool.listeners.append(self._on_backend_change)

    def loop_time(self) -> float:
        return self._loop.time() if self._loop is not None else asyncio.get_running_loop().time()

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self, before_accepting: Callable[[], Awaitable[None]] | None = None) -> None:
        """Bind the admin and proxy listeners. A port in use raises ConfigError naming the flag.
        `before_accepting` runs between the two: a worker gets the supervisor's admin changes applied
        through its admin listener before it takes a single request (lbproxy/workers.py)."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=CONNECTIONS_PER_BACKEND,
            keepalive_timeout=UPSTREAM_KEEPALIVE_S,
            ttl_dns_cache=int(DNS_CACHE_TTL_S),
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=s.total_timeout_s, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
            ),
            auto_decompress=False,
            skip_auto_headers=UPSTREAM_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        try:
            for lifespan in self.lifespans:
                await self._entered.enter_async_context(contextlib.asynccontextmanager(lifespan)())
            await self._start_admin()
            if before_accepting is not None:
                await before_accepting()
            await self._start_proxy()
        except BaseException:
            await self._close_all()
            raise
        for b in self.pool.backends:
            self._on_backend_change(b)
        self.pool.start_health_checks(self.session)
        self.started = True
        self._ticker = self._loop.create_task(self._tick())

    async def _start_admin(self) -> None:
        s = self.settings
        self._admin_runner = web.AppRunner(build_admin_app(self), access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, s.admin_host, s.admin_port)
        try:
            await site.start()
        except OSError as exc:
            raise bind_error("--admin-port", s.admin_host, s.admin_port, exc) from None
        self.admin_port = site.port

    async def _start_proxy(self) -> None:
        s = self.settings
        assert self.session is not None
        self.quality = QualityWindow(self.view, self.metrics, s.error_penalty)
        self.fast = UpstreamClient(s.connect_timeout_s, s.read_timeout_s, s.total_timeout_s)
        for b in self.pool.backends:
            self.fast.set_backend(b.index, b.host, b.port)
        self.forwarder = Forwarder(
            self.pool,
            self.policy,
            self.metrics,
            self.quality,
            self.session,
            retry=s.retry,
            listen_host=s.host,
            listen_port=lambda: self.port,
            fast=self.fast,
            max_body_bytes=s.max_body_bytes,
            body_timeout_s=s.client_body_timeout_s,
        )
        server = GuardedServer(
            self.forwarder.handle,
            header_timeout_s=s.client_header_timeout_s,
            on_reject=self.forwarder.reject,
            access_log=logging.getLogger("aiohttp.access") if s.access_log else None,
            auto_decompress=False,  # Content-Encoding of request bodies passes through untouched
            keepalive_timeout=CLIENT_KEEPALIVE_S,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, s.host, s.port, backlog=LISTEN_BACKLOG, reuse_port=True if self.reuse_port else None
        )
        try:
            await self._site.start()
        except OSError as exc:
            raise bind_error("--port", s.host, s.port, exc) from None
        self.port = self._site.port

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the timeout), then close everything."""
        self.started = False  # readyz: take this instance out of rotation first
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self.forwarder is not None and self.forwarder.active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.forwarder.idle.wait(), drain_timeout_s)
        await self._close_all()

    async def _close_all(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.pool.stop()
        if self.fast is not None:
            self.fast.close_idle()
        if self.quality is not None:
            self.quality.publish()
        if self.forwarder is not None:
            self.forwarder.flush_metrics()
            self.forwarder.close()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self._entered.aclose()  # leaves the lifespans, last in first out

    # --- periodic work ------------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Once a second: quality gauges, in-flight gauges, ejection expiry (timers' safety net)."""
        while True:
            await asyncio.sleep(QUALITY_WINDOW_S)
            self.pool.expire(self.loop_time())
            if self.quality is not None:
                self.quality.publish()
            if self.forwarder is not None:
                self.forwarder.flush_metrics()
            if self.fast is not None:
                self.fast.expire_idle(UPSTREAM_KEEPALIVE_S)
            for b in self.pool.backends:
                self.metrics.in_flight.labels(b.name).set(self.view.in_flight[b.index])
            self.metrics.event_loop_tasks.set(len(asyncio.all_tasks()))

    def _log_panic(self) -> None:
        """Panic mode changes how every request is routed: say so once per change, with the why."""
        active = self.pool.active
        down = [b.name for b in active if not b.available]
        if self.pool.panic:
            why = f"{len(down)} of {len(active)} backends are unavailable ({', '.join(down)})"
            log.warning(
                "lbproxy: panic mode: %s, fewer than --panic-threshold-percent %g%% available; routing over all "
                "of them. If they serve no %r, unset --health-path.",
                why,
                self.settings.panic_threshold_percent,
                self.settings.health_path or "health path",
            )
        else:
            log.warning("lbproxy: panic mode over: %d of %d backends available", len(active) - len(down), len(active))

    def _on_backend_change(self, b: Backend) -> None:
        if self.fast is not None:
            if b.removed:
                self.fast.close_idle(b.index)
            else:
                self.fast.set_backend(b.index, b.host, b.port)
        child = self._available_children.get(b.index)
        if child is None:
            child = self._available_children[b.index] = self.metrics.available.labels(b.name)
        child.set(1.0 if b.available else 0.0)
        if self.pool.panic != self._reported_panic:
            self._reported_panic = self.pool.panic
            self._log_panic()
        delta = b.times_ejected - self._reported_ejections.get(b.index, 0)
        if delta > 0:
            self.metrics.ejections.labels(b.name).inc(delta)
            self._reported_ejections[b.index] = b.times_ejected
