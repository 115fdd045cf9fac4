"""Invariants the per-request fast path relies on (bench/chain_profile.py measures it):
a finished request is freed by reference counting (no chain <-> context cycle for the GC),
and a second finish() does not delete the contexts again."""
from __future__ import annotations

import asyncio
import gc

import pytest

from abi.api import Forward, LogInfo
from abi.filter import Filter
from bench.chain_profile import CHAIN, REQUEST_HEADERS, RESPONSE_HEADERS, load
from abi_helpers import info

# The chain's behaviour on both filter call paths: NativeFilter's C and Filter's Python.
pytestmark = pytest.mark.usefixtures("crossing_impl")


async def _one(host, i: int, *, finish_twice: bool = False) -> None:
    stream = host.stream(CHAIN, info(request_id=f"r{i}", client_addr=("127.0.0.1", 40000 + i)))
    fwd = await stream.request(list(REQUEST_HEADERS), None)
    assert isinstance(fwd, Forward)
    fwd = await stream.response(200, [(":status", "200")] + RESPONSE_HEADERS, None)
    assert isinstance(fwd, Forward)
    await stream.finish(LogInfo(status=200))
    if finish_twice:
        await stream.finish(LogInfo(status=200))


def test_finished_requests_leave_no_cyclic_garbage():
    async def main():
        host = await load(CHAIN)
        try:
            await _one(host, 0)
            gc.collect()
            gc.disable()
            try:
                for i in range(20):
                    await _one(host, i)
                assert gc.collect() == 0
            finally:
                gc.enable()
            for f in host.filters.values():
                assert [c for c in f.contexts.values() if c is not f.root] == []
        finally:
            await host.close()
    asyncio.run(main())


def test_second_finish_runs_no_callbacks(monkeypatch):
    calls: list[str] = []
    exported: list[str] = []         # the teardown callbacks the modules export, chain order
    real = Filter._export

    def export(self, inst, name):      # every guest call goes through a cached export
        fn = real(self, inst, name)

        def recorded(*args):
            calls.append(name)
            return fn(*args)
        return recorded

    async def main():
        host = await load(CHAIN)
        try:
            exported.extend(n for name in CHAIN for n in host.filters[name].teardown_callbacks)
            monkeypatch.setattr(Filter, "_export", export)
            for f in host.filters.values():
                f._funcs.clear()
            await _one(host, 1, finish_twice=True)
        finally:
            monkeypatch.undo()
            for f in host.filters.values():
                f._funcs.clear()         # the roots' teardown at close() is not counted
            await host.close()
    asyncio.run(main())
    teardown = [n for n in calls if n in ("proxy_on_done", "proxy_on_log", "proxy_on_delete")]
    # (the bench filters leave out on_done / on_log: on_delete is what frees their contexts)
    assert exported.count("proxy_on_delete") == len(CHAIN)
    assert teardown == exported


def test_each_guest_callback_of_a_request_is_counted_once(monkeypatch):
    # GET /filters' calls / guest_us: the instance counts its top-level guest calls (every
    # callback, in call() and teardown() alike) and their wall time; the allocator calls made
    # from host functions are inside those and not counted again.
    made: dict[str, list[str]] = {}
    real = Filter._export

    def export(self, inst, name):
        fn = real(self, inst, name)

        def recorded(*args):
            made.setdefault(self.name, []).append(name)
            return fn(*args)
        return recorded

    async def main():
        host = await load(CHAIN)
        try:
            monkeypatch.setattr(Filter, "_export", export)
            for f in host.filters.values():
                f._funcs.clear()
            before = {name: (f.calls, f.guest_ns) for name, f in host.filters.items()}
            for i in range(3):
                await _one(host, i)
            for name, f in host.filters.items():
                calls, ns = before[name]
                assert f.calls - calls == len(made[name]) > 0, (name, made[name])
                assert f.guest_ns > ns
        finally:
            monkeypatch.undo()
            await host.close()
    asyncio.run(main())
