"""Host functions on guest memory, on both crossings (C helpers and the Python fallback): the
header edits' key and value, write_result's statuses, and how many Python frames a header
edit costs on the C path."""
from __future__ import annotations

import gc
import os
import struct
import sys

import pytest

from abi.api import Forward, LogInfo

from abi_helpers import REQ, info
from abi_wat import OUT, Wat, out_ptr_size, status

pytestmark = pytest.mark.usefixtures("crossing_impl")

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"
FAR = "(i32.const 0x7ffffff0)"           # far outside the filter's 2 pages


async def request(host):
    s = host.stream(["f"], info())
    out = await s.request(REQ, None)
    await s.finish(LogInfo())
    return out


async def test_header_edit_key_and_value_as_the_abi_takes_them(load, trace):
    # The key lower-cased (ASCII only) and both latin-1; a zero-length string never reads
    # memory; a bad pointer answers INVALID_MEMORY_ACCESS (6) even for a map that cannot be
    # written (5: gRPC metadata outside a gRPC callback), which answers BAD_ARGUMENT (2) once
    # both strings are good.
    w = Wat()
    w.on("proxy_on_request_headers",
         status(w, "rep", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s(b'X-Caf-UPPER')} {w.s(b'caf' + bytes([0xE9]))})")
         + status(w, "get", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-caf-upper')} {O})")
         + out_ptr_size(w, "out")
         + status(w, "add-empty", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-empty')} {FAR} (i32.const 0))")
         + status(w, "bad-key", f"(call $proxy_replace_header_map_value (i32.const 0) {FAR} (i32.const 3) {w.s('v')})")
         + status(w, "bad-value", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-v')} (i32.const 131070) (i32.const 3))")
         + status(w, "last-bytes", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-last')} (i32.const 131070) (i32.const 2))")
         + status(w, "map5-bad", f"(call $proxy_replace_header_map_value (i32.const 5) {FAR} (i32.const 3) {w.s('v')})")
         + status(w, "map5", f"(call $proxy_replace_header_map_value (i32.const 5) {w.s('x-a')} {w.s('v')})")
         + status(w, "map9", f"(call $proxy_replace_header_map_value (i32.const 9) {FAR} (i32.const 3) {w.s('v')})")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    fwd = await request(host)
    lines = trace.lines("f")[1:]
    assert lines[:2] == ["rep 0", "get 0"] and lines[2].endswith(" 4")
    assert lines[3:10] == ["add-empty 0", "bad-key 6", "bad-value 6", "last-bytes 0",
                         "map5-bad 6", "map5 2", "map9 2"]
    assert isinstance(fwd, Forward)
    # x-last (two NULs) is stored (OK, as Envoy) but never reaches the wire
    assert fwd.headers == REQ + [("x-caf-upper", "caf\xe9"), ("x-empty", "")]


def _allocator(body: str) -> str:
    return f'(func (export "proxy_on_memory_allocate") (param $n i32) (result i32) {body})'


def _asking_allocator(w: Wat, nested: str) -> None:
    """An allocator that first makes the host call ``nested`` (traced as "nested <status>") and
    then answers 0x10000; once $depth is set to 2, it answers 0."""
    w.extra.append("(global $depth (mut i32) (i32.const 0))")
    w.extra.append(_allocator(
        "(if (i32.eqz (global.get $depth)) (then"
        "  (global.set $depth (i32.const 1))"
        f" {status(w, 'nested', nested)}"
        "  (global.set $depth (i32.const 0))"
        "  (return (i32.const 0x10000))))"
        "(i32.const 0)"))                       # the nested (refused) call would get 0 anyway


async def test_write_result_statuses(load, trace):
    # What write_result answers: an allocator that asks the host for data again is refused
    # (the nested call gets 6, the outer one its data); an allocator answering 0 gets 6;
    # empty data needs no allocator: (0, 0).
    w = Wat(allocator=False)
    _asking_allocator(w, f"(call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} "
                         f"(i32.const {OUT + 16}) (i32.const {OUT + 20}))")
    w.on("proxy_on_request_headers",
         status(w, "outer", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-a')} {O})")
         + out_ptr_size(w, "outer-out")
         + "(global.set $depth (i32.const 2))"   # now the allocator answers 0
         + status(w, "zero", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-a')} {O})")
         + status(w, "empty", f"(call $proxy_get_header_map_pairs (i32.const 2) {O})")
         + out_ptr_size(w, "empty-out")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await request(host)
    assert trace.lines("f")[1:7] == ["nested 6", "outer 0", "outer-out 65536 1", "zero 6",
                                     "empty 0", "empty-out 0 0"]
    assert host.filters["f"].host_errors == 0


async def test_a_stream_property_is_written_as_write_result_writes(load, trace):
    # The C stream_property (the hot proxy_get_property) against the Python one, on each
    # crossing: an allocator that asks for a property again is refused (6), the outer call
    # gets its data, an allocator answering 0 gets 6, a bad out-pointer gets 6, a property
    # outside the fast table and an absent one go through the Python path.
    w = Wat(allocator=False)
    addr = w.s(b"source\0address")
    _asking_allocator(w, f"(call $proxy_get_property {addr} (i32.const {OUT + 16}) (i32.const {OUT + 20}))")
    w.on("proxy_on_request_headers",
         status(w, "outer", f"(call $proxy_get_property {addr} {O})")
         + out_ptr_size(w, "outer-out")
         + status(w, "bad-out", f"(call $proxy_get_property {addr} {FAR} (i32.const 0))")
         + status(w, "other", f"(call $proxy_get_property {w.s(b'request' + bytes(1) + b'protocol')} {O})")
         + status(w, "absent", f"(call $proxy_get_property {w.s(b'request' + bytes(1) + b'nope')} {O})")
         + "(global.set $depth (i32.const 2))"   # now the allocator answers 0
         + status(w, "zero", f"(call $proxy_get_property {addr} {O})")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await request(host)
    # (each allocation, the bad out-pointer's and the other property's too, asks once more)
    assert trace.lines("f")[1:10] == ["nested 6", "outer 0", "outer-out 65536 15", "nested 6",
                                      "bad-out 6", "nested 6", "other 0", "absent 1", "zero 6"]
    assert host.filters["f"].host_errors == 0


def _ttl_args(cas: int, ttl_ns: int, key: bytes, value: bytes) -> bytes:
    """wasmgate.set_shared_data_ttl's arguments (abi/foreign.py)."""
    return struct.pack("<IQI", cas, ttl_ns, len(key)) + key + value


async def test_shared_data_reads_and_ttl_writes_are_written_as_write_result_writes(load, trace):
    # The C shared_data_get and foreign_set_ttl (a rate limiter's read and write of its bucket
    # on every request) against the Python host functions, on each crossing: the same
    # statuses, results and out-params for a read, an absent key, an empty value, a bad cas
    # pointer (refused before allocating), a bad out-pointer, an allocator that asks again
    # (refused: 6) or answers 0 (6; the ttl write still happened, as in write_result), a
    # stale cas (8 in the result), malformed arguments (2) and another foreign name (1).
    w = Wat(allocator=False)
    key, cas_p = w.s("k"), f"(i32.const {OUT + 8})"
    _asking_allocator(w, f"(call $proxy_get_shared_data {key} (i32.const {OUT + 16}) "
                         f"(i32.const {OUT + 20}) (i32.const {OUT + 24}))")
    ttl_name = w.s("wasmgate.set_shared_data_ttl")

    def get(label: str, k: str, out: str = O, cas: str = cas_p) -> str:
        return status(w, label, f"(call $proxy_get_shared_data {k} {out} {cas})")

    def ttl(label: str, args: bytes, name: str = ttl_name) -> str:
        return status(w, label, f"(call $proxy_call_foreign_function {name} {w.s(args)} {O})")

    def u32(label: str, addr: str) -> str:
        return f"(call $log_num {w.s(label)} (i32.load {addr}))"

    result = f"(i32.load (i32.const {OUT}))"
    w.on("proxy_on_request_headers",
         status(w, "set", f"(call $proxy_set_shared_data {key} {w.s('v1')} (i32.const 0))")
         + status(w, "set-empty", f"(call $proxy_set_shared_data {w.s('e')} {w.s('')} (i32.const 0))")
         + get("outer", key) + out_ptr_size(w, "outer-out") + u32("cas", f"(i32.const {OUT + 8})")
         + get("missing", w.s("nope"))
         + get("empty", w.s("e")) + out_ptr_size(w, "empty-out")
         + get("bad-cas", key, cas=FAR)
         + get("bad-out", key, out=f"{FAR} (i32.const 0)")
         + ttl("ttl", _ttl_args(0, 10**9, b"t", b"x")) + out_ptr_size(w, "ttl-out")
         + u32("ttl-result", result)
         + ttl("ttl-stale", _ttl_args(12345, 10**9, b"t", b"y")) + u32("stale-result", result)
         + ttl("ttl-short", bytes(15))
         + ttl("ttl-long-key", _ttl_args(0, 1, b"key", b"")[:-1])
         + ttl("other-name", b"", name=w.s("wasmgate.nope"))
         + "(global.set $depth (i32.const 2))"   # now the allocator answers 0
         + get("zero-get", key)
         + ttl("zero-ttl", _ttl_args(0, 10**9, b"z", b"zz"))
         + get("zero-ttl-wrote", w.s("z"))
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await request(host)
    assert trace.lines("f")[1:26] == [
        "set 0", "set-empty 0", "nested 6", "outer 0", "outer-out 65536 2", "cas 1", "missing 1",
        "empty 0", "empty-out 0 0", "bad-cas 6", "nested 6", "bad-out 6",
        "nested 6", "ttl 0", "ttl-out 65536 4", "ttl-result 0", "nested 6", "ttl-stale 0",
        "stale-result 8", "ttl-short 2", "ttl-long-key 2", "other-name 1",
        "zero-get 6", "zero-ttl 6", "zero-ttl-wrote 6"]
    store = host.filters["f"].store
    assert store.get(b"t")[0] == b"x" and store.get(b"z")[0] == b"zz"   # (written, result refused)
    assert host.filters["f"].host_errors == 0


async def test_write_result_without_an_allocator(load, trace):
    w = Wat(allocator=False)
    w.on("proxy_on_request_headers",
         status(w, "data", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-a')} {O})")
         + status(w, "empty", f"(call $proxy_get_header_map_pairs (i32.const 2) {O})")
         + status(w, "bad-out", f"(call $proxy_get_header_map_pairs (i32.const 2) {FAR} (i32.const 0))")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await request(host)
    assert trace.lines("f")[1:4] == ["data 6", "empty 0", "bad-out 6"]


def _crossing_frame(code) -> bool:
    if code.co_filename.startswith("<wasmgate engine"):
        return code.co_name in ("call", "nested")
    if code.co_filename.endswith(os.path.join("abi", "chain.py")):
        return code.co_name in ("request", "_headers")   # NativeFilter's C: its caller's frame
    return code.co_name == "call" and code.co_filename.endswith(os.path.join("abi", "filter.py"))


class HostCallFrames:
    """The Python frames each host call makes while active: every frame run between the
    crossing (the generated guest caller that entered the guest, or on the C path, where the
    guest caller is a C GuestFn, Filter.call that called it, and where that is C too
    (NativeFilter), the chain's frame that called it) and the return to it, in call
    order, one list per host call (the adapter, what it calls, any wrapper above it)."""

    def __init__(self):
        self.calls: dict[int, tuple[object, list[str]]] = {}

    def _profile(self, frame, event, arg):
        if event != "call":
            return
        f, top = frame, None
        while f is not None and not _crossing_frame(f.f_code):
            top, f = f, f.f_back
        if f is not None and top is not None:     # (top: kept, so its id is not reused)
            self.calls.setdefault(id(top), (top, []))[1].append(frame.f_code.co_name)

    def of(self, adapter: str) -> list[list[str]]:
        return [names for _top, names in self.calls.values() if adapter in names]

    def __enter__(self):
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


async def test_header_edits_and_the_clock_are_no_python_frame_on_the_c_path(load, crossing_impl):
    # bench/chain_profile: a filter's header edits are most of its host calls. On the C path
    # an edit of a stream's map, the clock read, a stream property read, a shared-data read
    # and a wasmgate.set_shared_data_ttl write are C whole (_crossing.c header_edit, time_ns,
    # stream_property, shared_data_get, foreign_set_ttl; the property's getter and the store's
    # get and set are not host frames): not one host-call frame; on the Python path, the
    # adapters.
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_replace_header_map_value (i32.const 0) {w.s('x-a')} {w.s('v')}))"
         f"(drop (call $proxy_replace_header_map_value (i32.const 0) {w.s('X-New')} {w.s('w')}))"
         f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-add')} {w.s('z')}))"
         f"(drop (call $proxy_get_current_time_nanoseconds (i32.const {OUT})))"
         f"(drop (call $proxy_get_property {w.s(b'source' + bytes(1) + b'address')} (i32.const {OUT}) (i32.const {OUT + 4})))"
         f"(drop (call $proxy_call_foreign_function {w.s('wasmgate.set_shared_data_ttl')} "
         f"{w.s(_ttl_args(0, 10**9, b'bucket', b'tokens'))} (i32.const {OUT}) (i32.const {OUT + 4})))"
         f"(drop (call $proxy_get_shared_data {w.s('bucket')} (i32.const {OUT}) (i32.const {OUT + 4}) (i32.const {OUT + 8})))"
         " (i32.const 0)")
    host = await load(w)
    await request(host)                         # warm: the name check's cache, callers
    gc.disable()        # (a collection's finalizers would show as frames of a host call)
    try:
        with HostCallFrames() as frames:
            out = await request(host)
    finally:
        gc.enable()
    assert isinstance(out, Forward) and ("x-new", "w") in out.headers and ("x-add", "z") in out.headers
    # On the C path the chain's frame counts as the crossing (NativeFilter), so what the chain
    # itself calls (a context opening, a buffer) shows too: only frames entered from the guest
    # (a host function, or the engine's wrapper around one) are host calls.
    host_files = (os.path.join("abi", "hostcalls.py"), os.path.join("abi", "engine", ""),
                  "<wasmgate engine")
    # The deadline re-arm (store.py arm, once per REARM_S of calls) is the guest call's, not a
    # host call: whether it falls in the measured request depends on the machine's load.
    calls = [names for top, names in frames.calls.values() if "proxy_log" not in names
             and names[0] != "arm"
             and (top.f_code.co_filename.endswith(host_files[0])
                  or host_files[1] in top.f_code.co_filename
                  or top.f_code.co_filename.startswith(host_files[2]))]
    if crossing_impl == "native":
        assert calls == []
    else:               # the ctypes callback, guarded()'s wrapper, Memory's Python reads
        assert [c for c in calls if "host" in c] == [["callback", "host", "_header_edit",
                          "_py_header_pair", "_py_read", "_py_read", "replace"]] * 2 + [
                         ["callback", "host", "_header_edit", "_py_header_pair", "_py_read",
                          "_py_read", "add"],
                         ["callback", "host", "proxy_get_current_time_nanoseconds",
                          "write_u64", "write_u64"],
                         ["callback", "host", "proxy_get_property", "read", "_py_read",
                          "_source_address", "_addr", "to_bytes", "write_result", "_py_put_result",
                          "write", "write_u32", "write_u32"],
                         ["callback", "host", "proxy_call_foreign_function", "read", "_py_read",
                          "read", "_py_read", "call", "set_shared_data_ttl", "grants", "set", "write_result",
                          "_py_put_result", "write", "write_u32", "write_u32"],
                         ["callback", "host", "proxy_get_shared_data", "read", "_py_read", "get",
                          "get", "check_out", "write_result", "_py_put_result", "write",
                          "write_u32", "write_u32", "write_u32", "write_u32"]]
