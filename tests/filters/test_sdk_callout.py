"""The SDK's HTTP callout path end to end: filters/examples/callout (dispatch_http_call →
pause → on_http_call_response → resume_http_request or send_http_response), built from source
here and run through the gateway against a real authorization service."""
from __future__ import annotations

import os

import aiohttp
import pytest
from aiohttp import web

from tests.filters.conftest import CARGO, RUSTC, callout_wasm, gateway_yaml, header_values  # noqa: F401
from tests.helpers import echo_upstream, run_gateway

pytestmark = pytest.mark.skipif(not (os.access(CARGO, os.X_OK) and os.access(RUSTC, os.X_OK)),
                                reason="Debian's cargo/rustc not installed (./dev test installs them)")


async def authz(request: web.Request) -> web.Response:
    if request.path != "/check":
        return web.Response(status=404)
    if request.headers.get("authorization") == "Bearer good":
        return web.Response(text="user=alice")
    return web.Response(status=401, text="no")


async def test_callout_allows_denies_and_fails_closed(tmp_path, callout_wasm):
    async with echo_upstream() as up, echo_upstream(authz) as az:
        filters = [
            {"name": "callout", "wasm": str(callout_wasm), "config": {"cluster": "authz", "path": "/check"}},
            {"name": "callout_down", "wasm": str(callout_wasm), "config": {"cluster": "dead", "timeout_ms": 500}},
        ]
        routes = [
            {"name": "down", "match": {"prefix": "/down"}, "cluster": "backend", "filters": ["callout_down"]},
            {"name": "all", "cluster": "backend", "filters": ["callout"]},
        ]
        clusters = [{"name": "authz", "endpoints": [f"127.0.0.1:{az.port}"]},
                    {"name": "dead", "endpoints": ["127.0.0.1:9"], "connect_timeout_ms": 200}]
        async with run_gateway(gateway_yaml(up.port, filters, routes, clusters), tmp_path) as gw, \
                aiohttp.ClientSession() as s:
            async with s.get(gw.url("/x"), headers={"authorization": "Bearer good"}) as r:
                assert r.status == 200
            assert header_values(up.requests[-1].headers, "x-authz") == ["user=alice"]
            n = len(up.requests)
            async with s.get(gw.url("/x"), headers={"authorization": "Bearer bad"}) as r:
                assert r.status == 403
                assert await r.text() == "denied by authz (401)\n"
            async with s.get(gw.url("/down/x")) as r:
                assert r.status == 503
                assert await r.text() == "authorization service unavailable\n"
            assert len(up.requests) == n            # neither reached the upstream
