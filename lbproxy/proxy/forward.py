"""The forwarding loop: one request in, one policy decision, one upstream exchange (a retry at most), streamed back.

Runs on aiohttp's low-level `web.Server` (no router, no middlewares): every microsecond here is
paid on every request, so per-backend metric children are resolved once (lbproxy/proxy/accounting.py),
URL objects are cached, and the relay sends small bodies in one write (lbproxy/proxy/relay.py). Where a
retry goes and the per-try timeout: lbproxy/proxy/retry_sweep.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict
from yarl import URL

from lbproxy.observe import ClusterView, classify_path
from lbproxy.policy import AsyncPolicy, Decision, NoBackendAvailable, Policy
from lbproxy.proxy.accounting import Accounting
from lbproxy.proxy.body import ClientBodyError, GuardedBody, too_large
from lbproxy.proxy.errors import PER_TRY_TIMEOUT, STATUS_TEXT, UNSENT, Failure, classify, text_response
from lbproxy.proxy.headers import forwarded_items, request_head
from lbproxy.proxy.quality import QualityWindow
from lbproxy.proxy.relay import relay
from lbproxy.proxy.retry_sweep import RetrySweep
from lbproxy.proxy.upstream_client import UpstreamClient
from lbproxy.telemetry import Metrics
from lbproxy.upstream import Pool

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 §9.2.2; only these are retried, and only when no request body was sent."""

URL_CACHE_MAX = 4096
"""Upstream URL objects cached per (backend, target); yarl parsing costs several µs per request."""


