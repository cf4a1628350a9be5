"""A lean HTTP/1.1 upstream client for requests without a body (the common case: GET/HEAD/DELETE).

aiohttp's ClientSession spends most of a proxied request's CPU on machinery a proxy does not need
(ClientRequest/ClientResponse objects, cookie and redirect handling, trace hooks, per-request header
merging). This client keeps what matters and reuses aiohttp's own parts for it: the protocol
`aiohttp.client_proto.ResponseHandler` (C response parser, StreamReader with flow control,
sock_read timeout) on plain keep-alive connections kept in a LIFO pool per backend. Requests with
a body still go through the ClientSession (streamed uploads, chunked encoding, Expect handling).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from aiohttp import SocketTimeoutError, hdrs
from aiohttp.client_exceptions import ClientConnectorError, ConnectionTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

MAX_IDLE_PER_BACKEND = 512
"""Idle keep-alive connections kept per backend; more are closed when released."""


class UpstreamResponse:
    """The subset of `aiohttp.ClientResponse` the relay uses, over a pooled connection."""

    __slots__ = ("_client", "_deadline", "_key", "_proto", "content", "content_length", "headers", "reason", "status")

    def __init__(
        self,
        client: UpstreamClient,
        key: int,
        proto: ResponseHandler,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        content_length: int | None,
        deadline: asyncio.TimerHandle | None,
    ) -> None:
        self._client = client
        self._key = key
        self._proto = proto
        self._deadline = deadline
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self.content_length = content_length

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Body fully read: the connection goes back to the pool if it can carry another request."""
        if self._deadline is not None:
            self._deadline.cancel()
        proto = self._proto
        if proto.should_close or not proto.is_connected() or not self.content.is_eof():
            proto.close()
            return
        self._client._put(self._key, proto)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._proto.close()


def _timeout(proto: ResponseHandler, what: str, payload: StreamReader | None = None) -> None:
    """Fail the pending head read, or this response's body stream, with a timeout: the relay answers
    504 if nothing was sent yet, else closes the client connection."""
    exc = SocketTimeoutError(f"upstream {what} timeout")
    proto.set_exception(exc)
    if payload is not None:
        payload.set_exception(exc)
    proto.close()


class UpstreamClient:
    """Keep-alive connection pools, one per backend slot, for body-less requests."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, total_timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s
        self._idle: dict[int, list[tuple[ResponseHandler, float]]] = {}
        """Per backend, idle connections with the loop time they went idle; LIFO (the most recently
        used is the least likely to have been closed by the backend meanwhile)."""
        self._addr: dict[int, tuple[str, int, str]] = {}

    def set_backend(self, key: int, host: str, port: int) -> None:
        default_host = host if port == 80 else f"{host}:{port}"
        self._addr[key] = (host, port, default_host)

    def _put(self, key: int, proto: ResponseHandler) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            proto.close()
        else:
            idle.append((proto, self.loop.time()))

    def expire_idle(self, max_idle_s: float) -> int:
        """Close connections idle longer than `max_idle_s` (the oldest sit at the front). Returns the count."""
        cutoff = self.loop.time() - max_idle_s
        closed = 0
        for idle in self._idle.values():
            k = 0
            while k < len(idle) and idle[k][1] < cutoff:
                idle[k][0].close()
                k += 1
            if k:
                del idle[:k]
                closed += k
        return closed

    async def _connect(self, key: int, fresh: bool) -> ResponseHandler:
        idle = self._idle.get(key)
        while idle and not fresh:
            proto = idle.pop()[0]
            if proto.is_connected():
                return proto
            proto.close()
        host, port, _ = self._addr[key]
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await self.loop.create_connection(lambda: ResponseHandler(self.loop), host, port)
        except TimeoutError as exc:
            raise ConnectionTimeoutError(f"connection timeout to {host}:{port}") from exc
        except OSError as exc:
            raise ClientConnectorError(ConnectionKey(host, port, False, True, None, None, None), exc) from exc
        sock = proto.transport.get_extra_info("socket") if proto.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return proto

    def default_host(self, key: int) -> str:
        return self._addr[key][2]

    async def request(self, key: int, head_only: bool, head: bytes, fresh: bool = False) -> UpstreamResponse:
        """Send a serialized body-less request head; return once the response head arrived.

        Timers: one timer covers the wait for the response head (min of read and total timeout). A
        body still arriving after the head gets the sock_read timer (re-armed on every read by
        ResponseHandler) and a total deadline; a body that came with the head (the common small
        response) needs neither, which saves two timer re-arms per request.
        """
        proto = await self._connect(key, fresh)
        proto.set_response_params(skip_payload=head_only, read_until_eof=True, auto_decompress=False)
        loop = self.loop
        t0 = loop.time()
        head_timer = loop.call_later(min(self.read_timeout_s, self.total_timeout_s), _timeout, proto, "head")
        try:
            assert proto.transport is not None
            proto.transport.write(head)
            message, payload = await proto.read()
            while 100 <= message.code < 200 and message.code != 101:
                # Interim responses (100 Continue, 103 Early Hints) precede the final one; a body-less
                # request has nothing to continue, so they are dropped (aiohttp's client does the same).
                message, payload = await proto.read()
        except BaseException:
            proto.close()
            raise
        finally:
            head_timer.cancel()
        length: int | None = None
        if not message.chunked:
            cl = message.headers.get(hdrs.CONTENT_LENGTH)
            if cl is not None and cl.isdigit():
                length = int(cl)
        deadline: asyncio.TimerHandle | None = None
        if not payload.is_eof():
            proto.read_timeout = self.read_timeout_s
            proto.start_timeout()
            deadline = loop.call_at(t0 + self.total_timeout_s, _timeout, proto, "total", payload)
        return UpstreamResponse(
            self, key, proto, message.code, message.reason, message.headers, payload, length, deadline
        )

    def close_idle(self, key: int | None = None) -> None:
        keys = list(self._idle) if key is None else [key]
        for k in keys:
            for proto, _ in self._idle.pop(k, []):
                proto.close()

    def stats(self) -> dict[int, Any]:
        return {k: len(v) for k, v in self._idle.items()}
