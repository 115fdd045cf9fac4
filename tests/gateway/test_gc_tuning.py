"""gc_tuning.py: start-up's heap frozen, a retired generation still collected after a reload."""
from __future__ import annotations

import asyncio
import gc
import json
import weakref

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
