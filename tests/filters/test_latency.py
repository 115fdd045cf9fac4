"""A filter route must not add tens of milliseconds per request.

Symptom this guards against (seen 2026-11-25): every SDK-built filter exports
proxy_on_response_body, so the chain re-streams the response body and the gateway answers
chunked; the final "0\\r\\n\\r\\n" goes out as a separate small write, and without TCP_NODELAY
Nagle's algorithm holds it until the client's delayed ACK (~40 ms). Measured: 45 ms per
keep-alive GET through a do-nothing headers filter vs 0.3 ms without filters; 0.8 ms once
TCP_NODELAY is set on the listening socket (accepted sockets inherit it)."""
from __future__ import annotations

import statistics
import time

import aiohttp

from tests.filters.conftest import filter_gateway

FILTERS = [{"name": "hdr", "wasm": "headers", "config": {"response": {"set": {"x-a": "1"}}}}]
ROUTES = [{"name": "hdr", "cluster": "backend", "filters": ["hdr"]}]


async def test_keepalive_get_through_a_filter_is_fast(tmp_path):
    async with filter_gateway(tmp_path, FILTERS, ROUTES) as (gw, _):
        async with aiohttp.ClientSession() as s:
            samples = []
            for _ in range(25):
                t = time.perf_counter()
                async with s.get(gw.url("/x")) as r:
                    await r.read()
                    assert r.status == 200 and r.headers["x-a"] == "1"
                samples.append(time.perf_counter() - t)
    median_ms = statistics.median(samples[5:]) * 1000
    assert median_ms < 20, f"median {median_ms:.1f} ms per request through one filter (Nagle/delayed-ACK stall?)"
