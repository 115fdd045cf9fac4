"""Hot reload in one process: what changes, what is kept, what a refused reload leaves alone."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.helpers import echo_upstream, run_gateway

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "filters" / "dist"


def config(up_port: int, tag: str, *, burst: int = 5, limit: str = "g", policy: str = "fail_closed",
           extra_route: bool = False) -> str:
    routes = [{"name": "all", "match": {"prefix": "/"}, "cluster": "backend", "filters": ["rl", "hdr"]}]
    if extra_route:
        routes.insert(0, {"name": "extra", "match": {"prefix": "/extra"}, "cluster": "backend"})
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "limits": {"drain_timeout_s": 5},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": routes,
        "filters": [
            {"name": "rl", "wasm": str(DIST / "ratelimit.wasm"), "failure_policy": policy,
             "config": {"limits": [{"name": limit, "key": "global", "rate": 1, "period_s": 3600, "burst": burst}]}},
            {"name": "hdr", "wasm": str(DIST / "headers.wasm"),
             "config": {"response": {"set": {"x-tag": tag}}}},
        ],
    }
    return json.dumps(doc, indent=1)


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with s.get(url) as r:
        await r.read()
        return r.status, r.headers.get("x-tag")


async def reload(s: aiohttp.ClientSession, gw) -> tuple[int, str]:
    async with s.post(gw.admin_url + "/reload") as r:
        return r.status, await r.text()


def metric(text: str, line_start: str) -> float:
    m = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.M)
    assert m, f"{line_start} missing from /metrics"
    return float(m.group(1))


async def test_changed_filter_rebuilt_unchanged_kept_shared_data_survives(tmp_path):
    limit = f"l{tmp_path.name}"          # the in-process store is per process: a key of our own
    async with echo_upstream() as up, run_gateway(config(up.port, "one", limit=limit), tmp_path) as gw:
        g = gw.gateway
        old_host = g.generation.filter_host
        rl, hdr = old_host.filters["rl"], old_host.filters["hdr"]
        rl_instance = rl.instance
        pool = g.generation.upstreams.pools["backend"]
        async with aiohttp.ClientSession() as s:
            assert [await get(s, gw.url("/a")) for _ in range(3)] == [(200, "one")] * 3
            gw.config_path.write_text(config(up.port, "two", limit=limit))
            status, body = await reload(s, gw)
            assert status == 200, body
            assert "filters reloaded: hdr" in body and "filters kept: rl" in body, body
            new_host = g.generation.filter_host
            assert new_host is not old_host
            assert new_host.filters["rl"] is rl and rl.instance is rl_instance    # same instance
            assert new_host.filters["hdr"] is not hdr
            assert g.generation.upstreams.pools["backend"] is pool          # unchanged cluster: warm pool
            # The bucket (shared data) was not reset: 2 of the burst of 5 are left.
            got = [await get(s, gw.url("/b")) for _ in range(3)]
            assert got == [(200, "two"), (200, "two"), (429, None)], got
            for _ in range(100):             # the old generation is retired once drained
                if hdr.closed:
                    break
                await asyncio.sleep(0.02)
            assert hdr.closed and not rl.closed
            async with s.get(gw.admin_url + "/metrics") as r:
                text = await r.text()
    assert metric(text, 'wasmgate_reloads_total{result="ok"}') == 1
    assert metric(text, "wasmgate_config_generation") == 2
    assert metric(text, "wasmgate_config_last_reload_timestamp_seconds") > 0


async def test_rebuilt_filter_keeps_shared_data(tmp_path):
    limit = f"l{tmp_path.name}"
    async with echo_upstream() as up, run_gateway(config(up.port, "one", limit=limit), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            assert [(await get(s, gw.url("/")))[0] for _ in range(4)] == [200] * 4
            rl = gw.gateway.generation.filter_host.filters["rl"]
            gw.config_path.write_text(config(up.port, "one", limit=limit, policy="fail_open"))
            status, body = await reload(s, gw)
            assert status == 200 and "filters reloaded: rl" in body, body
            assert gw.gateway.generation.filter_host.filters["rl"] is not rl    # a new instance...
            # ...that sees the same bucket: 1 of 5 left.
            assert [(await get(s, gw.url("/")))[0] for _ in range(2)] == [200, 429]


async def test_refused_reloads_keep_serving_the_old_config(tmp_path):
    limit = f"l{tmp_path.name}"
    async with echo_upstream() as up, run_gateway(config(up.port, "one", burst=100, limit=limit), tmp_path) as gw:
        good = config(up.port, "one", burst=100, limit=limit)
        doc = json.loads(good)
        missing = json.loads(good)
        missing["filters"][1]["wasm"] = str(tmp_path / "nope.wasm")
        rejected = json.loads(good)
        rejected["filters"][1]["config"] = {"respons": {}}          # headers' on_configure → false
        vm_start_false = json.loads(good)
        vm_start_false["filters"][1]["wasm"] = str(ROOT / "tests" / "conformance" / "wat" / "vm_start_false.wat")
        traps = json.loads(good)
        traps["filters"][1]["wasm"] = str(ROOT / "tests" / "conformance" / "wat" / "init_trap.wat")
        moved = json.loads(good)
        moved["listeners"][0]["port"] = 1
        broken = [
            ("listeners: [\n  - {name: main\n", "invalid YAML"),
            (json.dumps({**doc, "routes": [{"name": "r", "cluster": "nope"}]}), 'no cluster named "nope"'),
            (json.dumps(missing), "nope.wasm"),
            (json.dumps(rejected), "proxy_on_configure: returned false"),
            (json.dumps(vm_start_false), "proxy_on_vm_start"),
            (json.dumps(traps), "_initialize"),
            (json.dumps(moved), "listeners changed: restart required"),
        ]
        host = gw.gateway.generation.filter_host
        async with aiohttp.ClientSession() as s:
            for text, reason in broken:
                gw.config_path.write_text(text)
                status, body = await reload(s, gw)
                assert status == 422 and reason in body and "still serving generation 1" in body, body
                assert gw.gateway.generation.filter_host is host
                assert await get(s, gw.url("/x")) == (200, "one")
            assert all(not f.closed for f in host.filters.values())
            async with s.get(gw.admin_url + "/metrics") as r:
                text = await r.text()
    assert metric(text, 'wasmgate_reloads_total{result="failed"}') == len(broken)
    assert metric(text, "wasmgate_config_last_reload_ok") == 0
    assert metric(text, "wasmgate_config_generation") == 1


async def test_in_flight_request_finishes_on_its_generation(tmp_path):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.Response(text="ok")

    limit = f"l{tmp_path.name}"
    async with echo_upstream(handler=slow) as up, \
            run_gateway(config(up.port, "old", burst=100, limit=limit), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(get(s, gw.url("/slow")))
            for _ in range(100):
                if gw.gateway.generation.active:
                    break
                await asyncio.sleep(0.01)
            old_hdr = gw.gateway.generation.filter_host.filters["hdr"]
            gw.config_path.write_text(config(up.port, "new", burst=100, limit=limit))
            status, body = await reload(s, gw)
            assert status == 200, body
            assert await get(s, gw.url("/fast")) == (200, "new")
            await asyncio.sleep(0.1)
            assert not old_hdr.closed            # still serving the request that started on it
            release.set()
            assert await in_flight == (200, "old")
            for _ in range(100):
                if old_hdr.closed:
                    break
                await asyncio.sleep(0.02)
            assert old_hdr.closed


async def test_sighup_and_watch_reload(tmp_path):
    from gateway.workers import install

    limit = f"l{tmp_path.name}"
    async with echo_upstream() as up, \
            run_gateway(config(up.port, "one", burst=100, limit=limit), tmp_path) as gw:
        close = await install(gw.gateway, watch_s=0.1)
        try:
            async with aiohttp.ClientSession() as s:
                gw.config_path.write_text(config(up.port, "two", burst=100, limit=limit))
                assert await _eventually(s, gw.url("/"), "two")          # --watch noticed the file
                gw.config_path.write_text(config(up.port, "three", burst=100, limit=limit))
                os.kill(os.getpid(), signal.SIGHUP)                     # or SIGHUP, whichever first
                assert await _eventually(s, gw.url("/"), "three")
                # A new route without filters: the listener keeps serving while it appears.
                gw.config_path.write_text(config(up.port, "three", burst=100, limit=limit, extra_route=True))
                for _ in range(50):
                    async with s.get(gw.url("/extra")) as r:
                        await r.read()
                        if r.headers.get("x-tag") is None:
                            break
                    await asyncio.sleep(0.05)
                assert r.headers.get("x-tag") is None and r.status == 200
        finally:
            await close()


async def _eventually(s: aiohttp.ClientSession, url: str, tag: str) -> bool:
    for _ in range(60):
        status, got = await get(s, url)
        assert status == 200
        if got == tag:
            return True
        await asyncio.sleep(0.05)
    return False
