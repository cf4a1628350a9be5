"""The client-facing HTTP/1.1 server: aiohttp's low-level server with a front door's limits.

aiohttp's C parser (llhttp) already rejects the classic request-smuggling shapes (Content-Length
together with Transfer-Encoding, duplicate or malformed Content-Length, bad chunk sizes, obs-fold,
bare LF, unknown transfer codings). What a reverse proxy adds on top, and what this module does:

- the status a client can act on: 414 for an over-long request line and 431 for over-large header
  fields (aiohttp answers 400 for both), as nginx and Envoy do;
- one debug line per rejected request instead of aiohttp's ERROR log with a traceback (hostile input
  must not be able to fill the logs), and a count in `lbproxy_requests_total{backend="none"}`;
- a request-head timeout (nginx `client_header_timeout`): a client that opens a connection, or
  starts a request, and does not finish its head in time gets 408 and is closed, so slowloris
  connections hold a socket for seconds, not for the 75 s keep-alive timeout.

The request-body rules (size limit, idle timeout) are per request and live in `body.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

MAX_REQUEST_LINE_BYTES = 8190
"""Longest request line accepted (aiohttp's default; nginx's `large_client_header_buffers` 8k). 414 past it."""

MAX_HEADER_FIELD_BYTES = 16380
"""Longest single header field (name + value) accepted; 431 past it. Larger than the request line
(Envoy allows 60 KiB of headers in all) and deliberately different from it: aiohttp reports both as
LineTooLong, and the limit it names tells which one was exceeded."""

MAX_HEADERS = 100
"""Most header fields in one request (Envoy's `max_headers_count` default); 431 past it."""

log = logging.getLogger("lbproxy")

_REJECT_TEXT = {
    408: "request timeout: the request head was not received in time\n",
    414: f"URI too long: the request line may be at most {MAX_REQUEST_LINE_BYTES} bytes\n",
    431: (
        f"request header fields too large: at most {MAX_HEADERS} fields of at most "
        f"{MAX_HEADER_FIELD_BYTES} bytes each\n"
    ),
}

assert MAX_HEADER_FIELD_BYTES != MAX_REQUEST_LINE_BYTES  # see MAX_HEADER_FIELD_BYTES


def rejection_status(exc: BaseException | None) -> int:
    """The status for a request aiohttp's parser refused (it says 400 for every one)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        return 431 if str(limit) == str(MAX_HEADER_FIELD_BYTES) else 414
    if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        return 431
    return 400


def _reason(exc: BaseException | None) -> str:
    """A short, printable reason (the parser's message can quote the client's bytes)."""
    lines = str(getattr(exc, "message", "") or "").strip().splitlines()
    text = lines[0] if lines else "malformed request"
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:100])


class GuardedRequestHandler(RequestHandler):
    """One client connection: aiohttp's handler plus the head timeout and rejection policy."""

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout_s: float,
        on_reject: Callable[[int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_reject = on_reject
        self._head_timer: asyncio.TimerHandle | None = None

    # --- the request-head timeout --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._header_timeout_s > 0 and self._head_timer is None:
            self._head_timer = self._loop.call_later(self._header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and not self._messages:
            self._arm_head_timer()  # the first bytes of the next request's head (keep-alive)
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm_head_timer()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self._on_reject(408)
        log.debug("closed a client connection from %s: request head not received in time", self.peername)
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_REJECT_TEXT[408]), _REJECT_TEXT[408].encode())
        )
        self.force_close()
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    # --- requests the parser refused --------------------------------------------------------------
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)  # the proxy's own failure: logged
        status = rejection_status(exc)
        self._on_reject(status)
        text = _REJECT_TEXT.get(status) or f"bad request: {_reason(exc)}\n"
        log.debug("rejected a request from %s with %d: %s", request.remote, status, _reason(exc))
        resp = web.Response(status=status, text=text)
        resp.force_close()  # the framing can no longer be trusted: never parse another request here
        return resp


class GuardedServer(web.Server):
    """`aiohttp.web.Server` whose connections are `GuardedRequestHandler`s with our parser limits."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout_s: float,
        on_reject: Callable[[int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=MAX_HEADER_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            **kwargs,
        )
        self._header_timeout_s = header_timeout_s
        self._on_reject = on_reject

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            header_timeout_s=self._header_timeout_s,
            on_reject=self._on_reject,
            **self._kwargs,
        )
