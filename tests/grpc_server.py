"""A real gRPC server for tests (grpcio, generic handler, raw bytes) on 127.0.0.1:0.

Methods of service ``t.Svc`` (what filters call):
- ``Echo`` (unary): initial metadata x-init: i, trailing x-trail: t, answers b"echo:" + request
  (+ b"|" + the x-req metadata value when sent);
- ``Deny`` (unary): PERMISSION_DENIED "nope";
- ``Check`` (unary): OK b"allow" when the request is b"alice", else PERMISSION_DENIED "who?";
- ``Slow`` (unary): never answers (until the caller's deadline or cancel);
- ``Chat`` (bidi): initial metadata x-init: i, b"re:" + each message, then trailing x-trail: t
  and OK once the client half-closes;
- ``Hold`` (bidi): initial metadata, then waits; records its cancellation in ``cancelled``.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc
from grpc import aio


class Handlers(grpc.GenericRpcHandler):
    def __init__(self):
        self.seen: list[tuple[str, bytes, dict[str, str]]] = []   # (method, request, metadata)
        self.cancelled = asyncio.Event()

    def _record(self, method: str, request: bytes, ctx) -> dict[str, str]:
        md = {k: v for k, v in ctx.invocation_metadata()}
        self.seen.append((method, request, md))
        return md

    def service(self, details):
        method = details.method.rsplit("/", 1)[-1]
        unary = {"Echo": self._echo, "Deny": self._deny, "Check": self._check, "Slow": self._slow}
        if details.method.startswith("/t.Svc/") and method in unary:
            return grpc.unary_unary_rpc_method_handler(unary[method])
        if details.method == "/t.Svc/Chat":
            return grpc.stream_stream_rpc_method_handler(self._chat)
        if details.method == "/t.Svc/Hold":
            return grpc.stream_stream_rpc_method_handler(self._hold)
        return None

    async def _echo(self, request: bytes, ctx) -> bytes:
        md = self._record("Echo", request, ctx)
        await ctx.send_initial_metadata((("x-init", "i"),))
        ctx.set_trailing_metadata((("x-trail", "t"),))
        return b"echo:" + request + (b"|" + md["x-req"].encode() if "x-req" in md else b"")

    async def _deny(self, request: bytes, ctx) -> bytes:
        self._record("Deny", request, ctx)
        await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")

    async def _check(self, request: bytes, ctx) -> bytes:
        self._record("Check", request, ctx)
        if request != b"alice":
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "who?")
        return b"allow"

    async def _slow(self, request: bytes, ctx) -> bytes:
        self._record("Slow", request, ctx)
        await asyncio.Event().wait()           # ends when gRPC cancels it (deadline, cancel)
        return b""

    async def _chat(self, requests, ctx):
        self._record("Chat", b"", ctx)
        await ctx.send_initial_metadata((("x-init", "i"),))
        async for m in requests:
            yield b"re:" + m
        ctx.set_trailing_metadata((("x-trail", "t"),))

    async def _hold(self, requests, ctx):
        self._record("Hold", b"", ctx)
        try:
            await ctx.send_initial_metadata((("x-init", "i"),))
            async for _m in requests:
                pass
            await asyncio.Event().wait()
        except asyncio.CancelledError:       # grpc.aio cancels the handler when the call is reset
            self.cancelled.set()
            raise
        yield b""


@asynccontextmanager
async def grpc_server(**tls) -> AsyncIterator[tuple[int, Handlers]]:
    """(port, handlers); TLS with ``key=..., cert=...`` (PEM bytes)."""
    handlers = Handlers()
    server = aio.server()
    server.add_generic_rpc_handlers((handlers,))
    if tls:
        creds = grpc.ssl_server_credentials(((tls["key"], tls["cert"]),))
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, handlers
    finally:
        await server.stop(None)
