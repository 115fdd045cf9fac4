"""Bounds on what a filter can make the host allocate or hold: gathered log lines, buffered
bodies (max_buffered_body_bytes), header maps, properties, callout bytes (max_callout_bytes).
Peak host allocation is measured with tracemalloc around the guest call."""
from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from abi.api import CallResponse, FilterLimits, Forward, LocalReply, LocalReplyInterrupt, LogInfo
from abi.limits import MAX_LOG_BYTES
from abi.pairs import serialize
from tests.helpers import until

from abi_helpers import REQ, collect, info
from abi_wat import OUT, Wat

IOVS = 0x10000          # where the guest builds its iovec list
WRITTEN = OUT + 8       # fd_write's nwritten out-param
CALL_HEADERS = serialize([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])


def iovec_flood(w: Wat, n: int, ptr: int, length: int, fd: int = 1, last: tuple[int, int] | None = None) -> str:
    """WAT: fill an n-entry iovec list at IOVS, every entry (ptr, length) (the last one `last`
    if given), call fd_write with it and trace its errno and nwritten."""
    body = ("(local $i i32)"
            "(loop $l"
            f" (i32.store (i32.add (i32.const {IOVS}) (i32.shl (local.get $i) (i32.const 3))) (i32.const {ptr}))"
            f" (i32.store (i32.add (i32.const {IOVS + 4}) (i32.shl (local.get $i) (i32.const 3))) (i32.const {length}))"
            " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
            f" (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))")
    if last is not None:
        at = IOVS + 8 * (n - 1)
        body += f"(i32.store (i32.const {at}) (i32.const {last[0]})) (i32.store (i32.const {at + 4}) (i32.const {last[1]}))"
    body += (f"(i32.store (i32.const {WRITTEN}) (i32.const 0))"
             f"(call $log_num {w.s('errno')} (call $fd_write (i32.const {fd}) (i32.const {IOVS}) (i32.const {n}) (i32.const {WRITTEN})))"
             f"(call $log_num {w.s('written')} (i32.load (i32.const {WRITTEN})))")
    return body


async def run_request(host, names=("f",)):
    s = host.stream(list(names), info())
    out = await asyncio.wait_for(s.request(REQ, None), 10)
    await s.finish(LogInfo(status=200))
    return out


