"""Fixtures for ABI tests: fake gateway services, trace capture, a FilterHost loader."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from abi.api import CallFailed, FilterLimits, FilterSpec
from abi.engine import Engine
from abi.filter_host import FilterHost
from abi.shared_store import LocalStore


class TraceHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=1)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, filter_name: str | None = None) -> list[str]:
        out = []
        for r in self.records:
            msg = r.getMessage()
            prefix = f'filter "{filter_name}": ' if filter_name else 'filter "'
            if msg.startswith(prefix):
                out.append(msg[len(prefix):] if filter_name else msg.split('": ', 1)[1])
        return out

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


class FakeServices:
    """HostServices for in-process tests: clusters answer from a dict of handlers."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.clusters: dict[str, object] = {}
        self.calls: list[tuple] = []

    def has_cluster(self, name: str) -> bool:
        return name in self.clusters

    async def http_call(self, cluster, method, path, authority, headers, body, timeout_s, reserve=None):
        self.calls.append((cluster, method, path, authority, headers, body, timeout_s))
        handler = self.clusters[cluster]
        result = handler(method, path, headers, body) if callable(handler) else handler
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, Exception):
            raise result
        if reserve is not None and result.body and not reserve(len(result.body)):
            raise CallFailed("response body over the filter's max_callout_bytes")   # as Upstreams
        return result


@pytest.fixture(params=["native", "ctypes"])
def crossing_impl(request, monkeypatch):
    """Runs a test on both crossings: abi/engine/_crossing.c (built at install when a C
    compiler is there) and the ctypes / pure-Python fallback (WASMGATE_PURE_PYTHON=1). An
    Instance picks one when it is made, a filter's host-function wrappers when it is loaded,
    the chain's loops (abi/chain.py walk_*) when a request runs;
    modules use it with ``pytestmark = pytest.mark.usefixtures("crossing_impl")``."""
    from abi.engine import crossing
    if request.param == "native" and crossing._native is None:
        pytest.skip("abi/engine/_crossing.c is not built (no C compiler at install?)")
    monkeypatch.setattr(crossing, "USE_NATIVE", request.param == "native")
    if request.param == "ctypes":            # the chain's loops too: chain.py's reference walks
        from abi import chain
        for name, walk in zip(("walk_request", "walk_response", "walk_finish"), chain.PY_WALKS):
            monkeypatch.setattr(chain, name, walk)
        monkeypatch.setattr(chain, "stream_head", chain._stream_head)
    return request.param


@pytest.fixture(params=["c", "python"])
def local_store_impl(request, monkeypatch):
    """Runs a test on both LocalStore.set paths: abi/_local_store.c's StoreCore.set (built at
    install when a C compiler is there) and the Python _set (WASMGATE_PURE_PYTHON=1). Stores
    made from then on use it; modules use it with
    ``pytestmark = pytest.mark.usefixtures("local_store_impl")``."""
    from abi import shared_store
    if request.param == "c" and shared_store._StoreBase is object:
        pytest.skip("abi/_local_store.c is not built (no C compiler at install?)")
    monkeypatch.setattr(shared_store, "USE_C_SET", request.param == "c")
    return request.param


@pytest.fixture(params=["c", "py-lmdb"])
def lmdb_binding(request, monkeypatch):
    """Runs a test on both LMDB bindings of the gateway-wide shared store: abi/_lmdb.c (built
    at install when liblmdb-dev is there; the request path's get and set whole in C) and py-lmdb
    (WASMGATE_PURE_PYTHON=1). Stores created from then on use it, and so do the processes a test
    starts (they inherit the environment); modules use it with
    ``pytestmark = pytest.mark.usefixtures("lmdb_binding")``."""
    from abi import shared_store_shm as S
    if request.param == "c":
        if S._c_lmdb is None:
            pytest.skip("abi/_lmdb.c is not built (no liblmdb-dev at install?)")
        monkeypatch.setattr(S, "binding", S._c_lmdb)
        monkeypatch.delenv("WASMGATE_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setattr(S, "binding", S._py_lmdb)
        monkeypatch.setenv("WASMGATE_PURE_PYTHON", "1")
    return request.param


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    return Engine(cache_dir=tmp_path_factory.mktemp("wasm-cache"))


@pytest.fixture
def trace():
    handler = TraceHandler()
    return handler


@pytest.fixture
def services(trace, request):
    log = logging.getLogger(f"test.abi.{request.node.name}")
    log.setLevel(1)
    log.propagate = False
    log.addHandler(trace)
    yield FakeServices(log)
    log.removeHandler(trace)


@pytest.fixture
async def load(engine, services, tmp_path):
    """load(wat_or_Wat, name="f", **spec) -> FilterHost; several: load({"a": w1, "b": w2})."""
    hosts: list[FilterHost] = []

    async def _load(modules, store=None, **spec_kw):
        if not isinstance(modules, dict):
            modules = {spec_kw.pop("name", "f"): modules}
        limits = spec_kw.pop("limits", FilterLimits(memory_bytes=16 << 20, callback_ms=200))
        specs = []
        for name, mod in modules.items():
            text = mod.render() if hasattr(mod, "render") else mod
            path = tmp_path / f"{name}.wat"
            path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
            specs.append(FilterSpec(name=name, wasm_path=path, limits=limits, **spec_kw))
        host = await FilterHost.load(specs, services, engine=engine, store=store or LocalStore())
        hosts.append(host)
        return host

    yield _load
    for h in hosts:
        await h.close()