class Forwarder:
    """The data-plane request handler; `handle` is passed to `aiohttp.web.Server`."""

    def __init__(
        self,
        pool: Pool,
        policy: Policy | AsyncPolicy,
        metrics: Metrics,
        quality: QualityWindow,
        session: aiohttp.ClientSession,
        *,
        retry: bool,
        listen_host: str,
        listen_port: Callable[[], int],
        fast: UpstreamClient | None = None,
        max_body_bytes: int = 0,
        body_timeout_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.view: ClusterView = pool.view
        self.policy = policy
        self.is_async = isinstance(policy, AsyncPolicy)
        # The same object typed as the protocol each branch calls: mypy cannot narrow through
        # is_async, and an isinstance check on a runtime protocol per request would cost more.
        self._async_policy = cast(AsyncPolicy, policy)
        self._sync_policy = cast(Policy, policy)
        self.quality = quality
        self.session = session
        self.fast = fast
        self.retry = retry
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.loop = asyncio.get_running_loop()
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._urls: dict[tuple[int, str], URL] = {}
        self._self_names: set[str] | None = None
        self.acct = Accounting(pool, policy, metrics, quality, self.loop)
        self.sweep = RetrySweep(
            self.view,
            None if self.is_async else self._sync_policy,
            metrics,
            pool.config,  # the cluster's retry settings (lbproxy/retry.py)
            lambda: self.active,
            self.loop,
        )

    def flush_metrics(self) -> None:
        """Push the locally counted per-request metrics to Prometheus (called once per tick)."""
        self.acct.flush()

    def close(self) -> None:
        """Stop the per-try sweep (the server is closing; handlers still running finish on their own)."""
        self.sweep.close()

    # --- request target ---------------------------------------------------------------------------
    def _is_self(self, host: str | None, port: int | None, request: web.BaseRequest) -> bool:
        if port is None:
            port = 80
        if host is None or port != self.listen_port():
            return False
        if self._self_names is None:
            names = {"localhost", "127.0.0.1", "::1", self.listen_host, socket.gethostname(), socket.getfqdn()}
            self._self_names = {n.lower() for n in names if n}
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return host.lower() in self._self_names or (sock is not None and host == sock[0])

    def _origin_form(self, target: str, request: web.BaseRequest) -> tuple[str, str] | None:
        """An absolute-form target naming this proxy as (path?query, the authority that replaces Host,
        RFC 9112 §3.2.2); None for any other (this is no open proxy)."""
        parts = urlsplit(target)
        if (
            parts.scheme not in ("http", "https")
            or parts.username is not None  # RFC 9110 §4.2.4: userinfo in an http URI is an error
            or not self._is_self(parts.hostname, parts.port, request)
        ):
            return None
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), parts.netloc

    def _url(self, idx: int, target: str) -> URL:
        key = (idx, target)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= URL_CACHE_MAX:
                self._urls.clear()
            url = self._urls[key] = URL(self.pool.backends[idx].url + target, encoded=True)
        return url

    # --- decisions ----------------------------------------------------------------------------------
    async def _decide(self, cls: int, now: float) -> tuple[int, int]:
        t0 = time.perf_counter()
        if self.is_async:
            res = self._async_policy.decide(cls, self.view, now)
            idx, did = res if type(res) is tuple else await cast(Awaitable[Decision], res)
        else:
            idx, did = self._sync_policy.choose(cls, self.view, now), -1
        self.acct.decisions.observe(time.perf_counter() - t0)
        return idx, did

    # --- the handler --------------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.active += 1
        self.idle.clear()
        try:
            return await self._handle(request)
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    def reject(self, status: int) -> None:
        """Count a request refused before it reached the handler (http_server.GuardedRequestHandler)."""
        self.acct.count(-1, status)

    def _refuse_framing(self, request: web.BaseRequest, has_body: bool) -> web.Response | None:
        """What the parser lets through but a proxy must not forward (RFC 9112 §6.1, §2.3)."""
        version = request.version
        if version != HttpVersion11 and version != HttpVersion10:
            self.acct.count(-1, 505)
            # aiohttp would answer in the client's version ("HTTP/2.0 505"): write our own status line.
            text = STATUS_TEXT[505].encode()
            if request.transport is not None:
                request.transport.write(
                    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
                )
                request.transport.close()
            return text_response(505)
        if has_body:
            te = request.headers.get(hdrs.TRANSFER_ENCODING)
            if te is not None and (version != HttpVersion11 or te.strip().lower() != "chunked"):
                # Codings other than a single `chunked` (e.g. "gzip, chunked"), or any Transfer-Encoding
                # from an HTTP/1.0 client: two parties could frame this message differently.
                self.acct.count(-1, 400)
                resp = text_response(400, "bad request: Transfer-Encoding must be exactly 'chunked' (HTTP/1.1 only)\n")
                resp.force_close()
                return resp
            length = request.content_length
            if self.max_body_bytes and length is not None and length > self.max_body_bytes:
                self.acct.count(-1, 413)
                resp = text_response(413, too_large(self.max_body_bytes).text)
                resp.force_close()  # do not read (or buffer) the body just to discard it
                return resp
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method = request.method
        if method == hdrs.METH_CONNECT:
            self.acct.count(-1, 405)
            return text_response(405, headers={"Allow": "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"})
        has_body = request.body_exists
        refused = self._refuse_framing(request, has_body)
        if refused is not None:
            return refused
        target = request.raw_path
        host_override: str | None = None
        if not target.startswith("/"):
            origin = self._origin_form(target, request)
            if origin is None:
                self.acct.count(-1, 400)
                return text_response(400)
            target, host_override = origin
        if not self.view.candidates:
            self.acct.count(-1, 503)
            return text_response(503)
        cls = int(classify_path(target))
        items = forwarded_items(request.headers, request.remote, "http", host_override)
        body = GuardedBody(request.content, self.max_body_bytes, self.body_timeout_s) if has_body else None
        headers: CIMultiDict[str] | None = None
        if has_body or self.fast is None:
            if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
                # Answer the client's Expect ourselves (the low-level server does not); the body streams.
                items = [(k, v) for k, v in items if k.lower() != "expect"]
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers = CIMultiDict(items)
        try:
            idx, did = await self._decide(cls, self.loop.time())
        except NoBackendAvailable:
            self.acct.count(-1, 503)
            return text_response(503)
        return await self._forward(request, method, target, items, headers, body, cls, idx, did)

    async def _forward(
        self,
        request: web.BaseRequest,
        method: str,
        target: str,
        items: list[tuple[str, str]],
        headers: CIMultiDict[str] | None,
        body: GuardedBody | None,
        cls: int,
        idx: int,
        did: int,
    ) -> web.StreamResponse:
        """The tries of one request to backend `idx` (one retry at most, on another), then the relay of the answer."""
        may_retry = self.retry and body is None and method in IDEMPOTENT_METHODS
        holds_slot = fresh = False  # holds_slot: the retry in progress took a retry-budget slot
        other: int | web.Response | None  # the backend of a retry, else the answer to a failed try (or None)
        sweep = self.sweep
        task = asyncio.current_task() if may_retry and sweep.per_try_timeout_s > 0 else None
        while True:
            self.quality.record_decision(idx, cls)
            queued = self.view.in_flight[idx]  # ahead of it at the backend (Outcome.queued_behind)
            self.pool.on_dispatch(idx)
            t_start = self.loop.time()
            if task is not None:
                sweep.watch(task, t_start, idx, cls)
            failure: Failure | None = None
            try:
                if headers is None and self.fast is not None:  # (no headers: always the fast client)
                    head = request_head(method, target, items, self.fast.default_host(idx))
                    resp: Any = await self.fast.request(idx, method == hdrs.METH_HEAD, head, fresh)
                else:
                    resp = await self.session.request(
                        method, self._url(idx, target), headers=headers, data=body, allow_redirects=False
                    )
            except asyncio.CancelledError:
                retry_at = None if task is None else sweep.abandoned_retry(task)
                if retry_at is None:
                    raise
                failure = PER_TRY_TIMEOUT
            except Exception as exc:  # every failure must complete the dispatch (in-flight accounting)
                failure, retry_at = classify(exc), None
            finally:
                if task is not None:
                    sweep.first_tries.pop(task, None)  # before any other await: never cancel a later one
                    sweep.awaiting_budget.pop(task, None)
                if holds_slot:  # the retry's slot is held until its answer, failure or cancellation
                    sweep.release()
            if failure is not None:
                other = await self._failed_try(failure, body, may_retry, retry_at, idx, did, cls, t_start, queued)
                if not isinstance(other, int):
                    return other
            elif may_retry and resp.status >= 500:
                other = self._retry_5xx(resp, idx, did, cls, t_start, queued)
                if other is None:
                    break
            else:
                break
            idx, did, fresh, may_retry, task = other, -1, failure is not None, False, None  # the retry
            holds_slot = failure is None or failure[0] not in UNSENT  # a budget slot unless nothing was sent
        return await relay(self.acct, request, resp, method, idx, did, cls, t_start, queued)

    async def _failed_try(
        self,
        failure: Failure,
        body: GuardedBody | None,
        may_retry: bool,
        retry_at: int | None,
        idx: int,
        did: int,
        cls: int,
        t_start: float,
        queued: int,
    ) -> int | web.Response:
        """Record a try that got no answer, and return the backend of its retry (`retry_at` when the
        per-try sweep abandoned it; after a wait for a budget slot if all are taken: lbproxy/proxy/
        retry_sweep.py's SLOT_WAIT_S) or else the answer to send. The retry always takes a fresh
        connection: the other backend's pooled ones may be just as stale (backends' idle timeouts often
        fire together after a lull), and there is only this one retry."""
        if body is not None and body.error is not None:
            return self._client_body_failed(body.error, idx, did, cls, t_start, queued)
        kind, status, retryable = failure
        self.acct.error(idx, kind)
        self.acct.complete(idx, did, cls, t_start, status, True, None, queued)
        other = None
        if may_retry and retryable:
            other = retry_at if retry_at is not None else await self.sweep.retry_when_allowed(idx, cls, kind)
        return text_response(status) if other is None else other

    def _retry_5xx(self, resp: Any, idx: int, did: int, cls: int, t_start: float, queued: int) -> int | None:
        """Envoy retry_on 5xx: a body-less idempotent request is replayed on another backend if the budget
        allows; then this answer is dropped (its connection kept if the body already came with the head)."""
        other = self.sweep.retry_to(idx, cls, "5xx")
        if other is not None:
            if resp.content.is_eof():
                resp.release()
            else:
                resp.close()
            self.acct.complete(idx, did, cls, t_start, resp.status, True, None, queued)
        return other

    def _client_body_failed(
        self, err: ClientBodyError, idx: int, did: int, cls: int, t_start: float, queued: int
    ) -> web.Response:
        """The client's body broke the limit or stalled: the exchange ends, the backend is not to blame."""
        self.acct.error(idx, "client_body")
        self.acct.complete(idx, did, cls, t_start, err.status, False, None, queued)
        resp = text_response(err.status, err.text)
        resp.force_close()  # the rest of the body is unread: the connection cannot carry another request
        return resp