async def measured(coro):
    """(result, peak bytes allocated by Python while it ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = await coro
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def stdout_lines(trace, name="f") -> list[str]:
    prefix = f'filter "{name}" stdout: '
    return [r.getMessage()[len(prefix):] for r in trace.records if r.getMessage().startswith(prefix)]


async def test_fd_write_8000_iovecs_over_one_block_stays_bounded(load, trace):
    # A 128 KiB guest names its first 64 KiB 8,000 times: 524,288,000 bytes claimed.
    w = Wat(pages=2)
    w.on("proxy_on_request_headers", iovec_flood(w, 8000, 0, 65536) + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    out, peak = await measured(run_request(host))
    assert isinstance(out, Forward)
    assert trace.lines("f")[1:3] == ["errno 0", f"written {8000 * 65536}"]
    # The host copied one log line's worth, not the claim (the unbounded gather peaked at ~1 GiB).
    assert peak < 1 << 20, peak
    [line] = stdout_lines(trace)
    assert line.endswith(f"… ({8000 * 65536} bytes)") and len(line) < MAX_LOG_BYTES + 64
    # The filter is unharmed: the next request runs on the same instance.
    assert isinstance(await run_request(host), Forward)
    assert host.filters["f"].failures == {} and host.filters["f"].rebuilds == 0


async def test_fd_write_checks_every_iovec_even_past_the_cap(load, trace):
    # The cap fills on the first iovec; the 5000th points outside memory: still FAULT.
    w = Wat(pages=2)
    w.on("proxy_on_request_headers", iovec_flood(w, 5000, 0, 65536, last=(0x1FFFF, 2)) + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 21", "written 0"]      # FAULT, nothing written
    assert stdout_lines(trace) == []


async def test_fd_write_claim_over_4_gib_is_inval(load, trace):
    w = Wat(pages=10)                   # room for a 65,537-entry list at IOVS
    w.on("proxy_on_request_headers", iovec_flood(w, 65537, 0, 65536) + "(i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=2000))
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 28", "written 0"]      # INVAL: over u32


async def test_fd_write_small_lines_unchanged(load, trace):
    w = Wat(pages=2)
    text = b"hello from the guest\n"
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {IOVS}) {w.s(text).split(') (')[0]}))"
         f"(i32.store (i32.const {IOVS + 4}) (i32.const {len(text)}))"
         f"(call $log_num {w.s('errno')} (call $fd_write (i32.const 2) (i32.const {IOVS}) (i32.const 1) (i32.const {WRITTEN})))"
         f"(call $log_num {w.s('written')} (i32.load (i32.const {WRITTEN}))) (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 0", f"written {len(text)}"]
    assert 'filter "f" stderr: hello from the guest' in trace.text()


async def test_proxy_log_reads_only_the_cap(load, trace):
    w = Wat(pages=64)                   # 4 MiB guest logging all of it
    size = 64 * 65536
    w.on("proxy_on_request_headers",
         f"(call $log_num {w.s('log')} (call $proxy_log (i32.const 2) (i32.const 0) (i32.const {size})))"
         f"(call $log_num {w.s('bad')} (call $proxy_log (i32.const 2) (i32.const 1) (i32.const {size})))"
         "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    _, peak = await measured(run_request(host))
    lines = trace.lines("f")
    assert lines[1].endswith(f"… ({size} bytes)") and len(lines[1]) < MAX_LOG_BYTES + 64
    assert lines[2:4] == ["log 0", "bad 6"]        # one byte past the end: INVALID_MEMORY_ACCESS
    assert peak < 1 << 20, peak


# -- body buffering: max_buffered_body_bytes ----------------------------------------------------

def limits(buffered: int, **kw) -> FilterLimits:
    return FilterLimits(memory_bytes=kw.pop("memory_bytes", 16 << 20), callback_ms=200,
                        max_buffered_body_bytes=buffered, **kw)


class Source:
    """A body iterator that records how many chunks the chain pulled from it."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.pulled = n, size, 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.pulled == self.n:
            raise StopAsyncIteration
        self.pulled += 1
        return b"x" * self.size


def teardown(lines: list[str]) -> list[str]:
    return [l.split()[0] for l in lines if l.split()[0] in ("proxy_on_done", "proxy_on_log", "proxy_on_delete")]


async def test_request_body_buffered_past_the_limit_is_413(load, trace):
    w = Wat()
    w.on("proxy_on_request_body", w.trace("proxy_on_request_body", 3) + " (i32.const 1)")   # Pause forever
    host = await load(w, limits=limits(1000))
    trace.records.clear()
    s = host.stream(["f"], info())
    src = Source(5, 600)
    fwd = await s.request(REQ + [("content-length", "3000")], src)
    with pytest.raises(LocalReplyInterrupt) as ei:
        await collect(fwd.body)
    reply = ei.value.reply
    assert (reply.status, reply.details) == (413, "request_payload_too_large")
    assert src.pulled == 2                      # nothing read past the chunk that crossed the limit
    await s.finish(LogInfo(status=413))
    lines = trace.lines("f")
    assert [l.rsplit(" ", 2)[1:] for l in lines if l.startswith("proxy_on_request_body")] == [["600", "0"], ["1200", "0"]]
    # The reply went out through the filter's response callback; teardown ran as usual.
    assert any(l.startswith("proxy_on_response_headers") for l in lines)
    assert teardown(lines) == ["proxy_on_done", "proxy_on_log", "proxy_on_delete"]
    assert host.filters["f"].failures == {}


