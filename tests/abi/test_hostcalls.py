"""Host functions as the SDKs use them: statuses, empty encodings, signed arguments."""
from __future__ import annotations

import struct

import pytest

from abi.api import Forward, LocalReply, LogInfo
from abi.pairs import serialize

from abi_helpers import REQ, body_iter, collect, info
from abi_wat import LOG_OUT, OUT, Wat, out_ptr_size, status

# Both crossings: the C one (_crossing.c: guest-memory helpers, the host functions' error
# wrapper) and the Python fallback (conftest.py).
pytestmark = pytest.mark.usefixtures("crossing_impl")

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"


async def run_request(host, headers=REQ, body=None, name="f"):
    s = host.stream([name], info())
    out = await s.request(headers, body)
    return s, out


async def test_plugin_configuration_read_with_usize_max(load, trace):
    # Rust get_plugin_configuration(): proxy_get_buffer_bytes(7, 0, usize::MAX) -> max_size -1.
    w = Wat()
    w.on("proxy_on_configure", status(w, "st", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {O})")
         + LOG_OUT + " (i32.const 1)")
    await load(w, configuration=b'{"k": "value"}')
    assert trace.lines("f")[-2:] == ["st 0", '{"k": "value"}']


async def test_plugin_configuration_only_during_configure(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "cfg", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {O})")
         + status(w, "vm", f"(call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) {O})")
         + LOG_OUT
         + status(w, "body", f"(call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {O})")
         + status(w, "bad", f"(call $proxy_get_buffer_bytes (i32.const 10) (i32.const 0) (i32.const -1) {O})")
         + " (i32.const 0)")
    host = await load(w, configuration=b"abc", vm_configuration=b"vmcfg")
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:] == ["cfg 1", "vm 0", "vmcfg", "body 1", "bad 2"]


async def test_empty_map_is_null_pointer_and_zero_size(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {OUT}) (i32.const 77)) (i32.store (i32.const {OUT + 4}) (i32.const 77))"
         + status(w, "st", f"(call $proxy_get_header_map_pairs (i32.const 1) {O})")
         + out_ptr_size(w, "trailers")
         + status(w, "resp", f"(call $proxy_get_header_map_pairs (i32.const 2) {O})")
         + out_ptr_size(w, "resp-before")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:] == ["st 0", "trailers 0 0", "resp 0", "resp-before 0 0"]


async def test_header_pairs_serialization_includes_pseudo_headers(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "st", f"(call $proxy_get_header_map_pairs (i32.const 0) {O})") + LOG_OUT + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    expected = serialize([(k.encode(), v.encode()) for k, v in REQ])
    assert trace.lines("f")[1] == "st 0"
    assert trace.lines("f")[2] == expected.decode()


