"""ratelimit with `backend: redis`: two separate gateway processes share one real redis-server
and enforce one limit exactly; refill; RateLimit-* headers from both; Redis stopped (slow) and
killed under each `on_redis_error` mode, with every request answered within the cluster's
timeout, and recovery when Redis is back; password auth, and a wrong password as a clear
error."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import aiohttp
import pytest
import pytest_asyncio

from tests.filters.conftest import gateway_yaml
from tests.helpers import echo_upstream, run_cli_gateway, run_gateway
from tests.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

SLOW = 3600                      # period_s for buckets that must not refill during a test
FLAKY_TIMEOUT_MS = 300


def rl(name: str, cluster: str, limits: list[dict], **extra) -> dict:
    return {"name": name, "wasm": "ratelimit",
            "config": {"backend": "redis", "redis_cluster": cluster, "limits": limits, **extra}}


FILTERS = [
    rl("rl_burst", "rl", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 10}]),
    rl("rl_refill", "rl", [{"name": "g", "key": "global", "rate": 1, "period_s": 2, "burst": 2}]),
    rl("rl_user", "rl", [{"name": "per-user", "key": "header:x-user", "rate": 1, "period_s": SLOW, "burst": 3},
                         {"name": "all", "key": "global", "rate": 1, "period_s": SLOW, "burst": 100}]),
    rl("rl_allow", "flaky", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1000}]),
    rl("rl_deny", "flaky", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1000}],
       on_redis_error="deny"),
    rl("rl_local", "flaky", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 2}],
       on_redis_error="local"),
]
ROUTES = [{"name": f["name"], "match": {"prefix": f"/{f['name']}/"}, "cluster": "backend",
           "filters": [f["name"]]} for f in FILTERS]


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis-stable")) as r:
        yield r


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis-flaky")).start()
    yield r
    if r.proc is not None:
        r.proc.send_signal(signal.SIGCONT)
    r.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory, stable, flaky):
    """Two `wasmgate run` processes with one config: one Redis for both."""
    tmp = tmp_path_factory.mktemp("fleet")
    async with echo_upstream() as up:
        text = json.loads(gateway_yaml(up.port, FILTERS, ROUTES, extra_clusters=[
            {"name": "rl", "type": "redis", "endpoints": [stable.endpoint], "timeout_ms": 2000},
            {"name": "flaky", "type": "redis", "endpoints": [flaky.endpoint],
             "timeout_ms": FLAKY_TIMEOUT_MS, "eject_ms": 200}]))
        path = tmp / "config.yaml"
        path.write_text(json.dumps(text))
        async with run_cli_gateway(path) as a, run_cli_gateway(path) as b:
            assert a.proc.pid != b.proc.pid
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
                yield a, b, up, s


async def get(session, gw, path, headers=None):
    t0 = time.monotonic()
    async with session.get(gw.url(path), headers=headers or {}) as r:
        return r.status, r.headers, await r.read(), time.monotonic() - t0


def rl_headers(h):
    return int(h["ratelimit-limit"]), int(h["ratelimit-remaining"]), int(h["ratelimit-reset"])


async def test_two_gateways_admit_exactly_the_burst(fleet):
    a, b, up, s = fleet
    before = len(up.requests)
    results = await asyncio.gather(*[get(s, (a, b)[i % 2], "/rl_burst/x") for i in range(30)])
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    assert len(up.requests) - before == 10
    # Each admitted request took exactly one token of the one shared bucket.
    assert sorted(rl_headers(h)[1] for st, h, _, _ in results if st == 200) == list(range(10))
    for st, h, body, _ in results:
        assert rl_headers(h)[0] == 10
        if st == 429:
            assert rl_headers(h)[1] == 0 and int(h["retry-after"]) >= 1
            assert json.loads(body)["error"] == "rate_limited"


async def test_refill_admits_the_right_number_after_a_wait(fleet):
    a, b, _, s = fleet
    # burst 2, a token every 2 s (a burst of requests takes far less, even on a busy machine)
    first = await asyncio.gather(*[get(s, (a, b)[i % 2], "/rl_refill/x") for i in range(6)])
    assert [r[0] for r in first].count(200) == 2
    denied = [r for r in first if r[0] == 429]
    assert all(int(h["retry-after"]) in (1, 2) for _, h, _, _ in denied)
    await asyncio.sleep(4.2)           # refill: the bucket is full again (2 tokens), no more
    second = await asyncio.gather(*[get(s, (a, b)[i % 2], "/rl_refill/x") for i in range(6)])
    assert [r[0] for r in second].count(200) == 2


async def test_ratelimit_headers_agree_across_gateways(fleet):
    a, b, _, s = fleet
    seen = []
    for i in range(4):
        st, h, _, _ = await get(s, (a, b)[i % 2], "/rl_user/x", {"x-user": "carol"})
        seen.append((st, rl_headers(h)))
    # The most constrained limit is per-user (burst 3): one count whichever gateway answers.
    assert [x[0] for x in seen] == [200, 200, 200, 429]
    assert [x[1][:2] for x in seen] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    st, h, _, _ = await get(s, b, "/rl_user/x", {"x-user": "dave"})      # another key: its own bucket
    assert st == 200 and rl_headers(h)[:2] == (3, 2)


async def wait_status(s, gw, path, want: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        st = (await get(s, gw, path))[0]
        if st == want:
            return
        assert time.monotonic() < deadline, f"{path} still answers {st}, want {want}"
        await asyncio.sleep(0.05)


async def test_redis_stopped_then_killed_each_on_redis_error_mode(fleet, flaky):
    a, b, _, s = fleet
    bound = FLAKY_TIMEOUT_MS / 1000 + 1.0          # the cluster's timeout, plus a wide margin
    for path in ("/rl_allow/x", "/rl_deny/x", "/rl_local/x"):
        assert (await get(s, a, path))[0] == 200
    assert (await get(s, b, "/rl_local/x"))[0] == 200   # (Redis bucket of rl_local: burst 2, now empty)

    # Slow: Redis accepts connections but answers nothing (SIGSTOP).
    flaky.proc.send_signal(signal.SIGSTOP)
    try:
        st, _, _, took = await get(s, a, "/rl_allow/x")
        assert st == 200 and took < bound
        st, h, body, took = await get(s, b, "/rl_deny/x")
        assert st == 503 and took < bound and json.loads(body)["error"] == "rate_limiter_unavailable"
        assert h["retry-after"] == "1"
        # local: each gateway's own bucket (burst 2) — per gateway, not shared
        local = [await get(s, gw, "/rl_local/x") for gw in (a, a, a, b, b, b)]
        assert [r[0] for r in local] == [200, 200, 429, 200, 200, 429]
        assert all(r[3] < bound for r in local)
    finally:
        flaky.proc.send_signal(signal.SIGCONT)
    await wait_status(s, a, "/rl_deny/x", 200)
    await wait_status(s, b, "/rl_deny/x", 200)

    # Crashed: connections drop, new ones are refused.
    flaky.kill()
    results = await asyncio.gather(get(s, a, "/rl_allow/x"), get(s, b, "/rl_deny/x"), get(s, b, "/rl_allow/x"))
    assert [r[0] for r in results] == [200, 503, 200]
    assert all(r[3] < bound for r in results)
    flaky.start()                                   # back on the same port
    await wait_status(s, a, "/rl_deny/x", 200)
    await wait_status(s, b, "/rl_deny/x", 200)

    async with s.get(f"http://127.0.0.1:{a.ports['admin']}/metrics") as r:
        metrics = await r.text()
    errors = [l for l in metrics.splitlines() if l.startswith("wasmcustom_ratelimit_rl_deny_redis_errors")]
    assert errors and float(errors[0].split()[-1]) >= 2, errors
    assert 'wasmgate_redis_calls_total{cluster="flaky",result="timeout"}' in metrics


async def test_password_auth_and_a_wrong_password(tmp_path, caplog):
    r = RedisServer(tmp_path, password="s3cret").start()
    (tmp_path / "redis.pass").write_text("s3cret\n")
    try:
        async with echo_upstream() as up:
            doc = json.loads(gateway_yaml(up.port, [
                rl("good", "auth_ok", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1}]),
                rl("bad", "auth_wrong", [{"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1}],
                   on_redis_error="deny"),
            ], [{"name": n, "match": {"prefix": f"/{n}/"}, "cluster": "backend", "filters": [n]}
                for n in ("good", "bad")], extra_clusters=[
                {"name": "auth_ok", "type": "redis", "endpoints": [r.endpoint], "password_file": "redis.pass"},
                {"name": "auth_wrong", "type": "redis", "endpoints": [r.endpoint], "password": "nope"}]))
            caplog.set_level(logging.WARNING)
            async with run_gateway(json.dumps(doc), tmp_path) as gw, aiohttp.ClientSession() as s:
                statuses = [(await get(s, gw, "/good/x"))[0] for _ in range(2)]
                assert statuses == [200, 429]           # authenticated: the bucket is in Redis
                assert r.command("KEYS", "wasmgate:*").count(b"ratelimit:good:g") == 1
                assert (await get(s, gw, "/bad/x"))[0] == 503
        # Call time: the gateway names the cluster, the filter logs Redis's error reply.
        assert 'redis cluster "auth_wrong": authentication failed' in caplog.text
        assert "WRONGPASS invalid username-password pair" in caplog.text
    finally:
        r.stop()


async def test_redis_cluster_that_is_not_one_fails_the_filter_load(tmp_path, caplog):
    from abi.api import FilterLoadError
    async with echo_upstream() as up:
        doc = gateway_yaml(up.port, [rl("x", "backend", [{"name": "g", "key": "global", "rate": 1}])],
                           [{"name": "x", "cluster": "backend", "filters": ["x"]}])
        with pytest.raises(FilterLoadError, match="proxy_on_configure: returned false"):
            async with run_gateway(doc, tmp_path):
                pass
    assert 'redis_cluster "backend" is not a `type: redis` cluster' in caplog.text