async def test_response_body_buffered_past_the_limit_is_500(load, trace):
    w = Wat()
    w.on("proxy_on_response_body", "(i32.const 1)")
    host = await load(w, limits=limits(1000))
    trace.records.clear()
    s = host.stream(["f"], info())
    assert isinstance(await s.request(REQ, None), Forward)
    src = Source(5, 600)
    fwd = await s.response(200, [("content-length", "3000")], src)
    with pytest.raises(LocalReplyInterrupt) as ei:
        await collect(fwd.body)
    reply = ei.value.reply
    assert (reply.status, reply.details) == (500, "response_payload_too_large")
    assert ("content-type", "text/plain") in reply.headers
    assert src.pulled == 2
    await s.finish(LogInfo(status=500))
    assert teardown(trace.lines("f")) == ["proxy_on_done", "proxy_on_log", "proxy_on_delete"]


async def test_body_held_while_paused_in_headers_is_bounded_too(load, trace):
    # deliver_body_while_paused: the filter pauses its headers and keeps pausing the body.
    w = Wat()
    w.on("proxy_on_request_headers", "(i32.const 1)")
    w.on("proxy_on_request_body", "(i32.const 1)")
    host = await load(w, limits=limits(1000), deliver_body_while_paused=True)
    s = host.stream(["f"], info())
    src = Source(5, 600)
    out = await s.request(REQ + [("content-length", "3000")], src)
    assert isinstance(out, LocalReply) and (out.status, out.details) == (413, "request_payload_too_large")
    assert src.pulled == 2
    await s.finish(LogInfo(status=413))


async def test_buffering_up_to_the_limit_passes(load):
    w = Wat()
    w.on("proxy_on_request_body", "(if (result i32) (local.get $c) (then (i32.const 0)) (else (i32.const 1)))")
    host = await load(w, limits=limits(3000))
    s = host.stream(["f"], info())
    fwd = await s.request(REQ + [("content-length", "3000")], Source(5, 600))
    assert await collect(fwd.body) == b"x" * 3000       # exactly the limit: forwarded whole
    await s.finish(LogInfo())


async def test_set_buffer_bytes_cannot_grow_a_body_past_the_limit(load, trace):
    # Each body callback appends 8 MiB of guest memory: refused without copying it, and the
    # request ends with 413; the guest gets OK (the SDKs accept nothing else).
    w = Wat(pages=160)
    w.on("proxy_on_request_body",
         f"(call $log_num {w.s('append')} (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0) (i32.const {8 << 20})))"
         " (i32.const 0)")
    host = await load(w, limits=limits(1 << 20, memory_bytes=32 << 20))
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ + [("content-length", "100")], Source(1, 100))

    async def drain():
        with pytest.raises(LocalReplyInterrupt) as ei:
            await collect(fwd.body)
        return ei.value.reply
    reply, peak = await measured(drain())
    assert (reply.status, reply.details) == (413, "request_payload_too_large")
    assert "append 0" in trace.lines("f")
    assert peak < 1 << 20, peak                 # the 8 MiB were never copied out of the guest
    await s.finish(LogInfo())


async def test_set_buffer_bytes_within_the_limit_and_bad_pointer(load, trace):
    w = Wat()
    w.on("proxy_on_request_body",
         f"(call $log_num {w.s('append')} (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0) (i32.const 500)))"
         f"(call $log_num {w.s('bad')} (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const {2 << 16}) (i32.const 5000)))"
         " (i32.const 0)")
    host = await load(w, limits=limits(1000))
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ + [("content-length", "100")], Source(1, 100))
    assert len(await collect(fwd.body)) == 600
    # Over the limit AND outside memory: the bad pointer is reported first, nothing happens.
    assert [l for l in trace.lines("f") if l.split()[0] in ("append", "bad")] == ["append 0", "bad 6"]
    await s.finish(LogInfo())


