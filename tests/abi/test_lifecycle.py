"""Start sequence and per-request callback order, through the FilterHost API (§2.3, §2.4)."""
from __future__ import annotations

import pytest

from abi.api import Forward, LocalReply, LogInfo

from abi_helpers import REQ, body_iter, collect, info
from abi_wat import Wat

# The chain's behaviour on both filter call paths: NativeFilter's C and Filter's Python.
pytestmark = pytest.mark.usefixtures("crossing_impl")


async def test_start_sequence_and_request_order(load, trace):
    host = await load(Wat())
    assert trace.lines("f") == ["proxy_on_context_create 1 0", "proxy_on_vm_start 1 0",
                                "proxy_on_configure 1 0"]
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ, None)
    assert isinstance(fwd, Forward) and fwd.headers == REQ and fwd.body is None
    resp = await s.response(200, [("content-length", "4")], body_iter(b"ab", b"cd"))
    assert isinstance(resp, Forward)
    assert resp.headers[0] == (":status", "200")
    assert await collect(resp.body) == b"abcd"
    await s.finish(LogInfo(status=200))
    assert trace.lines("f") == [
        "proxy_on_context_create 2 1", "proxy_on_request_headers 2 6 1",
        "proxy_on_response_headers 2 2 0", "proxy_on_response_body 2 2 0",
        "proxy_on_response_body 2 2 1",
        "proxy_on_done 2", "proxy_on_log 2", "proxy_on_delete 2"]


async def test_body_without_content_length_ends_with_empty_chunk(load, trace):
    # HTTP/1 chunked: every chunk as it arrives, then end_of_stream on an empty one (Envoy).
    host = await load(Wat())
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ, body_iter(b"abc", b"de"))
    assert await collect(fwd.body) == b"abcde"
    assert [l for l in trace.lines("f") if "body" in l] == [
        "proxy_on_request_body 2 3 0", "proxy_on_request_body 2 2 0", "proxy_on_request_body 2 0 1"]


async def test_root_teardown_waits_for_proxy_done(load, trace):
    # on_done(root) answers false; the plugin finishes on a later tick with proxy_done; only
    # then does the host call on_delete(root) (cpp-host pending_done_).
    from abi_wat import status
    w = Wat()
    w.on("proxy_on_done",
         w.trace("proxy_on_done", 1)
         + "(if (i32.eq (local.get $a) (i32.const 1)) (then "
         "(drop (call $proxy_set_tick_period_milliseconds (i32.const 5))) (return (i32.const 0))))"
         " (i32.const 1)")
    w.on("proxy_on_tick", w.trace("tick", 1) + status(w, "done", "(call $proxy_done)")
         + "(drop (call $proxy_set_tick_period_milliseconds (i32.const 0)))")
    host = await load(w)
    trace.records.clear()
    await host.close()
    assert trace.lines("f") == ["proxy_on_done 1", "tick 1", "done 0", "proxy_on_delete 1"]


async def test_context_ids_unique_and_per_filter(load, trace):
    host = await load({"a": Wat(), "b": Wat()})
    trace.records.clear()
    for _ in range(2):
        s = host.stream(["a", "b"], info())
        await s.request(REQ, None)
        await s.response(200, [], None)
        await s.finish(LogInfo())
    creates = [l for l in trace.lines("a") if l.startswith("proxy_on_context_create")]
    assert creates == ["proxy_on_context_create 2 1", "proxy_on_context_create 3 1"]
    # on_delete is always the last call for a context
    for name in ("a", "b"):
        lines = trace.lines(name)
        for cid in ("2", "3"):
            mine = [l for l in lines if l.split()[1:2] == [cid]]
            assert mine[-1] == f"proxy_on_delete {cid}"


