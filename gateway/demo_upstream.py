"""A small echo service for the demo and the benchmark.

Answers every request with JSON: the method, path, headers it received and the body length.
`python -m gateway.demo_upstream --port 9000`
"""
from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


async def echo(request: web.Request) -> web.StreamResponse:
    length = 0
    try:
        async for chunk in request.content.iter_any():
            length += len(chunk)
    except ConnectionResetError:
        # The gateway aborts an upstream request a filter rejected mid-body: nothing to answer.
        return web.Response(status=499)
    payload = {"method": request.method, "path": request.path_qs,
               "headers": {k: v for k, v in request.headers.items()}, "body_length": length}
    return web.Response(text=json.dumps(payload, indent=2) + "\n", content_type="application/json")


async def start_upstream(host: str, port: int) -> web.BaseRunner:
    """Serve the echo handler on host:port (aiohttp's low-level server: no routing overhead)."""
    runner = web.ServerRunner(web.Server(echo, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


async def _main(host: str, port: int) -> int:
    runner = await start_upstream(host, port)
    print(f"demo upstream: echoing on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="echo upstream for the wasmgate demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    from .cli import run_loop
    try:
        run_loop(_main(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
