"""The ANCHORS.md baseline: a minimal aiohttp streaming reverse proxy (one ClientSession, keep-alive,
access log off, round robin), to compare lbproxy against side by side.

    python benchmarks/minimal_proxy.py PORT BACKEND_URL [BACKEND_URL...]
"""

from __future__ import annotations

import itertools
import sys

import uvloop
from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def main() -> None:
    port, backends = int(sys.argv[1]), sys.argv[2:]
    rr = itertools.cycle(backends)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["s"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["s"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.body_exists else None
        async with request.app["s"].request(
            request.method, next(rr) + request.raw_path, headers=headers, data=data, allow_redirects=False
        ) as up:
            out = web.StreamResponse(
                status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP}
            )
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
