"""The one admin listener of a proxy with `--workers N` above 1: the whole proxy's metrics, state and changes.

Each worker (lbproxy/workers.py) runs the single-process admin app (lbproxy/proxy/admin.py) on a private
loopback port. This app runs in the supervisor and is the only one operators and Prometheus see:

- GET /metrics: every worker's metrics added up by prometheus_client's MultiProcessCollector over the
  workers' PROMETHEUS_MULTIPROC_DIR (how each metric combines: lbproxy/telemetry.py), after each worker
  flushed its batched per-request counts (a GET of its own /metrics), then the supervisor's own
  (lbproxy_worker_restarts_total, lbproxy_workers).
- GET /admin/backends: each worker's state under `per_worker` (with its pid) and, under `backends`,
  one row per backend: requests, in-flight and ejections summed, `available` when every worker has
  it available (`available_in_workers` says how many do); with --online, `learner`: the one learner's
  updates, weights version and, per worker slot, the transitions it fed and the weights version it serves.
- GET /healthz: the supervisor is up. GET /readyz: 200 while a worker is ready and no stop is under way.
- Every other request (POST/DELETE /admin/backends, POST /admin/model, ...): forwarded unchanged to
  every worker, one after the other. The first worker judges it (input and admin token: admin.py);
  a refusal is answered as it is, counted once, and goes no further. Accepted changes are recorded in
  order and replayed to a worker that (re)starts before it accepts a request; one lock orders changes
  and replays, so every worker applies the same sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from lbproxy.proxy.admin import (
    BACKEND_EXAMPLE,
    SAFE_METHODS,
    AdminInputError,
    error_response,
    json_response,
    read_body,
)
from lbproxy.proxy.app import bind_error

if TYPE_CHECKING:
    from lbproxy.workers import Supervisor, Worker

SUPERVISOR_KEY: web.AppKey[Supervisor] = web.AppKey("supervisor")

CHANGE_TIMEOUT_S = 60.0
"""A forwarded change may load a model (POST /admin/model): seconds, not milliseconds."""
READ_TIMEOUT_S = 5.0
FORWARDED_HEADERS = (hdrs.AUTHORIZATION, hdrs.CONTENT_TYPE)
ANSWER_HEADERS = (hdrs.CONTENT_TYPE, hdrs.WWW_AUTHENTICATE)
SUMMED = ("requests", "in_flight", "times_ejected")
"""Per-backend fields of GET /admin/backends that add up over workers."""

log = logging.getLogger("lbproxy")


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


async def send(session: aiohttp.ClientSession, worker: Worker, req: AdminRequest, timeout_s: float) -> Answer:
    """`req` to one worker's private admin listener; aiohttp.ClientError/TimeoutError when it is unreachable."""
    async with session.request(
        req.method,
        worker.admin_url + req.path_qs,
        data=req.body or None,
        headers=req.headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        body = await resp.read()
        return Answer(resp.status, body, {k: resp.headers[k] for k in ANSWER_HEADERS if k in resp.headers})


def _get(path: str) -> AdminRequest:
    return AdminRequest(hdrs.METH_GET, path, {}, b"")


class AdminChanges:
    """The accepted admin changes, in order, and the lock that orders changes and replays."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.record: list[AdminRequest] = []

    async def replay(self, session: aiohttp.ClientSession, worker: Worker) -> None:
        """Apply every recorded change to a worker that is starting (call under `lock`)."""
        for req in self.record:
            try:
                answer = await send(session, worker, req, CHANGE_TIMEOUT_S)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("lbproxy: worker %d unreachable while replaying admin changes: %r", worker.index, exc)
                return  # it is dying; its successor gets the whole record
            if not answer.ok:
                log.warning(
                    "lbproxy: worker %d refused the replayed %s %s: %d %s",
                    *(worker.index, req.method, req.path_qs, answer.status, answer.body.decode(errors="replace")),
                )

    async def apply(
        self, session: aiohttp.ClientSession, targets: Callable[[], list[Worker]], req: AdminRequest
    ) -> Answer:
        """`req` to every admitted worker; recorded when the first one accepted it."""
        async with self.lock:
            first: Answer | None = None
            refused: list[str] = []
            for w in targets():
                try:
                    answer = await send(session, w, req, CHANGE_TIMEOUT_S)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # Dying: its successor gets the record, this change included, before it accepts.
                    log.warning("lbproxy: worker %d unreachable for %s %s: %r", w.index, req.method, req.path_qs, exc)
                    continue
                if first is None:
                    if not answer.ok:
                        return answer  # refused: nothing changed anywhere
                    first = answer
                elif not answer.ok:
                    refused.append(f"worker {w.index} answered {answer.status} {answer.body.decode(errors='replace')}")
            if first is None:
                return _unavailable()
            self.record.append(req)
            if refused:
                log.warning("lbproxy: workers disagree on %s %s: %s", req.method, req.path_qs, "; ".join(refused))
                return _answer(error_response(502, f"the first worker accepted it, but {'; '.join(refused)}"))
            return first


def _answer(resp: web.Response) -> Answer:
    assert isinstance(resp.body, bytes)
    return Answer(resp.status, resp.body, {hdrs.CONTENT_TYPE: resp.headers[hdrs.CONTENT_TYPE]})


def _unavailable() -> Answer:
    return _answer(error_response(503, "no worker is serving (starting, restarting or stopping); retry shortly"))


async def _gather(sup: Supervisor, path: str) -> list[tuple[Worker, Answer]]:
    """GET `path` from every serving worker at once; the unreachable ones are left out."""
    assert sup.session is not None
    workers = sup.serving
    answers = await asyncio.gather(
        *(send(sup.session, w, _get(path), READ_TIMEOUT_S) for w in workers), return_exceptions=True
    )
    return [(w, a) for w, a in zip(workers, answers, strict=True) if isinstance(a, Answer)]


# --- handlers ---------------------------------------------------------------------------------------------
async def metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR_KEY]
    await _gather(sup, "/metrics")  # each worker flushes its batched counts when scraped
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(sup.metrics_dir))  # type: ignore[no-untyped-call]  # unannotated upstream
    body = generate_latest(registry) + generate_latest(sup.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR_KEY]
    if sup.stopping:
        return web.Response(status=503, text="not ready: draining\n")
    if not sup.started:
        return web.Response(status=503, text="not ready: starting\n")
    answers = await _gather(sup, "/readyz")
    ready = [a for _, a in answers if a.ok]
    shown = ready or [a for _, a in answers]
    line = shown[0].body.decode(errors="replace").strip() if shown else "not ready: no worker is serving"
    return web.Response(status=200 if ready else 503, text=f"{line} ({len(ready)} of {sup.n} workers ready)\n")


def merge_states(states: list[tuple[Worker, dict[str, Any]]]) -> dict[str, Any]:
    """One GET /admin/backends document from the workers' (see the module docstring)."""
    rows: dict[tuple[str, bool], dict[str, Any]] = {}
    for _, state in states:
        for b in state["backends"]:
            row = rows.get((b["name"], b["removed"]))
            if row is None:
                row = rows[(b["name"], b["removed"])] = {k: b[k] for k in ("name", "url", "index", "weight", "removed")}
                row.update(dict.fromkeys(SUMMED, 0), available_in_workers=0)
            row["available_in_workers"] += 1 if b["available"] else 0
            for k in SUMMED:
                row[k] += b[k]
    for row in rows.values():
        row["available"] = row["available_in_workers"] == len(states)
    candidates = {name for _, state in states for name in state["candidates"]}
    return {
        "policy": states[0][1]["policy"],
        "workers": len(states),
        "panic": any(state["panic"] for _, state in states),
        "candidates": [r["name"] for r in rows.values() if r["name"] in candidates and not r["removed"]],
        "backends": list(rows.values()),
        "per_worker": [{"worker": w.index, "pid": w.pid, **state} for w, state in states],
    }


async def list_backends(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR_KEY]
    states = [(w, a) for w, a in await _gather(sup, "/admin/backends") if a.ok]
    if not states:
        return _unavailable().response()
    doc = merge_states([(w, json.loads(a.body)) for w, a in states])
    if sup.learner is not None:
        doc["learner"] = sup.learner.describe()
    return json_response(doc)


async def forward(request: web.Request) -> web.Response:
    """Reads go to one serving worker; everything else to all of them (AdminChanges.apply)."""
    sup = request.app[SUPERVISOR_KEY]
    assert sup.session is not None
    try:
        body = await read_body(request, BACKEND_EXAMPLE)
    except AdminInputError as exc:
        return error_response(exc.status, str(exc))
    headers = {str(k): request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
    req = AdminRequest(request.method, request.path_qs, headers, body)
    if request.method not in SAFE_METHODS:
        return (await sup.changes.apply(sup.session, lambda: [w for w in sup.live if w.admitted], req)).response()
    for w in sup.serving:
        try:
            return (await send(sup.session, w, req, READ_TIMEOUT_S)).response()
        except (aiohttp.ClientError, TimeoutError):
            continue  # dying: ask the next one
    return _unavailable().response()


async def start_admin(sup: Supervisor) -> tuple[web.AppRunner, int]:
    """Bind the admin listener (ConfigError naming --admin-port when it cannot); (runner, port)."""
    s = sup.settings
    app = web.Application()
    app[SUPERVISOR_KEY] = sup
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/backends", list_backends)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, s.admin_host, s.admin_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise bind_error("--admin-port", s.admin_host, s.admin_port, exc) from None
    return runner, site.port