async def test_header_value_get_add_replace_remove(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "miss", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-none')} {O})")
         + status(w, "hit", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('X-A')} {O})") + LOG_OUT
         + status(w, "add", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('X-New')} {w.s('n1')})")
         + status(w, "add2", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-new')} {w.s('n2')})")
         + status(w, "rep", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-a')} {w.s('2')})")
         + status(w, "rm", f"(call $proxy_remove_header_map_value (i32.const 0) {w.s('user-agent')})")
         + status(w, "rm-absent", f"(call $proxy_remove_header_map_value (i32.const 0) {w.s('nope')})")
         + status(w, "path", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s(':path')} {w.s('/rewritten')})")
         + status(w, "empty", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-empty')} (i32.const 0) (i32.const 0))")
         + status(w, "get-empty", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-empty')} {O})")
         + out_ptr_size(w, "empty-out")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    _, fwd = await run_request(host)
    assert trace.lines("f")[1:] == ["miss 1", "hit 0", "1", "add 0", "add2 0", "rep 0", "rm 0",
                                    "rm-absent 0", "path 0", "empty 0", "get-empty 0", "empty-out 0 0"]
    assert fwd.headers == [(":method", "GET"), (":path", "/rewritten"), (":authority", "example.com"),
                           (":scheme", "http"), ("x-a", "2"), ("x-new", "n1"), ("x-new", "n2"),
                           ("x-empty", "")]


async def test_header_edits_duplicates_accounting_and_validity(load, trace):
    # On both crossings (the C header_edit, the Python _header_edit): a replace keeps the first
    # occurrence's place and drops the later ones, the map's ``grown`` counts the serialized
    # bytes edits added (net), an invalid name or value is OK but never reaches the wire.
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "rep", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('X-D')} {w.s('v')})")
         + status(w, "add", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-n')} {w.s('v2')})")
         + status(w, "bad-name", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-bad name')} {w.s('v')})")
         + status(w, "bad-value", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-n')} {w.s('a' + chr(10) + 'b')})")
         + status(w, "pseudo", f"(call $proxy_replace_header_map_value (i32.const 1) {w.s(':x')} {w.s('t')})")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s, fwd = await run_request(host, headers=REQ + [("x-d", "1"), ("x-t", "t"), ("x-d", "22"), ("x-d", "333")])
    assert trace.lines("f")[1:] == ["rep 0", "add 0", "bad-name 0", "bad-value 0", "pseudo 2"]
    assert fwd.headers == REQ + [("x-d", "v"), ("x-t", "t")]     # x-n's new value is unsafe
    m = s.request_headers
    assert m.items[-3:] == [("x-t", "t"), ("x-n", "a\nb"), ("x-bad name", "v")]
    # replace x-d: -(3+2+10) - (3+3+10) for the dropped ones; add x-n: 3+2+10;
    # x-bad name: 10+1+10; x-n's value 2 -> 3 bytes: +1
    assert m.grown == -31 + 15 + 21 + 1 and m.unsafe


async def test_set_header_map_pairs_replaces_all_and_lowercases(load):
    w = Wat()
    data = serialize([(b":method", b"POST"), (b":path", b"/p"), (b":authority", b"h"), (b"X-Up", b"v")])
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_set_header_map_pairs (i32.const 0) {w.s(data)})) (i32.const 0)")
    host = await load(w)
    _, fwd = await run_request(host)
    assert fwd.headers == [(":method", "POST"), (":path", "/p"), (":authority", "h"), ("x-up", "v")]


async def test_unavailable_map_writes_are_bad_argument(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "trailers", f"(call $proxy_add_header_map_value (i32.const 1) {w.s('a')} {w.s('b')})")
         + status(w, "callresp", f"(call $proxy_add_header_map_value (i32.const 6) {w.s('a')} {w.s('b')})")
         + status(w, "badtype", f"(call $proxy_add_header_map_value (i32.const 8) {w.s('a')} {w.s('b')})")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:] == ["trailers 2", "callresp 2", "badtype 2"]


async def test_body_replace_prepend_append(load, trace):
    w = Wat()
    # Rust: set_http_request_body(0, usize::MAX, b"X") replaces; (0,0) prepends; (usize::MAX,0) appends
    w.on("proxy_on_request_body",
         "(if (local.get $c) (then "
         + status(w, "rep", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {w.s('XY')})")
         + status(w, "pre", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 0) {w.s('<')})")
         + status(w, "app", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) {w.s('>')})")
         + status(w, "mid", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 1) (i32.const 1) {w.s('!')})")
         + status(w, "get", f"(call $proxy_get_buffer_bytes (i32.const 0) (i32.const 1) (i32.const 2) {O})") + LOG_OUT
         + ") (else (return (i32.const 1)))) (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s, fwd = await run_request(host, body=body_iter(b"hello ", b"world"))
    assert await collect(fwd.body) == b"<XY>"
    assert trace.lines("f")[-6:] == ["rep 0", "pre 0", "app 0", "mid 2", "get 0", "XY"]