async def test_trailers_both_directions(load, trace):
    from abi_helpers import TrailerBody
    from abi_wat import OUT, status
    w = Wat()
    w.on("proxy_on_request_trailers",
         w.trace("req_trailers", 2)
         + status(w, "get", f"(call $proxy_get_header_map_value (i32.const 1) {w.s('x-sum')} (i32.const {OUT}) (i32.const {OUT + 4}))")
         + f"(drop (call $proxy_add_header_map_value (i32.const 1) {w.s('x-added')} {w.s('1')})) (i32.const 0)")
    w.on("proxy_on_response_trailers",
         w.trace("resp_trailers", 2)
         + f"(drop (call $proxy_replace_header_map_value (i32.const 3) {w.s('grpc-status')} {w.s('0')})) (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ, TrailerBody([b"ab", b"c"], [("x-sum", "abc")]))
    assert await collect(fwd.body) == b"abc"
    assert fwd.body.trailers == [("x-sum", "abc"), ("x-added", "1")]
    resp = await s.response(200, [], TrailerBody([b"x"], [("grpc-status", "13")]))
    assert await collect(resp.body) == b"x"
    assert resp.body.trailers == [("grpc-status", "0")]
    await s.finish(LogInfo())
    lines = [l for l in trace.lines("f") if "body" in l or "trailers" in l or l.startswith("get")]
    # With trailers, no body callback carries end_of_stream: the trailers end the stream.
    assert lines == ["proxy_on_request_body 2 2 0", "proxy_on_request_body 2 1 0",
                     "req_trailers 2 1", "get 0",
                     "proxy_on_response_body 2 1 0", "resp_trailers 2 1"]


async def test_trailers_untouched_without_body_or_trailer_callbacks(load):
    from abi_helpers import TrailerBody
    w = Wat().without("proxy_on_request_body", "proxy_on_request_trailers")
    host = await load(w)
    s = host.stream(["f"], info())
    body = TrailerBody([b"ab"], [("x-t", "1")])
    fwd = await s.request(REQ, body)
    assert fwd.body is body                 # handed back untouched, trailers and all


async def test_trailers_paused_until_continue(load, trace):
    from abi_helpers import TrailerBody
    import asyncio
    w = Wat()
    w.on("proxy_on_request_trailers", "(i32.const 1)")
    w.on("proxy_on_tick", "(drop (call $proxy_set_effective_context (i32.const 2))) (drop (call $proxy_continue_stream (i32.const 0)))"
         "(drop (call $proxy_set_tick_period_milliseconds (i32.const 0)))")
    w.on("proxy_on_request_body", "(drop (call $proxy_set_tick_period_milliseconds (i32.const 20))) (i32.const 1)")
    host = await load(w)
    s = host.stream(["f"], info())
    fwd = await s.request(REQ, TrailerBody([b"ab"], [("x-t", "1")]))
    data = await asyncio.wait_for(collect(fwd.body), 2)
    assert data == b"ab" and fwd.body.trailers == [("x-t", "1")]


async def test_close_can_wait_for_streams_in_flight(load, trace):
    import asyncio
    host = await load(Wat())
    s = host.stream(["f"], info())
    await s.request(REQ, None)

    async def finish_later():
        await asyncio.sleep(0.05)
        await s.response(200, [], None)
        await s.finish(LogInfo())
    task = asyncio.ensure_future(finish_later())
    await host.close(wait_streams_s=2)
    await task
    lines = trace.lines("f")
    # the stream finished on a live instance before the root went away
    assert lines.index("proxy_on_delete 2") < lines.index("proxy_on_done 1")


async def test_finish_while_request_is_paused_ends_it(load, trace):
    # The client went away while a filter held the request: finish() tears the contexts
    # down and the paused request ends at once instead of calling into deleted contexts.
    import asyncio
    from abi.api import LocalReply
    w = Wat().on("proxy_on_request_headers", "(i32.const 1)")
    host = await load({"a": w, "b": Wat()})
    s = host.stream(["a", "b"], info())
    task = asyncio.ensure_future(s.request(REQ, None))
    await asyncio.sleep(0.01)
    await s.finish(LogInfo())
    out = await asyncio.wait_for(task, 1)
    assert isinstance(out, LocalReply) and out.details == "stream_finished"
    assert trace.lines("b")[3:] == []          # b never got a context for this request


async def test_content_length_zero_ends_stream_with_headers(load, trace):
    host = await load(Wat())
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await s.request(REQ + [("content-length", "0")], body_iter())
    resp = await s.response(200, [("content-length", "0")], body_iter())
    assert await collect(fwd.body) == b"" and await collect(resp.body) == b""
    assert [l for l in trace.lines("f") if "headers" in l or "body" in l] == [
        "proxy_on_request_headers 2 7 1", "proxy_on_response_headers 2 2 1"]
