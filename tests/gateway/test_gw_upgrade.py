"""WebSocket (and other HTTP/1.1 upgrades) through the gateway: the handshake runs the route's
request filters (auth, ratelimit) and response filters, a 101 splices client and upstream byte
for byte (gateway/tunnel.py), and either side closing, or the idle timeout, ends both."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import echo_upstream, raw_exchange, raw_upstream, read_request_head, run_gateway, until

DIST = Path(__file__).resolve().parents[2] / "filters" / "dist"
KEY = "key-ws-alice"
KEY_RL = "key-ws-ratelimited"     # its own identity: shared-data buckets outlive one gateway in a process


def config(up_port: int, limits: str = "") -> str:
    return f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
admin: {{address: 127.0.0.1, port: 0}}
access_log: {{path: null}}
limits: {{drain_timeout_s: 1{limits}}}
clusters: [{{name: backend, endpoints: ["127.0.0.1:{up_port}"]}}]
routes:
  - {{name: closed, cluster: backend, match: {{prefix: /closed}}, upgrades: false}}
  - {{name: ws, cluster: backend, match: {{prefix: /ws}}, filters: [auth, ratelimit, headers]}}
  - {{name: plain, cluster: backend}}
filters:
  - name: auth
    wasm: {DIST / "auth.wasm"}
    config: {{identity_header: x-auth-identity, strip_credentials: true, api_key: {{header: x-api-key, keys: [{{key: {KEY}, identity: ws-alice}}, {{key: {KEY_RL}, identity: rl-ws-test}}]}}}}
  - name: ratelimit
    wasm: {DIST / "ratelimit.wasm"}
    config: {{limits: [{{name: ws-per-key, key: identity, rate: 1, period_s: 3600, burst: 3}}]}}
  - name: headers
    wasm: {DIST / "headers.wasm"}
    config: {{response: {{set: {{x-served-by: wasmgate}}}}}}
"""


class WsUpstream:
    """An aiohttp WebSocket echo server: text echoed with a prefix, binary reversed."""

    def __init__(self):
        self.handshakes: list[dict] = []
        self.closed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
        finally:
            self.closed.set()
        return ws


async def metric(gw, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.admin_url}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_websocket_echo_through_the_chain(tmp_path):
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(gw.url("/ws/chat"), headers={"x-api-key": KEY}) as ws:
                    # The 101 went through the response filters.
                    assert ws._response.headers["x-served-by"] == "wasmgate"
                    await ws.send_str("hello")
                    assert (await ws.receive()).data == "echo:hello"
                    big = bytes(range(256)) * 4096          # 1 MiB frame, both ways
                    await ws.send_bytes(big)
                    assert (await ws.receive()).data == big[::-1]
                    for i in range(20):
                        await ws.send_str(f"m{i}")
                    assert [(await ws.receive()).data for _ in range(20)] == [f"echo:m{i}" for i in range(20)]
                    assert await metric(gw, "wasmgate_upgraded_connections_active") == 1
                await asyncio.wait_for(wsu.closed.wait(), 10)
            assert await metric(gw, "wasmgate_upgraded_connections_total") == 1
            # The splice is over once both sides are closed.
            await until(lambda: gw.gateway.metrics.active_upgraded == 0)
    hs = wsu.handshakes[0]
    assert hs["x-auth-identity"] == "ws-alice" and "x-api-key" not in {k.lower() for k in hs}
    assert hs["Upgrade"].lower() == "websocket" and "upgrade" in hs["Connection"].lower()


async def test_auth_and_ratelimit_apply_to_the_handshake(tmp_path):
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(gw.url("/ws/chat"))
                assert e.value.status == 401
                statuses = []
                for _ in range(4):        # burst 3, then the limit
                    try:
                        ws = await s.ws_connect(gw.url("/ws/chat"), headers={"x-api-key": KEY_RL})
                        statuses.append(101)
                        await ws.close()
                    except aiohttp.WSServerHandshakeError as err:
                        statuses.append(err.status)
    assert statuses == [101, 101, 101, 429]
    assert len(wsu.handshakes) == 3


async def test_client_that_vanishes_closes_the_upstream_side(tmp_path):
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(gw.url("/plain/ws"))
                await ws.send_str("x")
                assert (await ws.receive()).data == "echo:x"
                ws._response.connection.transport.abort()      # no close frame, just gone
                await asyncio.wait_for(wsu.closed.wait(), 10)
            await until(lambda: gw.gateway.metrics.active_upgraded == 0)


async def test_upstream_closing_closes_the_client(tmp_path):
    async def closer(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("bye")
        await ws.close()
        return ws

    async with echo_upstream(closer) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(gw.url("/plain")) as ws:
                    assert (await ws.receive()).data == "bye"
                    assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_route_without_upgrades_answers_403_and_closes(tmp_path):
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET /closed/ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", timeout=5)
            assert raw.startswith(b"HTTP/1.1 403") and b"connection: close" in raw.lower()
            assert gw.gateway.metrics.counts().errors["upgrade_refused"] == 1
    assert wsu.handshakes == []


async def test_idle_tunnel_is_closed(tmp_path):
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        async with run_gateway(config(up.port, ", upgrade_idle_timeout_s: 0.3"), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(gw.url("/plain"), autoping=False, heartbeat=None) as ws:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            await asyncio.wait_for(wsu.closed.wait(), 10)
            assert gw.gateway.metrics.counts().errors["upgrade_idle_timeout"] == 1


async def test_upstream_refusing_the_upgrade_is_an_ordinary_answer(tmp_path):
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=426, text="no websockets here")

    async with echo_upstream(refuse) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
                                     b"Upgrade: websocket\r\n\r\n", timeout=5)
            assert raw.startswith(b"HTTP/1.1 426") and raw.endswith(b"no websockets here")
            assert gw.gateway.metrics.active_upgraded == 0


async def test_h2c_upgrade_is_never_forwarded(tmp_path):
    """h2c smuggling: a backend that took `Upgrade: h2c` would serve HTTP/2 requests the
    gateway never routed or filtered. The request is served as plain HTTP/1.1."""
    heads = []

    async def handler(reader, writer):
        heads.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
                                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", timeout=2)
    assert raw.startswith(b"HTTP/1.1 200")
    head = heads[0].lower()
    assert b"upgrade" not in head and b"http2-settings" not in head


async def test_upgrade_with_a_body_is_refused(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
                                     b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc", timeout=5)
    assert raw.startswith(b"HTTP/1.1 400") and up.requests == []


async def test_websocket_over_a_tls_listener(tmp_path, pki):
    """wss://: the handshake on a TLS listener (ALPN http/1.1), then the splice over TLS records."""
    wsu = WsUpstream()
    async with echo_upstream(wsu.handle) as up:
        text = config(up.port).replace(
            "listeners: [{name: main, address: 127.0.0.1, port: 0}]",
            f"listeners: [{{name: main, address: 127.0.0.1, port: 0, "
            f"tls: {{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}}}]")
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"wss://127.0.0.1:{gw.port()}/ws/chat", headers={"x-api-key": KEY},
                                        ssl=pki.client()) as ws:
                    await ws.send_str("secure")
                    assert (await ws.receive()).data == "echo:secure"
                await asyncio.wait_for(wsu.closed.wait(), 10)
    assert wsu.handshakes[0]["X-Forwarded-Proto"] == "https"
