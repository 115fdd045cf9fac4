"""Abuse basics: a misbehaving filter fails its request by policy, is rebuilt, and never
takes the host or another filter down."""
from __future__ import annotations

import asyncio
import time

import pytest

from abi.api import FilterLimits, Forward, LocalReply, LogInfo

from abi_helpers import REQ, info, rebuilt
from abi_wat import OUT, Wat, status

# The chain's behaviour on both filter call paths: NativeFilter's C and Filter's Python.
pytestmark = pytest.mark.usefixtures("crossing_impl")

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"


def trapping(callback: str = "proxy_on_request_headers", body: str = "unreachable") -> Wat:
    w = Wat()
    w.on(callback, body)
    return w


async def one(host, names=("f",), headers=REQ):
    s = host.stream(list(names), info())
    out = await asyncio.wait_for(s.request(headers, None), 5)
    if isinstance(out, Forward):
        resp = await s.response(200, [], None)
        out = resp if isinstance(resp, LocalReply) else out
    await s.finish(LogInfo(status=200))
    return out


def failures(host, name="f"):
    return {k: v for k, v in host.filters[name].failures.items()}


async def test_trap_fail_closed_then_rebuilt(load, trace):
    w = Wat()
    # Traps when the request carries x-boom.
    w.on("proxy_on_request_headers",
         f"(if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) {w.s('x-boom')} {O}))"
         " (then unreachable)) (i32.const 0)")
    host = await load(w)
    out = await one(host, headers=REQ + [("x-boom", "1")])
    assert isinstance(out, LocalReply) and out.status == 503 and out.details == "wasm_fail_stream"
    assert failures(host) == {("proxy_on_request_headers", "trap"): 1}
    assert "wasm backtrace" in trace.text() and "proxy_on_request_headers" in trace.text()
    # Once rebuilt (off the event loop), requests run on a fresh instance: start sequence
    # again, new root id.
    await rebuilt(host.filters["f"])
    out = await one(host)
    assert isinstance(out, Forward)
    assert host.filters["f"].rebuilds == 1
    starts = [l for l in trace.lines("f") if l.startswith("proxy_on_context_create") and l.endswith(" 0")]
    assert len(starts) == 2 and starts[0] != starts[1]


async def test_trap_fail_open_skips_filter_and_others_carry_on(load, trace):
    bad, good = trapping(), Wat()
    good.on("proxy_on_request_headers",
            f"(drop (call $proxy_add_header_map_value (i32.const 0) {good.s('x-good')} {good.s('1')})) (i32.const 0)")
    host = await load({"bad": bad, "good": good}, failure_policy="fail_open")
    out = await one(host, ("bad", "good"))
    assert isinstance(out, Forward) and ("x-good", "1") in out.headers
    # The failed filter gets no more callbacks for that request (no response, no teardown).
    assert not any("response" in l or "on_done" in l for l in trace.lines("bad")[3:])


