"""The same crossings through wasmtime-py's public API, as bench/crossing.py's baseline."""
from __future__ import annotations

import time

import wasmtime as wt

from .binary import _to_binary


def public_api_crossing(wat: bytes, guest_export: str, guest_args: tuple[int, ...],
                        host_loop_export: str, host_import: tuple[str, str],
                        guest_calls: int, host_calls: int) -> dict[str, float]:
    """Time the same crossings through wasmtime-py's public API (the slow path this module
    avoids), for bench/crossing.py's side-by-side baseline. Not used by the gateway."""
    engine = wt.Engine()
    store = wt.Store(engine)
    module = wt.Module(engine, _to_binary(wat))
    linker = wt.Linker(engine)
    imp = next(i for i in module.imports if (i.module, i.name) == host_import)
    linker.define_func(imp.module, imp.name, imp.type, lambda *a: a[0] if imp.type.results else None)
    exports = linker.instantiate(store, module).exports(store)
    guest, loop = exports[guest_export], exports[host_loop_export]
    start = time.perf_counter()
    for _ in range(guest_calls):
        guest(store, *guest_args)
    guest_us = (time.perf_counter() - start) / guest_calls * 1e6
    start = time.perf_counter()
    loop(store, host_calls)
    host_us = (time.perf_counter() - start) / host_calls * 1e6
    return {"guest_call_us": guest_us, "host_call_us": host_us}
