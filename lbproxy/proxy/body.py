"""Request bodies on their way upstream: a size limit and an idle timeout, enforced while streaming.

The body is never buffered (uploads of any size stream through in constant memory), so both rules
are checked per chunk: nginx's `client_max_body_size` (413) and `client_body_timeout` (408, the
time allowed between two reads). A declared Content-Length over the limit is refused before any
backend is chosen; a chunked body is cut when it crosses the limit, and the upstream request is
aborted with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader


class ClientBodyError(Exception):
    """The client, not the backend, broke the exchange: answer `status`, do not blame the backend."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class GuardedBody:
    """An async iterable over `content` that enforces the limit and the idle timeout.

    aiohttp's client consumes it in its body-writing task and wraps whatever it raises, so the
    failure is also kept in `error` for the forwarder to find.
    """

    __slots__ = ("_content", "_limit", "_timeout_s", "error", "sent")

    def __init__(self, content: StreamReader, limit_bytes: int, timeout_s: float) -> None:
        self._content = content
        self._limit = limit_bytes
        self._timeout_s = timeout_s
        self.error: ClientBodyError | None = None
        self.sent = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        content = self._content
        while True:
            try:
                async with asyncio.timeout(self._timeout_s if self._timeout_s > 0 else None):
                    chunk = await content.readany()
            except TimeoutError:
                self.error = ClientBodyError(408, f"request timeout: no request body bytes for {self._timeout_s:g} s\n")
                raise self.error from None
            if not chunk:
                return
            self.sent += len(chunk)
            if self._limit and self.sent > self._limit:
                self.error = too_large(self._limit)
                raise self.error
            yield chunk


def too_large(limit_bytes: int) -> ClientBodyError:
    return ClientBodyError(
        413, f"payload too large: request bodies may be at most {limit_bytes} bytes (--max-body-bytes)\n"
    )