async def test_pause_in_body_buffers_cumulative_size(load, trace):
    w = Wat()
    w.on("proxy_on_request_body", w.trace("body", 3) + " (i32.xor (local.get $c) (i32.const 1))")
    host = await load(w)
    trace.records.clear()
    s, fwd = await run_request(host, REQ + [("content-length", "6")], body_iter(b"aa", b"bbb", b"c"))
    chunks = [c async for c in fwd.body]
    assert chunks == [b"aabbbc"]
    assert [l for l in trace.lines("f") if l.startswith("body")] == ["body 2 2 0", "body 2 5 0", "body 2 6 1"]


async def test_properties_envoy_encoding(load, trace):
    w = Wat()
    body = ""
    for label, path in [("path", b"request\0path"), ("url_path", b"request\0url_path"),
                        ("method", b"request\0method"), ("host", b"request\0host"),
                        ("ua", b"request\0headers\0user-agent"), ("plugin", b"plugin_name"),
                        ("srcaddr", b"source\0address"), ("query", b"request\0query"),
                        ("proto", b"request\0protocol"), ("route", b"xds\0route_name")]:
        body += status(w, label, f"(call $proxy_get_property {w.s(path)} {O})") + LOG_OUT
    nope, mykey = w.s(b"request\0nope"), w.s(b"my\0key")
    body += status(w, "missing", f"(call $proxy_get_property {nope} {O})")
    body += status(w, "set", f"(call $proxy_set_property {mykey} {w.s('val')})")
    body += status(w, "get-set", f"(call $proxy_get_property {mykey} {O})") + LOG_OUT
    body += status(w, "root-id", f"(call $proxy_get_property {w.s(b'plugin_root_id')} {O})") + out_ptr_size(w, "root-id-out")
    w.on("proxy_on_request_headers", body + " (i32.const 0)")
    host = await load(w, name="props")
    trace.records.clear()
    await run_request(host, name="props")
    assert trace.lines("props")[1:] == [
        "path 0", "/hello?x=1", "url_path 0", "/hello", "method 0", "GET", "host 0", "example.com",
        "ua 0", "t", "plugin 0", "props", "srcaddr 0", "127.0.0.1:40000", "query 0", "x=1",
        "proto 0", "HTTP/1.1", "route 0", "r1", "missing 1", "set 0", "get-set 0", "val",
        "root-id 0", "root-id-out 0 0"]


async def test_numeric_properties_are_8_byte_little_endian(load, trace, engine):
    w = Wat()
    code, port = w.s(b"response\0code"), w.s(b"source\0port")
    w.on("proxy_on_log",
         status(w, "code", f"(call $proxy_get_property {code} {O})")
         + f"(call $trace {w.s('v')} (i32.const 2) (i32.load (i32.load (i32.const {OUT}))) (i32.load (i32.const {OUT + 4})) (i32.const 0))"
         + status(w, "port", f"(call $proxy_get_property {port} {O})")
         + f"(call $trace {w.s('v')} (i32.const 2) (i32.load (i32.load (i32.const {OUT}))) (i32.load (i32.const {OUT + 4})) (i32.const 0))")
    host = await load(w)
    s, _ = await run_request(host)
    await s.response(201, [], None)
    trace.records.clear()
    await s.finish(LogInfo(status=201))
    assert trace.lines("f")[1:5] == ["code 0", "v 201 8", "port 0", "v 40000 8"]


async def test_local_response_from_request_headers(load, trace):
    # Rust send_http_response(403, [("x-why","no")], Some(b"denied")): details (0,0), grpc -1.
    w = Wat()
    hdrs = serialize([(b"X-Why", b"no")])
    w.on("proxy_on_request_headers",
         status(w, "slr", f"(call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) {w.s('denied')} {w.s(hdrs)} (i32.const -1))")
         + " (i32.const 1)")
    host = await load(w)
    trace.records.clear()
    s, out = await run_request(host, body=body_iter(b"never read"))
    assert isinstance(out, LocalReply)
    assert out.status == 403 and out.body == b"denied"
    assert ("x-why", "no") in out.headers and ("content-type", "text/plain") in out.headers
    await s.finish(LogInfo(status=403))
    # The replier sees its own reply's response headers (Envoy, verified trace §2.4).
    assert trace.lines("f") == ["proxy_on_context_create 2 1", "slr 0",
                                "proxy_on_response_headers 2 3 0", "proxy_on_response_body 2 6 1",
                                "proxy_on_done 2", "proxy_on_log 2", "proxy_on_delete 2"]


