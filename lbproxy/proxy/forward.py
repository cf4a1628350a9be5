"""The forwarding handler: one request in, one policy decision, one upstream exchange, streamed back.

Runs on aiohttp's low-level `web.Server` (no router, no middlewares): every microsecond here is
paid on every request, so per-backend metric children are resolved once, URL objects are cached,
and small bodies with a known length are relayed in one write instead of a read/write loop.
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

from lbproxy.observe import ClusterView, Outcome, classify_path
from lbproxy.policy import AsyncPolicy, Decision, NoBackendAvailable, Policy
from lbproxy.proxy.batched_metrics import BatchedCounter, BatchedHistogram
from lbproxy.proxy.body import ClientBodyError, GuardedBody, too_large
from lbproxy.proxy.headers import forwarded_items, request_head, response_headers
from lbproxy.proxy.quality import QualityWindow
from lbproxy.proxy.upstream_client import UpstreamClient
from lbproxy.retry import RetryBudget
from lbproxy.telemetry import Metrics
from lbproxy.upstream import Pool

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 §9.2.2; only these are retried, and only when no request body was sent."""

SMALL_BODY_BYTES = 64 * 1024
"""Responses with a Content-Length up to this are read whole and sent in one write: one syscall
instead of a read/write loop (ANCHORS.md: buffering is 5–15 % cheaper). Memory stays bounded."""

URL_CACHE_MAX = 4096
"""Upstream URL objects cached per (backend, target); yarl parsing costs several µs per request."""

SERVICE_TIME_HEADER = "X-Service-Time"
"""Backend-reported service time in seconds (emulated backends send it); feeds `Outcome.service_time_s`."""

_BODYLESS_STATUS = frozenset({204, 304})

# Exception kinds: (label for lbproxy_upstream_errors, status sent when nothing was relayed yet, retryable)
_CONNECT = ("connect", 502, True)
_CONNECT_TIMEOUT = ("connect_timeout", 504, True)
_UNSENT = frozenset({_CONNECT[0], _CONNECT_TIMEOUT[0]})
"""Failures before any byte of the request left: their retry puts no extra load on any backend (the
first try reached none), so it takes no retry-budget slot, which bounds amplification. Without this,
right after a backend dies the budget's slots go to the retries of the requests it held, and new
requests refused at connect were answered 502 though another backend was up."""
_DISCONNECT = ("disconnect", 502, True)
_TIMEOUT = ("timeout", 504, False)
_BAD_RESPONSE = ("bad_response", 502, False)
_PER_TRY_TIMEOUT = ("per_try_timeout", 504, True)  # abandoned by the per-try timer (lbproxy/retry.py)


def _classify(exc: BaseException) -> tuple[str, int, bool]:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _CONNECT
    if isinstance(exc, TimeoutError):  # total timeout, or sock_read (ServerTimeoutError is one too)
        return _TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return _DISCONNECT  # typically a keep-alive connection the backend closed while idle
    return _BAD_RESPONSE


_STATUS_TEXT = {
    400: "bad request: the target must be a path, or an absolute URL naming this proxy (not an open proxy)\n",
    405: "CONNECT is not supported: lbproxy is a reverse proxy\n",
    505: "HTTP version not supported: lbproxy speaks HTTP/1.0 and HTTP/1.1\n",
    502: "bad gateway: the backend could not be reached or sent an invalid response\n",
    503: "service unavailable: no backend is available\n",
    504: "gateway timeout: the backend did not answer in time\n",
}


