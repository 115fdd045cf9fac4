"""Start sequence and per-request callback order, through the FilterHost API (§2.3, §2.4)."""
from __future__ import annotations

from abi.api import Forward, LocalReply, LogInfo

from abi_helpers import REQ, body_iter, collect, info
from abi_wat import Wat


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
