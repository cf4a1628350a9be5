"""The response relay: a backend's answer streamed back to the client, and the exchange's outcome recorded.

Small bodies with a known length that arrived with the head leave in one write with it; anything else
streams chunk by chunk, so long-polling and progress output reach the client as they come.
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web

from lbproxy.proxy.accounting import Accounting
from lbproxy.proxy.errors import classify, text_response
from lbproxy.proxy.headers import response_headers

SMALL_BODY_BYTES = 64 * 1024
"""Responses with a Content-Length up to this are read whole and sent in one write: one syscall
instead of a read/write loop (ANCHORS.md: buffering is 5–15 % cheaper). Memory stays bounded."""

SERVICE_TIME_HEADER = "X-Service-Time"
"""Backend-reported service time in seconds (emulated backends send it); feeds `Outcome.service_time_s`."""

_BODYLESS_STATUS = frozenset({204, 304})


async def relay(
    acct: Accounting,
    request: web.BaseRequest,
    resp: Any,
    method: str,
    idx: int,
    did: int,
    cls: int,
    t_start: float,
    queued: int,
) -> web.StreamResponse:
    """Send `resp` (backend `idx`'s answer) to the client and record how the exchange ended."""
    status = resp.status
    if status == 101:
        return _switched_protocols(acct, resp, idx, did, cls, t_start, queued)
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
        small: bytes | None = None
        bodyless = method == hdrs.METH_HEAD or status in _BODYLESS_STATUS
        if not bodyless:
            length = resp.content_length
            content = resp.content
            if length is not None and length <= SMALL_BODY_BYTES and content.is_eof():
                # The whole (small) body arrived with the head: head and body in one write. A
                # small body still arriving streams like any other (long-polling, progress).
                small = content.read_nowait()
        out = web.StreamResponse(status=status, reason=resp.reason, headers=out_headers)
        reading = False
        await out.prepare(request)
        if bodyless:
            await out.write_eof()
        elif small is not None:
            await out.write_eof(small)  # head and body leave in one write
        else:
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
        return _relay_failed(
            acct, request, exc, out, reading, idx, did, cls, t_start, queued, upstream_failed, service_time_s
        )
    resp.release()
    acct.complete(idx, did, cls, t_start, status, upstream_failed, service_time_s, queued)
    return out


def _switched_protocols(
    acct: Accounting, resp: Any, idx: int, did: int, cls: int, t_start: float, queued: int
) -> web.Response:
    """The request's Upgrade was stripped (hop-by-hop) and lbproxy tunnels nothing: a backend switching
    protocols anyway sent a response this proxy cannot relay."""
    resp.close()
    acct.error(idx, "bad_response")
    acct.complete(idx, did, cls, t_start, 502, True, None, queued)
    return text_response(502)


def _relay_failed(
    acct: Accounting,
    request: web.BaseRequest,
    exc: Exception,
    out: web.StreamResponse | None,
    reading: bool,
    idx: int,
    did: int,
    cls: int,
    t_start: float,
    queued: int,
    upstream_failed: bool,
    service_time_s: float | None,
) -> web.StreamResponse:
    """The relay broke off: on the backend's side while `reading`, else on the client's."""
    if reading:
        kind, code, _ = classify(exc)
        acct.error(idx, kind)
        acct.complete(idx, did, cls, t_start, code, True, service_time_s, queued)
        if out is None or not out.prepared:
            return text_response(code)
        # Mid-body: the status line is gone; closing the connection is the only honest signal.
    else:
        # The client went away: not the backend's fault (nginx logs these as 499).
        acct.error(idx, "client_abort")
        acct.complete(idx, did, cls, t_start, 499, upstream_failed, service_time_s, queued)
    if request.transport is not None:
        request.transport.close()
    return out if out is not None else web.Response(status=499)
