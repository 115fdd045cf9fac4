"""ratelimit filter end to end over HTTP: exact admission under 25 concurrent requests (with the
RateLimit-* / Retry-After headers of each answer), client-address buckets, a namespace shared by
two filter entries. Per-header buckets, missing keys, refill, headers off and several limits
behind auth, through the same wasm without sockets: test_ratelimit_unit.py."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import pytest_asyncio

from tests.filters.conftest import filter_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

SLOW = 3600  # period_s for buckets that must not refill during a test

FILTERS = [
    {"name": "rl_global", "wasm": "ratelimit", "config": {
        "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 7}]}},
    {"name": "rl_client", "wasm": "ratelimit", "config": {
        "limits": [{"name": "ip", "key": "client", "rate": 1, "period_s": SLOW, "burst": 3}]}},
    {"name": "rl_ns_a", "wasm": "ratelimit", "config": {
        "namespace": "shared-ns", "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 2}]}},
    {"name": "rl_ns_b", "wasm": "ratelimit", "config": {
        "namespace": "shared-ns", "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 2}]}},
]


def route(name, filters):
    return {"name": name, "match": {"prefix": f"/{name}/"}, "cluster": "backend", "filters": filters}


ROUTES = [route(f["name"], [f["name"]]) for f in FILTERS]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(tmp_path_factory):
    async with filter_gateway(tmp_path_factory.mktemp("rl"), FILTERS, ROUTES) as (gw, up):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            yield gw, up, session


async def get(gw, path, headers=None):
    g, _, s = gw
    async with s.get(g.url(path), headers=headers or {}) as r:
        return r.status, r.headers, await r.read()


def rl_headers(h):
    return int(h["ratelimit-limit"]), int(h["ratelimit-remaining"]), int(h["ratelimit-reset"])


async def test_concurrent_admission_is_exact(gw):
    _, up, _ = gw
    before = len(up.requests)
    results = await asyncio.gather(*[get(gw, "/rl_global/x") for _ in range(25)])
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 7, statuses
    assert statuses.count(429) == 18, statuses
    assert len(up.requests) - before == 7       # only admitted requests reached the upstream
    remaining = sorted(rl_headers(h)[1] for s, h, _ in results if s == 200)
    assert remaining == [0, 1, 2, 3, 4, 5, 6]   # each admitted request took exactly one token
    for s, h, body in results:
        for name in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
            assert len(h.getall(name)) == 1, (s, name, h.getall(name))
        limit, rem, reset = rl_headers(h)
        assert limit == 7
        if s == 429:
            assert rem == 0
            assert int(h["retry-after"]) == SLOW           # one token per hour
            assert reset == 7 * SLOW                       # until the bucket is full again
            doc = json.loads(body)
            assert doc == {"error": "rate_limited", "limit": "g", "retry_after_s": SLOW}
            assert h["content-type"].startswith("application/json")


async def test_client_address_bucket(gw):
    results = await asyncio.gather(*[get(gw, "/rl_client/x") for _ in range(6)])
    assert sorted(s for s, _, _ in results) == [200, 200, 200, 429, 429, 429]


async def test_namespace_shares_buckets_across_filters(gw):
    statuses = [(await get(gw, p))[0] for p in ["/rl_ns_a/x", "/rl_ns_b/x", "/rl_ns_a/x", "/rl_ns_b/x"]]
    assert statuses == [200, 200, 429, 429]