async def test_infinite_loop_hits_deadline(load, trace):
    w = trapping(body="(loop $l (br $l)) (i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=50))
    t0 = time.monotonic()
    out = await one(host)
    assert time.monotonic() - t0 < 2
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_request_headers", "deadline"): 1}


async def test_memory_growth_is_capped(load):
    # Grow one page at a time; when the cap refuses, abort like an SDK allocator would.
    w = trapping(body="(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable")
    host = await load(w, limits=FilterLimits(memory_bytes=4 << 20, callback_ms=1000))
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_request_headers", "trap"): 1}


async def test_invalid_action_fails_request_without_discarding_instance(load):
    w = trapping(body="(i32.const 7)")
    host = await load(w)
    gen = host.filters["f"].generation
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_request_headers", "invalid_action"): 1}
    assert host.filters["f"].generation == gen and host.filters["f"].instance is not None


async def test_invalid_body_action(load):
    w = trapping("proxy_on_response_body", "(i32.const 99)")
    host = await load(w, failure_policy="fail_open")
    s = host.stream(["f"], info())
    await s.request(REQ, None)

    async def body():
        yield b"x"
    resp = await s.response(200, [], body())
    assert [c async for c in resp.body] == [b"x"]
    assert failures(host) == {("proxy_on_response_body", "invalid_action"): 1}


async def test_bad_allocator_results(load, trace):
    w = Wat(allocator=False)
    w.extra.append('(func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const -256))')
    w.on("proxy_on_request_headers",
         status(w, "pairs", f"(call $proxy_get_header_map_pairs (i32.const 0) {O})") + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    assert isinstance(await one(host), Forward)
    assert trace.lines("f")[1] == "pairs 6"


async def test_allocator_returning_null(load, trace):
    w = Wat(allocator=False)
    w.extra.append('(func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0))')
    w.on("proxy_on_request_headers",
         status(w, "pairs", f"(call $proxy_get_header_map_pairs (i32.const 0) {O})") + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    assert isinstance(await one(host), Forward)
    assert trace.lines("f")[1] == "pairs 6"


async def test_huge_return_buffer_exhausts_guest_allocator(load):
    # The guest allocator traps when memory cannot grow: that is the guest's failure.
    w = Wat()
    w.on("proxy_on_request_body",
         f"(drop (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {O})) (i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=256 << 10, callback_ms=1000))
    s = host.stream(["f"], info())

    async def body():
        yield b"x" * (1 << 20)
    fwd = await s.request(REQ, body())
    with pytest.raises(Exception) as ei:
        async for _ in fwd.body:
            pass
    assert type(ei.value).__name__ == "LocalReplyInterrupt" and ei.value.reply.status == 503
    await s.finish(LogInfo())
    assert failures(host) == {("proxy_on_request_body", "trap"): 1}


async def test_allocator_trap_inside_host_call(load):
    w = Wat(allocator=False)
    w.extra.append('(func (export "proxy_on_memory_allocate") (param i32) (result i32) unreachable)')
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_get_header_map_pairs (i32.const 0) {O})) (i32.const 0)")
    host = await load(w)
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_request_headers", "trap"): 1}


async def test_proc_exit_in_callback_ends_instance(load):
    w = trapping(body="(call $proc_exit (i32.const 3)) (i32.const 0)")
    host = await load(w)
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_request_headers", "exit"): 1}


async def test_repeated_failures_back_off(load):
    host = await load(trapping())
    f = host.filters["f"]
    # 1st failure: rebuilt at once; the next failure in a row waits 100 ms (then 200 ms...).
    assert isinstance(await one(host), LocalReply)
    await rebuilt(f)
    assert isinstance(await one(host), LocalReply)
    failed_at = time.monotonic()
    assert f.consecutive_failures == 2
    # Meanwhile requests are refused without reaching the guest: no instance, no build yet.
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert sum(f.failures.values()) == 2 and f.building is None
    await rebuilt(f)
    assert time.monotonic() - failed_at >= 0.08     # (the timer starts just before failed_at)


async def test_trap_in_callout_response_fails_paused_request(load, services):
    from abi.api import CallResponse
    from abi.pairs import serialize
    services.clusters["c"] = CallResponse(200, [], b"")
    w = Wat()
    hdrs = serialize([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_http_call {w.s('c')} {w.s(hdrs)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const {OUT}))) (i32.const 1)")
    w.on("proxy_on_http_call_response", "unreachable")
    host = await load(w)
    out = await one(host)
    assert isinstance(out, LocalReply) and out.status == 503
    assert failures(host) == {("proxy_on_http_call_response", "trap"): 1}


async def test_failing_filter_does_not_disturb_concurrent_requests(load):
    bad = trapping(body="(loop $l (br $l)) (i32.const 0)")
    good = Wat()
    host = await load({"bad": bad, "good": good},
                      limits=FilterLimits(memory_bytes=16 << 20, callback_ms=30))
    results = await asyncio.gather(*[one(host, ("good",)) for _ in range(20)],
                                   *[one(host, ("bad",)) for _ in range(3)])
    assert all(isinstance(r, Forward) for r in results[:20])
    assert all(isinstance(r, LocalReply) and r.status == 503 for r in results[20:])
    assert host.filters["good"].failures == {}


async def test_failure_metrics_exported(load):
    host = await load(trapping())
    await one(host)
    samples = [m for m in host.metrics() if m.name == "wasmgate_filter_failures_total"]
    assert [(m.labels, m.value) for m in samples] == [
        ({"filter": "f", "callback": "proxy_on_request_headers", "kind": "trap"}, 1.0)]


async def test_callout_flood_is_bounded(load, services, trace):
    from abi.api import CallResponse
    from abi.filter import MAX_PENDING_CALLS
    from abi.pairs import serialize

    async def hang(*a):
        await asyncio.sleep(10)
    services.clusters["c"] = hang
    w = Wat()
    hdrs = serialize([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])
    w.extra.append("(global $n (mut i32) (i32.const 0))")
    w.on("proxy_on_request_headers",
         "(block $out (loop $l "
         f"(br_if $out (call $proxy_http_call {w.s('c')} {w.s(hdrs)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const {OUT})))"
         "(global.set $n (i32.add (global.get $n) (i32.const 1))) (br $l)))"
         f"(call $log_num {w.s('dispatched')} (global.get $n)) (i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=2000))
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    assert trace.lines("f")[1] == f"dispatched {MAX_PENDING_CALLS}"
    await s.finish(LogInfo())
    assert host.filters["f"]._calls == {}


async def test_huge_guest_log_line_is_clipped(load, trace):
    w = Wat(pages=40)
    w.on("proxy_on_request_headers", "(drop (call $proxy_log (i32.const 2) (i32.const 0) (i32.const 2000000))) (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await one(host)
    line = trace.lines("f")[1]
    assert len(line) < 20000 and line.endswith("(2000000 bytes)")


async def test_allocator_reentering_the_host_recursively(load):
    # A hostile allocator that asks the host for data again: host → guest → host … must end
    # as a contained failure, not a crash of the gateway.
    w = Wat(allocator=False)
    w.extra.append(f'(func (export "proxy_on_memory_allocate") (param i32) (result i32) '
                   f'(drop (call $proxy_get_header_map_pairs (i32.const 0) (i32.const {OUT}) (i32.const {OUT + 4}))) '
                   f'(i32.const {OUT + 64}))')
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_get_header_map_pairs (i32.const 0) {O})) (i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=2000))
    out = await one(host)
    # the nested request for data is refused (INVALID_MEMORY_ACCESS), the outer one succeeds
    assert isinstance(out, Forward)
    assert host.filters["f"].host_errors == 0 and failures(host) == {}