async def test_watermark_stops_reading_until_the_filter_resumes(load, services, trace):
    """StopIterationAndWatermark (2) buffers up to the limit, then the host stops reading the
    body (no 413) until the filter resumes, as Envoy's flow control."""
    src = Source(10, 600)
    seen = []

    async def answer(*_):
        seen.append(src.pulled)
        return CallResponse(200, [], b"")
    services.clusters["c"] = answer
    w = Wat()
    w.extra.append("(global $go (mut i32) (i32.const 0)) (global $called (mut i32) (i32.const 0))")
    w.on("proxy_on_request_body",
         "(if (global.get $go) (then (return (i32.const 0))))"
         "(if (i32.and (i32.ge_u (local.get $b) (i32.const 1000)) (i32.eqz (global.get $called))) (then"
         "  (global.set $called (i32.const 1))"
         f"  (i32.store (i32.const {OUT + 16}) (local.get $a))"
         f"  (drop (call $proxy_http_call {w.s('c')} {w.s(CALL_HEADERS)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const {OUT + 12})))))"
         " (i32.const 2)")
    w.on("proxy_on_http_call_response",
         f"(drop (call $proxy_set_effective_context (i32.load (i32.const {OUT + 16}))))"
         "(global.set $go (i32.const 1))"
         "(drop (call $proxy_continue_stream (i32.const 0)))")
    host = await load(w, limits=limits(1000))
    s = host.stream(["f"], info())
    fwd = await s.request(REQ + [("content-length", "6000")], src)
    assert await asyncio.wait_for(collect(fwd.body), 10) == b"x" * 6000
    assert seen == [2]             # while the filter held 1200 bytes the host read nothing more
    await s.finish(LogInfo())


# -- header maps and properties: what filters may add ---------------------------------------------

def add_loop(w: Wat, call: str, n: int) -> str:
    """WAT: run `call` (a host call expression) n times, trace the sum of its statuses."""
    return ("(local $i i32) (local $sum i32)"
            "(loop $l"
            f" (local.set $sum (i32.add (local.get $sum) {call}))"
            " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
            f" (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))"
            f"(call $log_num {w.s('statuses')} (local.get $sum))")


def big_header_adder(n: int = 100, size: int = 60 * 1024, call: str = "proxy_add_header_map_value") -> Wat:
    w = Wat(pages=2)
    w.on("proxy_on_request_headers",
         add_loop(w, f"(call ${call} (i32.const 0) {w.s('x-big')} (i32.const 0) (i32.const {size}))", n)
         + " (i32.const 0)")
    return w


async def test_header_map_growth_is_bounded_and_fails_the_request(load, trace):
    host = await load(big_header_adder(100))            # 100 x 60 KiB = 6 MB asked for
    trace.records.clear()
    s = host.stream(["f"], info())
    out, peak = await measured(s.request(REQ, None))
    assert isinstance(out, LocalReply) and (out.status, out.details) == (503, "wasm_fail_stream")
    assert "statuses 0" in trace.lines("f")             # every add answered OK to the guest
    grown = s.request_headers.grown
    assert (1 << 20) - 61450 < grown <= 1 << 20         # it filled up to the bound, no further
    assert peak < 3 << 20, peak                         # the 1 MiB it holds, not the 6 MB asked
    await s.finish(LogInfo(status=503))
    f = host.filters["f"]
    assert f.failures == {("proxy_add_header_map_value", "host_limit"): 1}
    assert sum("host_limit" in r.getMessage() for r in trace.records) == 1     # logged once
    # No trap, no rebuild: the instance serves the next request (a client may have tipped it).
    assert f.rebuilds == 0
    assert teardown(trace.lines("f")) == ["proxy_on_done", "proxy_on_log", "proxy_on_delete"]


async def test_header_map_bound_under_fail_open_skips_the_filter(load):
    good = Wat()
    good.on("proxy_on_request_headers",
            f"(drop (call $proxy_add_header_map_value (i32.const 0) {good.s('x-good')} {good.s('1')})) (i32.const 0)")
    host = await load({"big": big_header_adder(100), "good": good}, failure_policy="fail_open")
    s = host.stream(["big", "good"], info())
    out = await s.request(REQ, None)
    assert isinstance(out, Forward) and ("x-good", "1") in out.headers
    await s.finish(LogInfo())
    assert host.filters["big"].failures == {("proxy_add_header_map_value", "host_limit"): 1}


