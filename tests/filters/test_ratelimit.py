"""ratelimit filter end to end: exact admission under concurrency, per-key / per-header /
per-client / global buckets, several limits per route (auth → ratelimit by identity),
refill, and the RateLimit-* / Retry-After headers."""
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
    {"name": "rl_header", "wasm": "ratelimit", "config": {
        "limits": [{"name": "per-user", "key": "header:x-user", "rate": 1, "period_s": SLOW, "burst": 2}]}},
    {"name": "rl_shared", "wasm": "ratelimit", "config": {
        "limits": [{"name": "per-user", "key": "header:x-user", "rate": 1, "period_s": SLOW, "burst": 2,
                    "on_missing": "shared"}]}},
    {"name": "rl_client", "wasm": "ratelimit", "config": {
        "limits": [{"name": "ip", "key": "client", "rate": 1, "period_s": SLOW, "burst": 3}]}},
    {"name": "rl_refill", "wasm": "ratelimit", "config": {
        "limits": [{"name": "fast", "key": "global", "rate": 10, "burst": 1}]}},
    {"name": "rl_quiet", "wasm": "ratelimit", "config": {
        "headers": False, "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1}]}},
    {"name": "rl_ns_a", "wasm": "ratelimit", "config": {
        "namespace": "shared-ns", "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 2}]}},
    {"name": "rl_ns_b", "wasm": "ratelimit", "config": {
        "namespace": "shared-ns", "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 2}]}},
    {"name": "auth", "wasm": "auth", "config": {
        "api_key": {"keys": [{"key": "ka", "identity": "alice"}, {"key": "kb", "identity": "bob"}]}}},
    {"name": "rl_identity", "wasm": "ratelimit", "config": {
        "limits": [{"name": "per-key", "key": "identity", "rate": 1, "period_s": SLOW, "burst": 2},
                   {"name": "global", "key": "global", "rate": 1, "period_s": SLOW, "burst": 3}]}},
]


def route(name, filters):
    return {"name": name, "match": {"prefix": f"/{name}/"}, "cluster": "backend", "filters": filters}


ROUTES = [route(f["name"], [f["name"]]) for f in FILTERS if f["name"] not in ("auth", "rl_identity")]
ROUTES.append(route("rl_identity", ["auth", "rl_identity"]))


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


async def test_header_keyed_buckets_are_independent(gw):
    a = [await get(gw, "/rl_header/x", {"x-user": "a"}) for _ in range(3)]
    assert [s for s, _, _ in a] == [200, 200, 429]
    assert [rl_headers(h)[1] for _, h, _ in a] == [1, 0, 0]
    s, h, _ = await get(gw, "/rl_header/x", {"x-user": "b"})
    assert s == 200 and rl_headers(h)[1] == 1


async def test_long_key_values_get_their_own_buckets(gw):
    long_a, long_b = "a" * 3000, "a" * 2999 + "b"     # hashed keys: still one bucket each
    a = [(await get(gw, "/rl_header/x", {"x-user": long_a}))[0] for _ in range(3)]
    b = [(await get(gw, "/rl_header/x", {"x-user": long_b}))[0] for _ in range(3)]
    assert a == [200, 200, 429] and b == [200, 200, 429]


async def test_missing_key_skips_the_limit(gw):
    for _ in range(4):
        s, h, _ = await get(gw, "/rl_header/x")
        assert s == 200
        assert "ratelimit-limit" not in h   # no limit applied, nothing to report


async def test_missing_key_shared_bucket(gw):
    statuses = [(await get(gw, "/rl_shared/x"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    s, _, _ = await get(gw, "/rl_shared/x", {"x-user": "c"})
    assert s == 200


async def test_client_address_bucket(gw):
    results = await asyncio.gather(*[get(gw, "/rl_client/x") for _ in range(6)])
    assert sorted(s for s, _, _ in results) == [200, 200, 200, 429, 429, 429]


async def test_refill(gw):
    s1, _, _ = await get(gw, "/rl_refill/x")
    s2, h2, _ = await get(gw, "/rl_refill/x")
    assert (s1, s2) == (200, 429)
    assert int(h2["retry-after"]) == 1
    await asyncio.sleep(0.25)   # 10 tokens/s: at least one is back
    s3, h3, _ = await get(gw, "/rl_refill/x")
    assert s3 == 200
    assert rl_headers(h3)[0] == 1


async def test_headers_can_be_turned_off(gw):
    s, h, _ = await get(gw, "/rl_quiet/x")
    assert s == 200 and "ratelimit-limit" not in h
    s, h, _ = await get(gw, "/rl_quiet/x")
    assert s == 429 and "ratelimit-remaining" not in h
    assert int(h["retry-after"]) == SLOW


async def test_namespace_shares_buckets_across_filters(gw):
    statuses = [(await get(gw, p))[0] for p in ["/rl_ns_a/x", "/rl_ns_b/x", "/rl_ns_a/x", "/rl_ns_b/x"]]
    assert statuses == [200, 200, 429, 429]


async def test_several_limits_per_key_and_global(gw):
    _, up, _ = gw
    before = len(up.requests)
    alice = [await get(gw, "/rl_identity/x", {"x-api-key": "ka"}) for _ in range(3)]
    assert [s for s, _, _ in alice] == [200, 200, 429]
    assert json.loads(alice[2][2])["limit"] == "per-key"
    # alice's rejected request did not spend a global token: bob still gets the third one
    s, h, _ = await get(gw, "/rl_identity/x", {"x-api-key": "kb"})
    assert s == 200
    assert rl_headers(h) == (3, 0, 3 * SLOW)   # the most constrained bucket (global) is reported
    s, h, body = await get(gw, "/rl_identity/x", {"x-api-key": "kb"})
    assert s == 429 and json.loads(body)["limit"] == "global"
    assert len(up.requests) - before == 3
    # unauthenticated requests never reach the rate limiter (auth answers first)
    s, _, _ = await get(gw, "/rl_identity/x")
    assert s == 401
