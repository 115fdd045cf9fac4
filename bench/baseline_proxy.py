"""The Python peer: a minimal aiohttp reverse proxy (aiohttp server + one ClientSession with a
keep-alive connector), on uvloop like the gateway. Forwards method, path+query, end-to-end
headers and body; returns status, end-to-end headers and body. Nothing else.

    python -m bench.baseline_proxy --port 8081 --upstream 127.0.0.1:9000
"""
from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})


def make_app(upstream: str) -> web.Application:
    base = f"http://{upstream}"

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=256, keepalive_timeout=60),
            timeout=ClientTimeout(total=15), auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP_BY_HOP)
        body = await request.read() if request.body_exists else None
        async with request.app["session"].request(
                request.method, base + request.path_qs, headers=headers, data=body,
                allow_redirects=False) as r:
            payload = await r.read()
            out = CIMultiDict((k, v) for k, v in r.headers.items()
                              if k.lower() not in HOP_BY_HOP)
            return web.Response(status=r.status, headers=out, body=payload)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="host:port")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.port, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