def _text(status: int, text: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text or _STATUS_TEXT[status], headers=headers)


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
        self.metrics = metrics
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
        self._decision_hist = BatchedHistogram(metrics.decision_duration.labels(policy.name))
        self._requests: dict[tuple[int, int], BatchedCounter] = {}
        self._durations: dict[int, BatchedHistogram] = {}
        self._errors: dict[tuple[int, str], Any] = {}
        self._self_names: set[str] | None = None
        cfg = pool.config  # the cluster's retry settings (lbproxy/retry.py)
        self.retry_budget = RetryBudget(cfg.retry_budget_percent, cfg.retry_min_concurrency)
        self.per_try_timeout_s = cfg.per_try_timeout_s
        self._abandoned: dict[asyncio.Task[Any], int] = {}
        """Handler tasks whose first try the per-try sweep cancelled (told apart from any other cancel),
        with the backend their retry goes to: chosen, and its budget slot taken, before the cancel, so
        an abandoned try always has its retry (never a 504 for a request that was only slow)."""
        self._first_tries: dict[asyncio.Task[Any], tuple[float, int, int]] = {}
        """First tries under the per-try timeout: handler task -> (deadline, backend, class). Insertion order is
        deadline order (one timeout for all), so a sweep stops at the first one not yet due: no timer
        per request (a call_later and its cancel cost ~2 µs, paid by every GET)."""
        self._awaiting_budget: dict[asyncio.Task[Any], tuple[int, int]] = {}
        """First tries past their deadline that found no retry (no budget slot, no other candidate yet):
        offered a retry again on every sweep until they end, so a hung backend's requests are not left
        to the read timeout just because many expired at once."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every_s = min(0.25, max(0.01, self.per_try_timeout_s / 10))

    # --- metric children, resolved once per key --------------------------------------------------
    def _label(self, idx: int) -> str:
        return self.pool.backends[idx].name if idx >= 0 else "none"

    def _count(self, idx: int, code: int) -> None:
        key = (idx, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = BatchedCounter(self.metrics.requests.labels(self._label(idx), str(code)))
        child.inc()

    def _error(self, idx: int, kind: str) -> None:
        key = (idx, kind)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.metrics.upstream_errors.labels(self._label(idx), kind)
        child.inc()

    def flush_metrics(self) -> None:
        """Push the locally counted per-request metrics to Prometheus (called once per tick)."""
        self._decision_hist.flush()
        for c in self._requests.values():
            c.flush()
        for h in self._durations.values():
            h.flush()

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
        self._decision_hist.observe(time.perf_counter() - t0)
        return idx, did

    def _choose_other(self, failed: int, cls: int, now: float) -> int | None:
        """Retry target: the policy's choice with the failed backend masked out (Envoy's
        previous_hosts retry predicate); async policies get the least-loaded other candidate."""
        view = self.view
        saved = view.candidates
        others = [i for i in saved if i != failed]
        if not others:
            return None
        if not self.is_async:
            view.candidates = others
            try:
                idx = int(self._sync_policy.choose(cls, view, now))
            except NoBackendAvailable:
                return None
            finally:
                view.candidates = saved
            return idx if idx in others else others[0]
        return min(others, key=lambda i: view.in_flight[i] / max(view.capacity[i], 1e-9))

    def _retry_to(self, failed: int, cls: int, kind: str) -> int | None:
        """Where to retry a request that failed on `failed`, if anywhere: another backend (the same one
        only after a stale keep-alive disconnect), and only with a slot in the retry budget (unless
        nothing was sent: `_UNSENT`)."""
        budgeted = kind not in _UNSENT
        if budgeted and not self.retry_budget.allows(self.active):
            return None
        other = self._choose_other(failed, cls, self.loop.time())
        if other is None and kind == "disconnect":
            # A keep-alive connection the backend closed as we reused it: with no other backend, the
            # same one on a fresh connection is the safe retry.
            other = failed
        if other is None or (budgeted and not self.retry_budget.try_acquire(self.active)):
            return None
        self.metrics.retries.inc()
        return other

    def _watch_first_try(self, task: asyncio.Task[Any], now: float, idx: int, cls: int) -> None:
        self._first_tries[task] = (now + self.per_try_timeout_s, idx, cls)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep_first_tries)

    def _sweep_first_tries(self) -> None:
        """Expire the first tries past their deadline (to within `_sweep_every_s`), oldest first."""
        self._sweeper = None
        now = self.loop.time()
        waiting = self._awaiting_budget
        for task, (idx, cls) in list(waiting.items()):
            if self._per_try_expired(task, idx, cls):
                del waiting[task]
        tries = self._first_tries
        while tries:
            task = next(iter(tries))
            deadline, idx, cls = tries[task]
            if deadline > now:
                break
            del tries[task]
            if not self._per_try_expired(task, idx, cls):
                waiting[task] = (idx, cls)
        if tries or waiting:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep_first_tries)

    def _per_try_expired(self, task: asyncio.Task[Any], idx: int, cls: int) -> bool:
        """A first try outlived the per-try timeout: abandon it if its retry can happen now (another
        candidate, room in the budget: both taken here) and say so; if not, the sweep offers it again."""
        if not any(i != idx for i in self.view.candidates):
            return False
        other = self._retry_to(idx, cls, "per_try_timeout")
        if other is None:
            return False
        self._abandoned[task] = other
        task.cancel()
        return True

    def close(self) -> None:
        """Stop the per-try sweep (the server is closing; handlers still running finish on their own)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _complete(
        self,
        idx: int,
        did: int,
        cls: int,
        t_start: float,
        code: int,
        failed: bool,
        service_time_s: float | None,
        queued: int,
    ) -> None:
        now = self.loop.time()
        out = Outcome(idx, cls, now - t_start, failed, did, service_time_s, queued)
        self.pool.on_complete(out, now, failed)
        self.quality.record_outcome(out)
        self.policy.observe(out, self.view, now)
        dur = self._durations.get(idx)
        if dur is None:
            dur = self._durations[idx] = BatchedHistogram(self.metrics.request_duration.labels(self._label(idx)))
        dur.observe(out.latency_s)
        self._count(idx, code)

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
        self._count(-1, status)

    def _refuse_framing(self, request: web.BaseRequest, has_body: bool) -> web.Response | None:
        """What the parser lets through but a proxy must not forward (RFC 9112 §6.1, §2.3)."""
        version = request.version
        if version != HttpVersion11 and version != HttpVersion10:
            self._count(-1, 505)
            # aiohttp would answer in the client's version ("HTTP/2.0 505"): write our own status line.
            text = _STATUS_TEXT[505].encode()
            if request.transport is not None:
                request.transport.write(
                    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
                )
                request.transport.close()
            return _text(505)
        if has_body:
            te = request.headers.get(hdrs.TRANSFER_ENCODING)
            if te is not None and (version != HttpVersion11 or te.strip().lower() != "chunked"):
                # Codings other than a single `chunked` (e.g. "gzip, chunked"), or any Transfer-Encoding
                # from an HTTP/1.0 client: two parties could frame this message differently.
                self._count(-1, 400)
                resp = _text(400, "bad request: Transfer-Encoding must be exactly 'chunked' (HTTP/1.1 only)\n")
                resp.force_close()
                return resp
            length = request.content_length
            if self.max_body_bytes and length is not None and length > self.max_body_bytes:
                self._count(-1, 413)
                resp = _text(413, too_large(self.max_body_bytes).text)
                resp.force_close()  # do not read (or buffer) the body just to discard it
                return resp
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method = request.method
        if method == hdrs.METH_CONNECT:
            self._count(-1, 405)
            return _text(405, headers={"Allow": "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"})
        has_body = request.body_exists
        refused = self._refuse_framing(request, has_body)
        if refused is not None:
            return refused
        target = request.raw_path
        host_override: str | None = None
        if not target.startswith("/"):
            parts = urlsplit(target)
            if (
                parts.scheme not in ("http", "https")
                or parts.username is not None  # RFC 9110 §4.2.4: userinfo in an http URI is an error
                or not self._is_self(parts.hostname, parts.port, request)
            ):
                self._count(-1, 400)
                return _text(400)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_override = parts.netloc  # RFC 9112 §3.2.2: the target's authority replaces Host
        view = self.view
        if not view.candidates:
            self._count(-1, 503)
            return _text(503)
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
        retry_ok = self.retry and not has_body and method in IDEMPOTENT_METHODS

        start = self.loop.time()
        try:
            idx, did = await self._decide(cls, start)
        except NoBackendAvailable:
            self._count(-1, 503)
            return _text(503)
        attempt = 0
        holds_slot = False  # the retry in progress took a retry-budget slot
        fresh = False
        # Per-try timeout: a timer on the first try of a request that could be retried (lbproxy/retry.py).
        task = asyncio.current_task() if retry_ok and self.per_try_timeout_s > 0 else None
        while True:
            self.quality.record_decision(idx, cls)
            queued = self.view.in_flight[idx]  # ahead of it at the backend (Outcome.queued_behind)
            self.pool.on_dispatch(idx)
            t_start = self.loop.time()
            watched = task is not None and attempt == 0
            if task is not None and watched:
                self._watch_first_try(task, t_start, idx, cls)
            failure: tuple[str, int, bool] | None = None
            retry_at: int | None = None  # an abandoned first try's retry, chosen when it was abandoned
            try:
                resp: Any
                if headers is None:
                    assert self.fast is not None
                    head = request_head(method, target, items, self.fast.default_host(idx))
                    resp = await self.fast.request(idx, method == hdrs.METH_HEAD, head, fresh)
                else:
                    resp = await self.session.request(
                        method, self._url(idx, target), headers=headers, data=body, allow_redirects=False
                    )
            except asyncio.CancelledError:
                if task is None or task not in self._abandoned:
                    raise
                retry_at = self._abandoned.pop(task)
                if task.uncancel():  # cancelled by someone else as well: let that one through
                    self.retry_budget.release()
                    raise
                failure = _PER_TRY_TIMEOUT
            except Exception as exc:  # every failure must complete the dispatch (in-flight accounting)
                if body is not None and body.error is not None:
                    return self._client_body_failed(body.error, idx, did, cls, t_start, queued)
                failure = _classify(exc)
            finally:
                if task is not None and watched:
                    self._first_tries.pop(task, None)  # before any other await: never cancel a later one
                    self._awaiting_budget.pop(task, None)
                if holds_slot:  # the retry's slot is held until its answer, failure or cancellation
                    holds_slot = False
                    self.retry_budget.release()
            if failure is not None:
                kind, status, retryable = failure
                self._error(idx, kind)
                self._complete(idx, did, cls, t_start, status, True, None, queued)
                if retry_ok and retryable and attempt == 0:
                    other = retry_at if retry_at is not None else self._retry_to(idx, cls, kind)
                    if other is not None:
                        # Always a fresh connection: the other backend's pooled ones may be just as
                        # stale (backends' idle timeouts often fire together after a lull), and
                        # there is only this one retry.
                        idx, did, attempt, fresh = other, -1, 1, True
                        holds_slot = kind not in _UNSENT
                        continue
                return _text(status)
            if retry_ok and attempt == 0 and resp.status >= 500:
                # Envoy retry_on 5xx: a body-less idempotent request is replayed on another backend;
                # this answer is dropped (its connection kept if the body already came with the head).
                other = self._retry_to(idx, cls, "5xx")
                if other is not None:
                    if resp.content.is_eof():
                        resp.release()
                    else:
                        resp.close()
                    self._complete(idx, did, cls, t_start, resp.status, True, None, queued)
                    idx, did, attempt, fresh = other, -1, 1, False
                    holds_slot = True
                    continue
            break
        return await self._relay(request, resp, method, idx, did, cls, t_start, queued)

    def _client_body_failed(
        self, err: ClientBodyError, idx: int, did: int, cls: int, t_start: float, queued: int
    ) -> web.Response:
        """The client's body broke the limit or stalled: the exchange ends, the backend is not to blame."""
        self._error(idx, "client_body")
        self._complete(idx, did, cls, t_start, err.status, False, None, queued)
        resp = _text(err.status, err.text)
        resp.force_close()  # the rest of the body is unread: the connection cannot carry another request
        return resp

    async def _relay(
        self,
        request: web.BaseRequest,
        resp: Any,
        method: str,
        idx: int,
        did: int,
        cls: int,
        t_start: float,
        queued: int,
    ) -> web.StreamResponse:
        status = resp.status
        if status == 101:
            # The request's Upgrade was stripped (hop-by-hop) and lbproxy tunnels nothing: a backend
            # switching protocols anyway sent a response this proxy cannot relay.
            resp.close()
            self._error(idx, "bad_response")
            self._complete(idx, did, cls, t_start, 502, True, None, queued)
            return _text(502)
        st_raw = resp.headers.get(SERVICE_TIME_HEADER)
        service_time_s: float | None = None
        if st_raw is not None:
            try:
                service_time_s = float(st_raw)
            except ValueError:
                service_time_s = None
        out_headers = response_headers(resp.headers)
        out: web.StreamResponse | None = None
        upstream_failed = status >= 500
        reading = True  # which side failed if an exception escapes: upstream read or downstream write
        try:
            if method == hdrs.METH_HEAD or status in _BODYLESS_STATUS:
                out = web.StreamResponse(status=status, reason=resp.reason, headers=out_headers)
                reading = False
                await out.prepare(request)
                await out.write_eof()
            else:
                length = resp.content_length
                content = resp.content
                if length is not None and length <= SMALL_BODY_BYTES and content.is_eof():
                    # The whole (small) body arrived with the head: head and body in one write. A
                    # small body still arriving streams like any other (long-polling, progress).
                    body = content.read_nowait()
                    out = web.StreamResponse(status=status, reason=resp.reason, headers=out_headers)
                    reading = False
                    await out.prepare(request)
                    await out.write_eof(body)  # head and body leave in one write
                else:
                    out = web.StreamResponse(status=status, reason=resp.reason, headers=out_headers)
                    reading = False
                    await out.prepare(request)
                    while True:
                        reading = True
                        chunk = await content.readany()
                        if not chunk:
                            break
                        reading = False
                        await out.write(chunk)
                    await out.write_eof()
        except Exception as exc:
            resp.close()  # never reuse a connection with a half-read body
            if reading:
                kind, code, _ = _classify(exc)
                self._error(idx, kind)
                self._complete(idx, did, cls, t_start, code, True, service_time_s, queued)
                if out is None or not out.prepared:
                    return _text(code)
                # Mid-body: the status line is gone; closing the connection is the only honest signal.
            else:
                # The client went away: not the backend's fault (nginx logs these as 499).
                self._error(idx, "client_abort")
                self._complete(idx, did, cls, t_start, 499, upstream_failed, service_time_s, queued)
            if request.transport is not None:
                request.transport.close()
            return out if out is not None else web.Response(status=499)
        resp.release()
        self._complete(idx, did, cls, t_start, status, upstream_failed, service_time_s, queued)
        return out
