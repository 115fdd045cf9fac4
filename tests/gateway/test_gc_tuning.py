"""gc_tuning.py: start-up's heap frozen, a retired generation still collected after a reload."""
from __future__ import annotations

import asyncio
import gc
import json
import weakref
from pathlib import Path

import aiohttp
import pytest

from gateway import gc_tuning
from tests.helpers import echo_upstream, run_gateway


class Node:
    def __init__(self) -> None:
        self.me = self              # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def gc_state():
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.unfreeze()                   # leave the test process's collector as it was
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()


def test_tune_raises_only_the_young_threshold(gc_state):
    gc.set_threshold(700, 10, 10)
    gc_tuning.tune()
    assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, 10, 10)


def test_settle_collects_garbage_freezes_survivors_and_a_later_settle_frees_them(gc_state):
    garbage, survivor = Node(), Node()
    dead, alive = weakref.ref(garbage), weakref.ref(survivor)
    del garbage
    gc_tuning.settle()
    assert dead() is None                               # start-up garbage: collected
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects(2))   # frozen: out of every generation
    del survivor                                        # e.g. a generation a reload retired
    gc_tuning.settle()
    assert alive() is None                              # unfrozen, so collected


def _config(up_port: int, tag: str) -> str:
    return json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": [{"name": tag, "cluster": "backend"}],
    })


async def test_reload_freezes_the_new_generation_and_frees_the_old_one(tmp_path, gc_state):
    gc.unfreeze()
    gc.disable()                    # only the reload's own collection may free the old generation
    async with echo_upstream() as up, run_gateway(_config(up.port, "one"), tmp_path) as gw:
        g = gw.gateway
        old = g.generation
        old.router.pin = Node()     # in a cycle: freed only by a collection, never by refcounts
        pinned = weakref.ref(old.router.pin)
        del old
        gw.config_path.write_text(_config(up.port, "two"))
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.admin_url + "/reload") as r:
                assert r.status == 200, await r.text()
            async with s.get(gw.url("/")) as r:
                assert r.status == 200
        retiring = g.reload_state.retiring
        async with asyncio.timeout(30):
            while retiring or pinned() is not None:
                await asyncio.sleep(0.01)
        assert g.generation.router.routes[0].name == "two"
        assert gc.get_freeze_count() > 0


def _alive(kind: str) -> int:
    """Live objects of a gateway type, or ("_body") upstream body generators."""
    if kind == "_body":
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "async_generator"
                   and o.ag_code.co_qualname == "UpstreamResponse._body")
    return sum(1 for o in gc.get_objects() if type(o).__name__ == kind)


async def test_a_filtered_request_leaves_no_cycle_for_the_collector(tmp_path, gc_state):
    """Through a real filter that sets a response header (so the chain is handed the upstream
    body but does not read it: the one-read path), the request's upstream response, its body
    iterator and generator are freed by reference counting when the request ends: nothing is
    left for a young collection, whose pause would land on every request in flight (bench/README.md,
    Issue 15 third pass)."""
    from tests.helpers import gateway_config
    headers_wasm = Path(__file__).resolve().parents[2] / "filters" / "dist" / "headers.wasm"
    async with echo_upstream() as up, run_gateway(gateway_config(
            up.port, [{"name": "all", "cluster": "backend", "filters": ["tagger"]}],
            [{"name": "tagger", "wasm": str(headers_wasm),
              "config": {"response": {"set": {"x-tagged": "yes"}}}}]), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url("/warm")) as r:        # first-request caches out of the count
                assert r.status == 200 and r.headers["x-tagged"] == "yes"
            gc.collect()
            gc.disable()                                    # from here only refcounts free anything
            before = {t: _alive(t) for t in ("UpstreamResponse", "BodyStream", "_body")}
            for i in range(20):
                async with s.get(gw.url(f"/r/{i}")) as r:
                    assert r.status == 200 and r.headers["x-tagged"] == "yes"
                    assert f'"path": "/r/{i}"'.encode() in await r.read()
            after = {t: _alive(t) for t in before}
    assert after == before, f"per-request objects left to the cyclic collector: {before} -> {after}"