async def test_local_response_skips_later_filters(load, trace):
    a, b = Wat(), Wat()
    a.on("proxy_on_request_headers",
         f"(drop (call $proxy_send_local_response (i32.const 401) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1))) (i32.const 0)")
    host = await load({"a": a, "b": b})
    trace.records.clear()
    s = host.stream(["a", "b"], info())
    out = await s.request(REQ, None)
    assert isinstance(out, LocalReply) and out.status == 401 and out.body == b""
    await s.finish(LogInfo(status=401))
    assert trace.lines("b") == []


async def test_grpc_request_gets_grpc_local_reply(load):
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_send_local_response (i32.const 200) (i32.const 0) (i32.const 0) {w.s('nope')} (i32.const 0) (i32.const 0) (i32.const 7))) (i32.const 1)")
    host = await load(w)
    s, out = await run_request(host, headers=REQ + [("content-type", "application/grpc")])
    assert out.status == 200 and out.body == b""
    assert ("grpc-status", "7") in out.headers and ("grpc-message", "nope") in out.headers


async def test_log_levels_and_bad_level(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "lvl9", f"(call $proxy_log (i32.const 9) {w.s('x')})")
         + status(w, "getlvl", f"(call $proxy_get_log_level (i32.const {OUT}))")
         + f"(call $log_num {w.s('level')} (i32.load (i32.const {OUT})))"
         + f"(drop (call $proxy_log (i32.const 4) {w.s('an error')}))"
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:] == ["lvl9 2", "getlvl 0", "level 0", "an error"]
    assert trace.records[-1].levelname == "ERROR"


async def test_time_and_foreign_and_grpc_statuses(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "time", f"(call $proxy_get_current_time_nanoseconds (i32.const {OUT}))")
         + status(w, "foreign", f"(call $proxy_call_foreign_function {w.s('no_such_function')} {w.s('x')} {O})")
         + status(w, "grpc", f"(call $proxy_grpc_call {w.s('c')} {w.s('s')} {w.s('m')} (i32.const 0) (i32.const 0) {w.s('x')} (i32.const 100) (i32.const {OUT + 8}))")
         + status(w, "grpc_stream", f"(call $proxy_grpc_stream {w.s('c')} {w.s('s')} {w.s('m')} (i32.const 0) (i32.const 0) (i32.const {OUT + 8}))")
         + status(w, "grpc_send", f"(call $proxy_grpc_send (i32.const 1) {w.s('x')} (i32.const 0))")
         + status(w, "grpc_cancel", "(call $proxy_grpc_cancel (i32.const 1))")
         + status(w, "grpc_close", "(call $proxy_grpc_close (i32.const 1))")
         + status(w, "done", "(call $proxy_done)")
         + status(w, "eff-bad", "(call $proxy_set_effective_context (i32.const 999))")
         + status(w, "eff-root", "(call $proxy_set_effective_context (i32.const 1))")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    # Rust: grpc_call/stream accept OK/PARSE_FAILURE/INTERNAL_FAILURE; send/cancel/close NOT_FOUND.
    # No gRPC cluster "c": PARSE_FAILURE, as Envoy (abi/grpc_call.py); sending on token 1 (odd:
    # a call's) BAD_ARGUMENT, as Envoy's grpcSend.
    assert trace.lines("f")[1:] == ["time 0", "foreign 1", "grpc 4", "grpc_stream 4",
                                    "grpc_send 2", "grpc_cancel 1", "grpc_close 1", "done 1",
                                    "eff-bad 2", "eff-root 0"]


