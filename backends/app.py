"""The emulated web-application server: an aiohttp app with a finite FIFO worker pool.

Service is emulated by `asyncio.sleep(service_time)` while a worker slot is held, so a 2-core machine
can emulate many servers, each with real queueing: with all `workers` slots busy, requests wait in
FIFO order. Service time = class mean / (speed x class_speed[class]) x slowdown, drawn from the
configured distribution with a seeded RNG.

Every response carries `X-Backend`, `X-Utilization` (busy/workers after this request left its slot),
`X-Service-Time` (seconds spent in service) and `X-Queue-Wait` (seconds waited for a slot).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gzip
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientPayloadError, hdrs, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backends.faults import FaultError, FaultState, Schedule, run_schedule
from lbproxy.cluster import CLASS_NAMES, Distribution
from lbproxy.observe import classify_path

BODY_CHUNK_BYTES = 256 * 1024
"""Chunk size of `?size=N` downloads: large enough that per-write overhead is small, small enough that
a 200 MB body never sits in memory (aiohttp's write() waits for the socket to drain)."""
MAX_GZIP_BYTES = 64 * 1024 * 1024
"""`?gzip=1` compresses the whole body in memory; above this size the request is refused (400)."""
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
CHUNKED_PARTS = 5
"""`/chunked` answers in this many separately written chunks."""
SERVICE_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Histogram buckets: 1 ms (static at speed 2) up to 5 s (heavy work under a 25x slowdown)."""
SHUTDOWN_GRACE_S = 0.5
"""On SIGTERM, in-flight requests get this long to finish (aiohttp's default, 60 s, would keep requests
held by a `pause` fault alive past every launcher's and test's stop timeout)."""
LISTEN_BACKLOG = 1024
"""Accept queue length; aiohttp's 128 can overflow when a load generator opens hundreds of connections."""
PARENT_POLL_S = 0.5
"""How often a launched server checks that its launcher is still alive."""
CRASH_FLUSH_S = 0.05
"""Delay between answering `{"crash": true}` and exiting, so the admin caller gets its 200."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Everything one server needs; built from the CLI (backends/__main__.py) or a cluster file."""

    port: int
    host: str = "127.0.0.1"
    name: str = ""
    workers: int = 4
    speed: float = 1.0
    class_speed: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mean_s: tuple[float, float, float] = (0.010, 0.050, 0.002)
    """Mean service time per class (light, heavy, static) at speed 1 (defaults: lbproxy/cluster.py)."""
    distribution: Distribution = "exponential"
    cv: float = 1.0
    error_rate: float = 0.0
    seed: int | None = None
    schedule: Schedule = field(default_factory=Schedule)
    schedule_epoch: float | None = None
    """Wall-clock (time.time()) zero of the fault schedule; None = this server's start. A launcher passes
    its own start so every server of a cluster, restarted ones included, shares one schedule clock."""
    parent_pid: int | None = None
    """Exit when this process (the launcher) is gone, so a killed launcher leaves no orphans."""

    @property
    def display_name(self) -> str:
        return self.name or f"{self.host}:{self.port}"


class WorkerPool:
    """`workers` slots handed out in strict FIFO order (arrival order is what a real server's accept
    queue gives), with the busy and queued counts the headers and metrics report."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.busy < self.workers and not self._waiters:
            self.busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: busy stays counted
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.busy -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class ServiceSampler:
    """Draws service times: exponential (cv 1), lognormal with a given cv, or constant at the mean."""

    def __init__(self, distribution: str, cv: float, seed: int | None) -> None:
        self.distribution = distribution
        self.rng = random.Random(seed)
        # Lognormal with mean m and coefficient of variation cv: sigma^2 = ln(1 + cv^2), mu = ln m - sigma^2/2.
        self.sigma = math.sqrt(math.log1p(cv * cv))

    def draw(self, mean_s: float) -> float:
        if self.distribution == "constant":
            return mean_s
        if self.distribution == "lognormal":
            return self.rng.lognormvariate(math.log(mean_s) - self.sigma * self.sigma / 2, self.sigma)
        return self.rng.expovariate(1.0 / mean_s)


class Metrics:
    """Prometheus metrics on a private registry (several servers may share one process in tests)."""

    def __init__(self, pool: WorkerPool) -> None:
        self._requests: dict[tuple[int, int], Any] = {}
        self._service: dict[int, Any] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "backend_requests", "Requests answered, by class and status code", ["class", "code"], registry=self.registry
        )
        self.service = Histogram(
            "backend_service_seconds",
            "Time spent in service",
            ["class"],
            buckets=SERVICE_BUCKETS_S,
            registry=self.registry,
        )
        Gauge("backend_busy_workers", "Worker slots in use", registry=self.registry).set_function(lambda: pool.busy)
        Gauge("backend_queue_length", "Requests waiting for a worker", registry=self.registry).set_function(
            lambda: pool.queued
        )
        Gauge("backend_utilization", "Busy workers / workers", registry=self.registry).set_function(
            lambda: pool.busy / pool.workers
        )

    def record(self, req_class: int, code: int, service_s: float) -> None:
        """Count one answered request. The labelled children are cached: `labels()` takes a lock and
        builds a key on every call, a measurable share of this server's per-request cost."""
        counter = self._requests.get((req_class, code))
        if counter is None:
            counter = self._requests[(req_class, code)] = self.requests.labels(CLASS_NAMES[req_class], str(code))
        counter.inc()
        hist = self._service.get(req_class)
        if hist is None:
            hist = self._service[req_class] = self.service.labels(CLASS_NAMES[req_class])
        hist.observe(service_s)


@dataclass
class Backend:
    """The runtime state of one server: configuration, pool, RNG, faults, metrics."""

    config: BackendConfig
    pool: WorkerPool = field(init=False)
    sampler: ServiceSampler = field(init=False)
    faults: FaultState = field(init=False)
    metrics: Metrics = field(init=False)
    error_rng: random.Random = field(init=False)
    default_bodies: tuple[bytes, ...] = field(init=False)
    """The small default response body of each class, encoded once."""

    def __post_init__(self) -> None:
        cfg = self.config
        self.pool = WorkerPool(cfg.workers)
        self.sampler = ServiceSampler(cfg.distribution, cfg.cv, cfg.seed)
        # A separate stream for injected errors, so turning errors on does not change the service times drawn.
        self.error_rng = random.Random(None if cfg.seed is None else cfg.seed + 1)
        self.faults = FaultState(baseline_error_rate=cfg.error_rate)
        self.metrics = Metrics(self.pool)
        self.default_bodies = tuple(json.dumps({"backend": cfg.display_name, "class": c}).encode() for c in CLASS_NAMES)

    def mean_service_s(self, req_class: int) -> float:
        cfg = self.config
        return cfg.mean_s[req_class] / (cfg.speed * cfg.class_speed[req_class]) * self.faults.slowdown

    def state(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": cfg.display_name,
            "pid": os.getpid(),
            "workers": cfg.workers,
            "busy": self.pool.busy,
            "queued": self.pool.queued,
            "speed": cfg.speed,
            "class_speed": dict(zip(CLASS_NAMES, cfg.class_speed, strict=True)),
            **self.faults.as_dict(),
        }


BACKEND_KEY = web.AppKey("backend", Backend)


def crash_now() -> None:
    """Emulate a crash: exit with code 1 without any cleanup, like a killed process."""
    sys.stdout.flush()
    os._exit(1)


@functools.lru_cache(maxsize=8)
def _gzipped(size: int) -> bytes:
    # Cached: clients of the pass-through tests ask for the same few sizes again and again.
    return gzip.compress(b"x" * size, compresslevel=1)


def _query_int(request: web.Request, key: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be an integer in [{lo}, {hi}], got {raw!r}\n") from None
    if not lo <= v <= hi:
        raise web.HTTPBadRequest(text=f"{key} must be an integer in [{lo}, {hi}], got {raw!r}\n")
    return v


async def handle(request: web.Request) -> web.StreamResponse:
    """Any application path: drain the body, queue for a worker, serve, answer."""
    backend = request.app[BACKEND_KEY]
    size = status = None
    want_gzip = echo = False
    if request.query_string:  # the common case has none: skip parsing (this handler is the hot path)
        size = _query_int(request, "size", 0, 1 << 40)
        status = _query_int(request, "status", 100, 599)
        if status is not None and status < 200:
            raise web.HTTPBadRequest(text="status must be >= 200 (1xx are not final responses)\n")
        want_gzip = request.query.get("gzip") in ("1", "true")
        if want_gzip and (size or 0) > MAX_GZIP_BYTES:
            raise web.HTTPBadRequest(text=f"gzip=1 bodies are built in memory; size must be <= {MAX_GZIP_BYTES}\n")
        echo = request.query.get("echo") == "headers"

    received = 0
    has_body = request.body_exists
    if has_body:
        # Uploads of any size: count and drop each chunk as it arrives, never buffer.
        try:
            async for chunk in request.content.iter_chunked(BODY_CHUNK_BYTES):
                received += len(chunk)
        except (ConnectionError, ClientPayloadError):
            return web.Response(status=400, text="upload interrupted\n")  # the client hung up mid-body

    faults = backend.faults
    if faults.paused:
        await faults.wait_unpaused()
    req_class = int(classify_path(request.path))
    pool = backend.pool
    # perf_counter, not loop.time(): uvloop's clock has 1 ms resolution, too coarse for 2 ms static requests.
    t_arrive = time.perf_counter()
    await pool.acquire()
    try:
        t_start = time.perf_counter()
        await asyncio.sleep(backend.sampler.draw(backend.mean_service_s(req_class)))
        t_end = time.perf_counter()
    finally:
        pool.release()
    service_s = t_end - t_start
    failed = faults.error_rate > 0 and backend.error_rng.random() < faults.error_rate
    code = 500 if failed else status or 200
    backend.metrics.record(req_class, code, service_s)

    headers = {
        "X-Backend": backend.config.display_name,
        "X-Utilization": f"{pool.busy / pool.workers:.4f}",
        "X-Service-Time": f"{service_s:.6f}",
        "X-Queue-Wait": f"{t_start - t_arrive:.6f}",
    }
    if code in (204, 304):
        return web.Response(status=code, headers=headers)
    if failed:
        return web.Response(status=500, text="injected error\n", headers=headers)
    if request.path == "/chunked":
        return await _chunked(request, headers, code)
    if echo:
        return web.json_response(
            {"headers": [[k, v] for k, v in request.headers.items()]}, status=code, headers=headers
        )
    if want_gzip:
        headers[hdrs.CONTENT_ENCODING] = "gzip"
        body = _gzipped(size if size is not None else 100)
        return web.Response(status=code, body=body, headers=headers, content_type="text/plain")
    if size is not None:
        return await _sized(request, headers, code, size)
    if has_body:
        payload = {"backend": backend.config.display_name, "received_bytes": received}
        return web.json_response(payload, status=code, headers=headers)
    headers[hdrs.CONTENT_TYPE] = JSON_CONTENT_TYPE
    return web.Response(status=code, body=backend.default_bodies[req_class], headers=headers)


async def _sized(request: web.Request, headers: dict[str, str], code: int, size: int) -> web.StreamResponse:
    """`?size=N`: N bytes with a Content-Length, written in chunks so huge bodies never sit in memory."""
    resp = web.StreamResponse(status=code, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = size
    block = b"x" * min(size, BODY_CHUNK_BYTES)
    try:
        await resp.prepare(request)
        left = size if request.method != hdrs.METH_HEAD else 0
        while left > 0:
            n = min(left, len(block))
            await resp.write(block if n == len(block) else block[:n])
            left -= n
        await resp.write_eof()
    except ConnectionError:
        pass  # the client hung up mid-download: normal for a server, not an error to log
    return resp


async def _chunked(request: web.Request, headers: dict[str, str], code: int) -> web.StreamResponse:
    resp = web.StreamResponse(status=code, headers=headers)
    resp.content_type = "text/plain"
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        if request.method != hdrs.METH_HEAD:
            for i in range(CHUNKED_PARTS):
                await resp.write(f"chunk {i}\n".encode())
        await resp.write_eof()
    except ConnectionError:
        pass  # the client hung up
    return resp


async def health(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    if backend.faults.paused:
        return web.Response(status=503, text="paused\n")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BACKEND_KEY].metrics.registry)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


async def admin_fault(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    try:
        spec = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.json_response({"error": 'body must be JSON such as {"slowdown": 5.0}'}, status=400)
    try:
        crash = backend.faults.apply(spec)
    except FaultError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if crash:
        asyncio.get_running_loop().call_later(CRASH_FLUSH_S, crash_now)
        return web.json_response({"crashing": True})
    return web.json_response(backend.state())


async def admin_reset(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    backend.faults.reset()
    return web.json_response(backend.state())


async def admin_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKEND_KEY].state())


async def _schedule_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the `--fault-schedule` faults in the background for the app's lifetime."""
    backend = app[BACKEND_KEY]
    epoch = backend.config.schedule_epoch
    start_s = 0.0 if epoch is None else max(0.0, time.time() - epoch)
    task = asyncio.create_task(run_schedule(backend.config.schedule, backend.faults, crash_now, start_s))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _orphan_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Stop serving once the launcher that started this server has died (we were re-parented)."""
    parent = app[BACKEND_KEY].config.parent_pid

    async def watch() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(config: BackendConfig) -> web.Application:
    app = web.Application(client_max_size=1 << 62)  # bodies are streamed, never read whole by aiohttp
    app[BACKEND_KEY] = Backend(config)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/fault", admin_fault)
    app.router.add_post("/admin/reset", admin_reset)
    app.router.add_get("/admin/state", admin_state)
    app.router.add_route("*", "/{tail:.*}", handle)
    if config.schedule.faults:
        app.cleanup_ctx.append(_schedule_ctx)
    if config.parent_pid is not None:
        app.cleanup_ctx.append(_orphan_watch_ctx)
    return app


class BindError(OSError):
    """The listening socket could not be opened (port in use, bad address)."""


async def serve(config: BackendConfig, ready_line: bool = True) -> None:
    """Serve until SIGINT/SIGTERM, then close the listener and finish cleanly."""
    runner = web.AppRunner(make_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            config.host,
            config.port,
            reuse_address=True,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            backlog=LISTEN_BACKLOG,
        )
        try:
            await site.start()
        except OSError as exc:
            raise BindError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        if ready_line:
            print(f"backend {config.display_name} listening on http://{config.host}:{config.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(config: BackendConfig) -> int:
    """Run one server on uvloop when available (the same loop the proxy uses); returns the exit code."""
    disable_created_metrics()  # process-wide switch: the *_created series only double the scrape size
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the app works without it
        runner = asyncio.run
    try:
        runner(serve(config))
    except BindError as exc:
        print(f"backends: error: {exc}; choose a free --port", file=sys.stderr)
        return 2
    return 0
