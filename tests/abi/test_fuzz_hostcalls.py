"""Property-based fuzzing of every host function: arbitrary arguments, in a root and in an
HTTP context; nothing but a status (or a deliberate HostTrap from proc_exit) ever leaves."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from abi.buffers import HeaderMap
from abi.engine import HostTrap
from abi.hostcalls import HOSTCALLS
from abi.pairs import deserialize, serialize
from abi.properties import PropertySource, RootFacts, get_property
from abi.wasi import WASI

from abi_helpers import REQ, info
from abi_wat import Wat

# Both crossings: the C one (_crossing.c: guest-memory helpers, the host functions' error
# wrapper) and the Python fallback (conftest.py).
pytestmark = pytest.mark.usefixtures("crossing_impl")

DATA = 0x9400          # where each example writes its random bytes
U32 = 0xFFFFFFFF

# A module importing every host function we define, with an allocator that reports failure
# (0) instead of trapping, so the instance survives any example.
_SAFE_ALLOC = """
(func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
  (local $p i32)
  (if (i32.gt_u (local.get $size) (i32.const 0x100000)) (then (return (i32.const 0))))
  (local.set $p (global.get $heap))
  (global.set $heap (i32.add (local.get $p) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
  (if (i32.gt_u (global.get $heap) (i32.const 0x30000)) (then (global.set $heap (i32.const 0x10000)) (local.set $p (i32.const 0x10000))))
  (local.get $p))
"""


def everything_module() -> str:
    w = Wat(allocator=False, pages=4, imports={}, wasi=False, metric_imports=False)
    w.extra.append(_SAFE_ALLOC)
    text = w.render()
    lines = []
    for name, (_fn, params, results) in HOSTCALLS.items():
        lines.append(f'(import "env" "{name}" (func (param {" ".join(params)}) (result {" ".join(results)})))'
                     if results else f'(import "env" "{name}" (func (param {" ".join(params)})))')
    for name, (_fn, params, results) in WASI.items():
        lines.append(f'(import "wasi_snapshot_preview1" "{name}" (func (param {" ".join(params)}) (result {" ".join(results)})))'
                     if results else f'(import "wasi_snapshot_preview1" "{name}" (func (param {" ".join(params)})))')
    # the builder's trace helper calls proxy_log by name; give it one
    lines.append('(import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))')
    text = text.replace("(module", "(module\n" + "\n".join(lines[:-1]) + "\n" + lines[-1], 1)
    # remove the duplicate anonymous proxy_log import (keep the named one)
    return text.replace('(import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))\n', "", 1)


pointer = st.one_of(st.integers(0, U32), st.integers(0, 0x40000),
                    st.sampled_from([0, 1, DATA, DATA + 8, 0x3FFFC, 0x40000, 0x7FFFFFFF, U32]))
length = st.one_of(st.integers(0, U32), st.integers(0, 256), st.sampled_from([0, 4, 8, U32]))
i64 = st.integers(-(1 << 63), (1 << 63) - 1)


def arg_strategy(params):
    out = []
    for i, p in enumerate(params):
        out.append(i64 if p == "i64" else st.one_of(pointer, length, st.integers(0, 20)))
    return st.tuples(*out)


@pytest.fixture
async def fuzz_filter(load, services):
    from abi.api import CallResponse
    from abi.buffers import BodyBuffer
    services.clusters["c"] = CallResponse(200, [], b"")
    host = await load(everything_module(), name="fz")
    f = host.filters["fz"]
    chain = host.stream(["fz"], info())
    # every map and buffer present, so the fuzzer reaches the code behind availability checks
    chain.request_headers = HeaderMap(list(REQ))
    chain.response_headers = HeaderMap([(":status", "200"), ("x", "y")])
    chain.request_trailers = HeaderMap([("t", "1")])
    chain.response_trailers = HeaderMap([])
    ctx = f.new_http_context(chain)
    ctx.bodies = [BodyBuffer(data=b"request body"), BodyBuffer(data=b"response")]
    return f, ctx


def callout_data():
    from abi.buffers import BodyBuffer
    from abi.context import CalloutData
    return CalloutData(HeaderMap([(":status", "200")]), BodyBuffer(False, b"resp"), HeaderMap([]))


ALL = [("env", n, spec) for n, spec in HOSTCALLS.items()] + \
      [("wasi_snapshot_preview1", n, spec) for n, spec in WASI.items()]


@pytest.mark.parametrize("module,name,spec", ALL, ids=[n for _m, n, _s in ALL])
async def test_host_function_never_raises(fuzz_filter, module, name, spec):
    f, http_ctx = fuzz_filter
    fn = f.host_functions[(module, name)]
    _adapter, params, results = spec

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=arg_strategy(params), data=st.binary(max_size=64), in_stream=st.booleans())
    def check(args, data, in_stream):
        f.write(DATA, data + bytes(64 - len(data)))
        f._current = http_ctx if in_stream else f.root
        f._effective = None
        f.callout = callout_data() if in_stream else None
        try:
            r = fn(*args)
        except HostTrap:
            assert name == "proc_exit"
            return
        finally:
            f._current = None
            f._effective = None
            f.callout = None
        if results:
            assert isinstance(r, int) and 0 <= r <= U32, (name, args, r)
        else:
            assert r is None
        assert f.host_errors == 0, f"{name}{args} hit an internal error"
        assert f.instance is not None and not f.instance.poisoned

    check()
    for task in [t for t, _ in f._calls.values()]:
        task.cancel()
    await asyncio.sleep(0)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_pairs_parser_total(data):
    pairs = deserialize(data)
    if pairs is not None:
        assert serialize(pairs) == (data if pairs else b"") or data == b"\0\0\0\0"


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=6))
def test_pairs_roundtrip(pairs):
    assert deserialize(serialize(pairs)) == pairs


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=40))
def test_property_lookup_total(path):
    src = PropertySource("p", RootFacts())
    value = get_property(src, path)
    assert value is None or isinstance(value, bytes)