async def test_replacing_one_header_over_and_over_is_not_growth(load, trace):
    # 1000 replaces of a 10 KiB value: 10 MB of calls, but the map only ever holds one.
    host = await load(big_header_adder(1000, 10 * 1024, "proxy_replace_header_map_value"))
    trace.records.clear()
    s = host.stream(["f"], info())
    out = await s.request(REQ, None)
    assert isinstance(out, Forward) and "statuses 0" in trace.lines("f")
    assert s.request_headers.grown == len("x-big") + 10 * 1024 + 10
    await s.finish(LogInfo())
    assert host.filters["f"].failures == {}


async def test_a_big_client_request_does_not_count_against_filters(load):
    # What the client sent (here 3 MB of headers) is not the filters' doing: only additions count.
    host = await load(big_header_adder(2, 1000))
    s = host.stream(["f"], info())
    out = await s.request(REQ + [(f"x-client-{i}", "v" * 1000) for i in range(3000)], None)
    assert isinstance(out, Forward)
    await s.finish(LogInfo())


def property_setter(n: int, distinct: bool, size: int = 1024, where: str = "proxy_on_request_headers") -> Wat:
    """Set n properties of `size` bytes: each under its own path (the loop index patched into
    it) or all under one path."""
    w = Wat(pages=2)
    key = 0x7000                                   # "p.NNNN": the index bytes written in the loop
    body = ("(local $i i32) (local $sum i32)"
            "(loop $l"
            f" (i32.store (i32.const {key}) (local.get $i))"
            f" (local.set $sum (i32.add (local.get $sum) (call $proxy_set_property (i32.const {key}) (i32.const {4 if distinct else 0})"
            f"   (i32.const 0) (i32.const {size}))))"
            " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
            f" (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))"
            f"(call $log_num {w.s('statuses')} (local.get $sum))")
    result = {"proxy_on_request_headers": " (i32.const 0)", "proxy_on_context_create": ""}.get(where, " (i32.const 1)")
    w.on(where, body + result)
    return w


async def test_property_growth_per_request_is_bounded(load, trace):
    host = await load(property_setter(2000, distinct=True))        # 2000 x 1 KiB
    trace.records.clear()
    s = host.stream(["f"], info())
    out = await s.request(REQ, None)
    assert isinstance(out, LocalReply) and out.status == 503
    assert "statuses 0" in trace.lines("f")
    assert s.custom.nbytes <= 1 << 20 and len(s.custom) < 2000
    await s.finish(LogInfo())
    assert host.filters["f"].failures == {("proxy_set_property", "host_limit"): 1}
    # Overwriting one path is not growth.
    host2 = await load(property_setter(2000, distinct=False), name="g")
    s = host2.stream(["g"], info())
    assert isinstance(await s.request(REQ, None), Forward)
    await s.finish(LogInfo())


@pytest.mark.parametrize("policy,expect", [("fail_closed", LocalReply), ("fail_open", Forward)])
async def test_property_growth_while_the_context_opens_gets_the_failure_policy(load, trace, policy, expect):
    # proxy_on_context_create runs before the chain has recorded the context: the refused edit
    # must still find the filter's place in the chain (it once raised inside the host call).
    host = await load(property_setter(2000, distinct=True, where="proxy_on_context_create"),
                      failure_policy=policy)
    s = host.stream(["f"], info())
    out = await s.request(REQ, None)
    assert isinstance(out, expect)
    if expect is LocalReply:
        assert out.status == 503
    await s.finish(LogInfo())
    f = host.filters["f"]
    # Once for the root context (it opens through the same callback at load), once for the request's.
    assert f.failures == {("proxy_set_property", "host_limit"): 2}
    assert f.host_errors == 0                     # refused cleanly, not a host-function error


