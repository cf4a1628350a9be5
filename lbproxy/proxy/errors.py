"""How a failed exchange is named and answered: the failure kinds, the exception behind each, and the
plain-text responses the proxy sends in place of a backend's."""

from __future__ import annotations

import aiohttp
from aiohttp import web

Failure = tuple[str, int, bool]
"""(label for lbproxy_upstream_errors, status sent when nothing was relayed yet, retryable)"""

CONNECT: Failure = ("connect", 502, True)
CONNECT_TIMEOUT: Failure = ("connect_timeout", 504, True)
UNSENT = frozenset({CONNECT[0], CONNECT_TIMEOUT[0]})
"""Failures before any byte of the request left: their retry puts no extra load on any backend (the
first try reached none), so it takes no retry-budget slot, which bounds amplification. Without this,
right after a backend dies the budget's slots go to the retries of the requests it held, and new
requests refused at connect were answered 502 though another backend was up."""
DISCONNECT: Failure = ("disconnect", 502, True)
TIMEOUT: Failure = ("timeout", 504, False)
BAD_RESPONSE: Failure = ("bad_response", 502, False)
PER_TRY_TIMEOUT: Failure = ("per_try_timeout", 504, True)  # abandoned by the sweep (lbproxy/proxy/retry_sweep.py)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return CONNECT
    if isinstance(exc, TimeoutError):  # total timeout, or sock_read (ServerTimeoutError is one too)
        return TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return DISCONNECT  # typically a keep-alive connection the backend closed while idle
    return BAD_RESPONSE


STATUS_TEXT = {
    400: "bad request: the target must be a path, or an absolute URL naming this proxy (not an open proxy)\n",
    405: "CONNECT is not supported: lbproxy is a reverse proxy\n",
    505: "HTTP version not supported: lbproxy speaks HTTP/1.0 and HTTP/1.1\n",
    502: "bad gateway: the backend could not be reached or sent an invalid response\n",
    503: "service unavailable: no backend is available\n",
    504: "gateway timeout: the backend did not answer in time\n",
}


def text_response(status: int, text: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text or STATUS_TEXT[status], headers=headers)