async def test_foreign_set_shared_data_ttl(load, trace):
    """wasmgate.set_shared_data_ttl (abi/foreign.py): the write's status comes back in the
    result (the call itself is OK), malformed arguments are BAD_ARGUMENT, and the entry expires."""
    from abi.foreign import SET_SHARED_DATA_TTL
    from abi.shared_store import LocalStore

    class Clock:
        now = 10**9

        def __call__(self):
            return self.now

    def args(cas: int, ttl: int, key: bytes, value: bytes) -> bytes:
        return struct.pack("<IQI", cas, ttl, len(key)) + key + value

    def foreign(label: str, data: bytes) -> str:
        return status(w, label, f"(call $proxy_call_foreign_function {w.s(SET_SHARED_DATA_TTL)} {w.s(data)} {O})")

    result = status(w := Wat(), "result", f"(i32.load (i32.load (i32.const {OUT})))")
    w.on("proxy_on_request_headers",
         foreign("set", args(0, 5000, b"k", b"v1")) + result
         + foreign("create-again", args(0xFFFFFFFF, 5000, b"k", b"v2")) + result
         + foreign("short", b"\0" * 15)
         + foreign("key-past-end", struct.pack("<IQI", 0, 1, 9) + b"k")
         + status(w, "get", f"(call $proxy_get_shared_data {w.s('k')} {O} (i32.const {OUT + 8}))") + LOG_OUT
         + " (i32.const 0)")
    clock = Clock()
    store = LocalStore(clock=clock)
    host = await load(w, store=store)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:] == ["set 0", "result 0", "create-again 0", "result 8", "short 2",
                                    "key-past-end 2", "get 0", "v1"]
    clock.now += 4999
    assert store.get(b"k")[0] == b"v1"
    clock.now += 1
    assert store.get(b"k") is None


async def test_foreign_ttl_write_needs_the_shared_data_capability(load, trace):
    """wasmgate.set_shared_data_ttl writes shared data: ``foreign_functions`` alone must not let
    a filter do what a missing ``shared_data`` denies. The result holds INTERNAL_FAILURE (a
    denied proxy_set_shared_data's answer), nothing is written, the denial is counted as
    shared_data; another foreign function still runs, and with both groups the write lands."""
    from abi.foreign import SET_SHARED_DATA_TTL
    from abi.shared_store import LocalStore

    ttl_args = struct.pack("<IQI", 0, 60 * 10**9, 1) + b"k" + b"v"
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "ttl", f"(call $proxy_call_foreign_function {w.s(SET_SHARED_DATA_TTL)} {w.s(ttl_args)} {O})")
         + status(w, "result", f"(i32.load (i32.load (i32.const {OUT})))")
         + status(w, "compress", f"(call $proxy_call_foreign_function {w.s('compress')} {w.s(b'abc')} {O})")
         + " (i32.const 0)")
    denial = (f'{SET_SHARED_DATA_TTL} denied: capability "shared_data" not granted (logged once; '
              "counted in wasmgate_filter_denied_calls_total)")
    for granted, seen, stored in (({"log", "foreign_functions"}, [denial, "ttl 0", "result 10"], None),
                                  ({"log", "foreign_functions", "shared_data"}, ["ttl 0", "result 0"], b"v")):
        store = LocalStore()
        host = await load(w, store=store, capabilities=frozenset(granted))
        trace.records.clear()
        await run_request(host)
        assert trace.lines("f")[1:] == seen + ["compress 0"]
        assert (store.get(b"k") or (None,))[0] == stored
        assert host.stats()["f"]["denied_calls"] == ({} if stored else {"shared_data": 1})


