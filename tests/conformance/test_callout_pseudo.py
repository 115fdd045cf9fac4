"""proxy_http_call with a pseudo-header given twice — a filter that sets `:path` (and
`:method`, `:authority`) and then copies the request's own headers, pseudo-headers included,
as Rust/Go filters do when forwarding a request to an auth service. The first occurrence is
the filter's choice and is used; a warning names the filter once."""
from __future__ import annotations

import logging

from abi.pairs import serialize
from tests.abi.abi_wat import OUT, Wat
from tests.conformance.probe import filter_entry, probe_gateway

CALL_HEADERS = serialize([
    (b":method", b"GET"), (b":path", b"/callout/chosen"), (b":authority", b"callout"),
    # ... then the request's own headers, copied:
    (b":method", b"POST"), (b":path", b"/callout/original"), (b":authority", b"client.example"),
    (b"x-copied", b"1"), (b"x-copied", b"2"),
])


def caller_wat(tmp_path) -> str:
    """Dispatch CALL_HEADERS to cluster "callout" and pause; resume when the answer comes."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {OUT + 16}) (local.get $a))"
         f"(if (call $proxy_http_call {w.s('callout')} {w.s(CALL_HEADERS)} (i32.const 0) (i32.const 0)"
         f" (i32.const 0) (i32.const 0) (i32.const 10000) (i32.const {OUT + 12})) (then unreachable))"
         " (i32.const 1)")
    w.on("proxy_on_http_call_response",
         f"(drop (call $proxy_set_effective_context (i32.load (i32.const {OUT + 16}))))"
         "(drop (call $proxy_continue_stream (i32.const 0)))")
    path = tmp_path / "caller.wat"
    path.write_text(w.render())
    return str(path)


async def test_http_call_repeated_pseudo_header_first_wins(tmp_path, upstream, caplog):
    caplog.set_level(logging.WARNING)
    f = filter_entry("caller", caller_wat(tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        for _ in range(2):
            async with s.get(gw.url("/front")) as r:
                assert r.status == 200
    calls = upstream.callouts()
    assert len(calls) == 2
    for call in calls:
        assert (call.method, call.path) == ("GET", "/callout/chosen")
        assert call.first("host") == "callout"
        assert call.all("x-copied") == ["1", "2"]        # ordinary headers keep every copy
    warnings = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    # one line per filter and pseudo-header, not one per call
    assert sorted(warnings) == sorted(
        f'filter "caller": http_call to callout gives {name} more than once; the first ({kept!r}) is used'
        for name, kept in ((":method", "GET"), (":path", "/callout/chosen"), (":authority", "callout")))