async def test_property_growth_in_a_root_context_is_refused_and_logged_once(load, trace):
    host = await load(property_setter(2000, distinct=True, where="proxy_on_configure"))
    f = host.filters["f"]
    assert "statuses 0" in trace.lines("f")                 # the filter loaded (configure returned 1)
    assert f.failures == {("proxy_set_property", "host_limit"): 1}
    assert f.root.props.facts.custom.nbytes <= 1 << 20


# -- callouts: max_callout_bytes per instance -----------------------------------------------------

def dispatcher(n: int, body_size: int) -> Wat:
    """Each request dispatches n calls to cluster "c" with a body_size-byte body, tracing each
    status; every response is traced as "counts <headers> <body> <trailers>" and "code <status>"."""
    w = Wat(pages=2)
    calls = "".join(
        f"(call $log_num {w.s('dispatch')} (call $proxy_http_call {w.s('c')} {w.s(CALL_HEADERS)} (i32.const 0) (i32.const {body_size})"
        f" (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const {OUT})))" for _ in range(n))
    w.on("proxy_on_request_headers", calls + " (i32.const 0)")
    w.on("proxy_on_http_call_response",
         f"(call $trace {w.s('counts')} (i32.const 3) (local.get $c) (local.get $d) (local.get $e))"
         f"(drop (call $proxy_get_status (i32.const {OUT + 20}) (i32.const {OUT}) (i32.const {OUT + 4})))"
         f"(call $log_num {w.s('code')} (i32.load (i32.const {OUT + 20})))")
    return w


def callout_limits(max_callout_bytes: int) -> FilterLimits:
    return FilterLimits(memory_bytes=16 << 20, callback_ms=200, max_callout_bytes=max_callout_bytes)


async def test_callout_request_bytes_in_flight_are_bounded(load, services, trace):
    go = asyncio.Event()

    async def held(*_):
        await go.wait()
        return CallResponse(200, [], b"ok")
    services.clusters["c"] = held
    # Each call holds its 3000-byte body and ~30 bytes of headers until it ends: 3 fit in 10,000.
    host = await load(dispatcher(4, 3000), limits=callout_limits(10_000))
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    assert [l for l in trace.lines("f") if l.startswith("dispatch")] == ["dispatch 0"] * 3 + ["dispatch 10"]
    f = host.filters["f"]
    assert f.failures == {("proxy_http_call", "callout_limit"): 1}
    await until(lambda: len(services.calls) == 3)
    assert 9000 < f._callout_bytes <= 10_000
    go.set()                                               # answered and delivered: bytes released
    await until(lambda: f._callout_bytes == 0 and not f._calls)
    assert trace.lines("f").count("counts 1 2 0") == 3          # :status, "ok"
    await s.finish(LogInfo())
    # Room again: the next request's calls go out (one still refused: 4 x 3030 > 10,000).
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    assert [l for l in trace.lines("f") if l.startswith("dispatch")] == ["dispatch 0"] * 3 + ["dispatch 10"]
    await until(lambda: f._callout_bytes == 0)
    await s.finish(LogInfo())


async def test_callout_response_over_the_budget_is_a_failed_call(load, services, trace):
    services.clusters["c"] = CallResponse(200, [], b"r" * 5000)
    host = await load(dispatcher(1, 10), limits=callout_limits(4000))
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    f = host.filters["f"]
    await until(lambda: not f._calls)
    # Delivered as Envoy delivers an overflowing callout response: (0, 0, 0), BrokenConnection.
    assert "counts 0 0 0" in trace.lines("f") and "code 11" in trace.lines("f")
    assert f._callout_bytes == 0
    await s.finish(LogInfo())


async def test_cancelled_callouts_release_their_bytes(load, services):
    async def hang(*_):
        await asyncio.sleep(30)
    services.clusters["c"] = hang
    host = await load(dispatcher(2, 1000), limits=callout_limits(10_000))
    f = host.filters["f"]
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    assert f._callout_bytes > 2000
    await s.finish(LogInfo())                  # the request ends: its calls are cancelled
    assert f._callout_bytes == 0 and f._call_bytes == {}