async def test_foreign_clear_route_cache_marks_the_request_and_uncompress_bounds(load, trace):
    """Envoy's `clear_route_cache` foreign function marks the request for re-routing
    (Chain.route_cache_cleared, read by the gateway) and is a no-op outside a request;
    `uncompress` ignores bytes after the stream (zlib's uncompress()) and refuses output the
    filter's memory could not hold."""
    import zlib
    bomb = zlib.compress(b"\0" * (20 << 20))          # 20 MiB of zeros in ~20 KiB
    w = Wat()
    w.on("proxy_on_configure",
         status(w, "root-crc", f"(call $proxy_call_foreign_function {w.s('clear_route_cache')} (i32.const 0) (i32.const 0) {O})")
         + " (i32.const 1)")
    w.on("proxy_on_request_headers",
         status(w, "crc", f"(call $proxy_call_foreign_function {w.s('clear_route_cache')} (i32.const 0) (i32.const 0) {O})")
         + status(w, "trailing", f"(call $proxy_call_foreign_function {w.s('uncompress')} {w.s(zlib.compress(b'abc') + b'junk')} {O})")
         + LOG_OUT + " (i32.const 0)")
    w.on("proxy_on_response_headers",
         status(w, "bomb", f"(call $proxy_call_foreign_function {w.s('uncompress')} (i32.const {0x20000}) (i32.const {len(bomb)}) {O})")
         + " (i32.const 0)")
    w.pages = 4
    bomb_wat = "".join("\\%02x" % b for b in bomb)
    w.extra.append(f'(data (i32.const {0x20000}) "{bomb_wat}")')   # above the strings, below the heap's reach
    host = await load(w)                               # memory_bytes 16 MiB (the fixture's)
    assert trace.lines("f")[-1] == "root-crc 0"
    trace.records.clear()
    s, fwd = await run_request(host)
    assert s.route_cache_cleared is True
    await s.response(200, [], None)
    assert trace.lines("f")[1:] == ["crc 0", "trailing 0", "abc", "bomb 10"]
    untouched = host.stream(["f"], info())
    assert untouched.route_cache_cleared is False


async def test_out_of_bounds_pointers_give_invalid_memory_access(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "log", "(call $proxy_log (i32.const 2) (i32.const -16) (i32.const 64))")
         + status(w, "pairs-out", "(call $proxy_get_header_map_pairs (i32.const 0) (i32.const -2) (i32.const 0))")
         + status(w, "value-key", f"(call $proxy_get_header_map_value (i32.const 0) (i32.const 0x7ffffff0) (i32.const 100) {O})")
         + status(w, "huge-len", f"(call $proxy_add_header_map_value (i32.const 0) (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1))")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s, fwd = await run_request(host)
    assert isinstance(fwd, Forward)
    assert trace.lines("f")[1:] == ["log 6", "pairs-out 6", "value-key 6", "huge-len 6"]


async def test_header_injection_never_reaches_the_seam(load, trace):
    # Envoy answers OK (the Rust SDK panics on anything else); the filter reads back what it
    # wrote, but the entries never leave the chain.
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "crlf", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-a')} {w.s('v' + chr(13) + chr(10) + 'x-evil: 1')})")
         + status(w, "nul", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-b')} {w.s(b'a' + bytes(1) + b'b')})")
         + status(w, "name", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('bad name')} {w.s('v')})")
         + status(w, "tab-ok", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-tab')} {w.s('a' + chr(9) + 'b')})")
         + status(w, "readback", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-b')} {O})")
         + out_ptr_size(w, "rb")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    _, fwd = await run_request(host)
    lines = trace.lines("f")
    assert lines[1:6] == ["crlf 0", "nul 0", "name 0", "tab-ok 0", "readback 0"]
    assert lines[6].endswith(" 3")
    assert fwd.headers == REQ + [("x-tab", "a\tb")]


async def test_invalid_pairs_and_local_reply_headers_never_reach_the_seam(load):
    w = Wat()
    bad = serialize([(b"ok", b"1"), (b"x", bytes([10])), (b"Also-Ok", b"2")])
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_send_local_response (i32.const 401) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) {w.s(bad)} (i32.const -1))) (i32.const 1)")
    host = await load(w)
    _, out = await run_request(host)
    assert isinstance(out, LocalReply) and out.headers == [("ok", "1"), ("also-ok", "2")]
