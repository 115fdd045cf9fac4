"""abi/engine/: correctness of every crossing, isolation limits, the compile cache."""
from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from abi.engine import (Engine, EngineError, HostTrap, Import, Instance, MemoryAccessError,
                        Trap)

MB = 1 << 20

CORE_WAT = b"""
(module
  (import "env" "h32" (func $h32 (param i32 i32) (result i32)))
  (import "env" "h64" (func $h64 (param i64) (result i64)))
  (import "env" "hvoid" (func $hvoid (param i32)))
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  (func (export "add64") (param i64 i64) (result i64) local.get 0 local.get 1 i64.add)
  (func (export "call_h32") (param i32 i32) (result i32) local.get 0 local.get 1 call $h32)
  (func (export "call_h64") (param i64) (result i64) local.get 0 call $h64)
  (func (export "call_hvoid") (param i32) local.get 0 call $hvoid)
  (func (export "load") (param i32) (result i32) local.get 0 i32.load)
  (func (export "grow") (param i32) (result i32) local.get 0 memory.grow)
  (func (export "grow_then_h") (param i32) (result i32)
    local.get 0 memory.grow drop  i32.const 0 i32.const 0 call $h32)
  (func (export "spin") (loop br 0))
  (func $crash (export "crash") unreachable)
  (func $outer (export "outer") call $crash)
  (func (export "div0") (result i32) i32.const 1 i32.const 0 i32.div_s)
  (func $rec (export "recurse") call $rec)
)
"""


def host_defaults(**overrides):
    funcs = {("env", "h32"): lambda a, b: a, ("env", "h64"): lambda a: a,
             ("env", "hvoid"): lambda a: None}
    funcs.update({("env", k): v for k, v in overrides.items()})
    return funcs


# Every test here runs on both crossings (conftest.py's crossing_impl).
pytestmark = pytest.mark.usefixtures("crossing_impl")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(cache_dir=tmp_path_factory.mktemp("cache"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def core(engine):
    return engine.compile(CORE_WAT, name="core.wasm")


def make(engine, module, funcs=None, *, mem=16 * MB, deadline_ms=100, **kwargs):
    return Instance(engine, module, funcs if funcs is not None else host_defaults(),
                    memory_limit_bytes=mem, deadline_ms=deadline_ms, **kwargs)


# -- module metadata ---------------------------------------------------------------------

def test_module_lists_typed_imports_and_exports(core):
    assert core.imports[0] == Import("env", "h32", "func", ("i32", "i32"), ("i32",))
    assert core.imports[1] == Import("env", "h64", "func", ("i64",), ("i64",))
    assert core.exports["memory"].kind == "memory"
    assert core.exports["add64"].params == ("i64", "i64")
    assert core.exports["spin"].results == ()
    assert len(core.sha256) == 64


def test_engine_reports_pinned_wasmtime_version(engine):
    assert engine.version == "50.0.1"


def test_invalid_wasm_is_an_engine_error(engine):
    with pytest.raises(EngineError):
        engine.compile(b"(module (func (result i32)))")   # type error: no value on stack
    with pytest.raises(EngineError):
        engine.compile(b"\0asm\x01\0\0\0garbage")


# -- calls, arguments, results -----------------------------------------------------------

def test_i32_results_are_unsigned_and_args_accept_both_signs(engine, core):
    add = make(engine, core).export_func("add")
    assert add(1, 2) == 3
    assert add(-1, 0) == 0xFFFFFFFF
    assert add(0xFFFFFFFF, 1) == 0
    assert add(0x80000000, 0) == 0x80000000


def test_i64_is_signed_both_ways(engine, core):
    inst = make(engine, core)
    assert inst.export_func("add64")(-5, 2) == -3
    assert inst.export_func("add64")(2**63 - 1, 1) == -2**63
    seen = []
    inst = make(engine, core, host_defaults(h64=lambda a: seen.append(a) or a * 2))
    assert inst.export_func("call_h64")(-7) == -14
    assert seen == [-7]


def test_host_i32_args_arrive_unsigned_and_results_may_be_negative(engine, core):
    seen = []
    inst = make(engine, core, host_defaults(h32=lambda a, b: seen.append((a, b)) or -1))
    assert inst.export_func("call_h32")(-1, 0x80000000) == 0xFFFFFFFF
    assert seen == [(0xFFFFFFFF, 0x80000000)]


def test_host_function_without_result(engine, core):
    seen = []
    inst = make(engine, core, host_defaults(hvoid=seen.append))
    assert inst.export_func("call_hvoid")(42) is None
    assert seen == [42]


def test_export_func_is_cached_and_has_export(engine, core):
    inst = make(engine, core)
    assert inst.export_func("add") is inst.export_func("add")
    assert inst.has_export("add") and not inst.has_export("nope")
    assert not inst.has_export("memory")     # not a function
    with pytest.raises(KeyError):
        inst.export_func("nope")


def test_nested_call_from_host_function(engine, core):
    box = {}

    def h32(a, b):
        # as the ABI host does with proxy_on_memory_allocate: call back into the guest
        return box["inst"].export_func("add")(a, b) + 1

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    assert inst.export_func("call_h32")(20, 21) == 42
    assert inst.export_func("call_h32")(1, 1) == 3    # still usable afterwards
    assert not inst.poisoned


def test_trap_in_nested_call_keeps_its_kind(engine, core):
    box = {}

    def h32(a, b):
        box["inst"].export_func("crash")()
        return 0

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(1, 2)
    assert ei.value.kind == "trap"
    assert "unreachable" in ei.value.message
    assert inst.poisoned


# -- memory ------------------------------------------------------------------------------

def test_memory_read_write_roundtrip_visible_to_guest(engine, core):
    inst = make(engine, core)
    mem = inst.memory
    mem.write(100, b"\x01\x02\x03\x04")
    assert inst.export_func("load")(100) == 0x04030201
    assert mem.read(100, 4) == b"\x01\x02\x03\x04"
    mem.write_u32(200, 0xDEADBEEF)
    assert mem.read_u32(200) == 0xDEADBEEF
    mem.write_u32(204, -1)
    assert mem.read_u32(204) == 0xFFFFFFFF
    mem.write_u64(300, 2**64 - 2)
    assert mem.read_u64(300) == 2**64 - 2
    assert mem.read(0, 0) == b""
    assert mem.size() == 65536


@pytest.mark.parametrize("ptr,length", [(65536, 1), (65533, 4), (-1, 1), (0, 65537),
                                        (0xFFFFFFFF, 2), (10, -1)])
def test_memory_bounds_are_checked(engine, core, ptr, length):
    mem = make(engine, core).memory
    with pytest.raises(MemoryAccessError):
        mem.read(ptr, length)


def test_memory_writes_and_ints_are_bounds_checked(engine, core):
    mem = make(engine, core).memory
    with pytest.raises(MemoryAccessError):
        mem.write(65535, b"ab")
    with pytest.raises(MemoryAccessError):
        mem.read_u32(65533)
    with pytest.raises(MemoryAccessError):
        mem.write_u64(65530, 1)
    mem.write(65535, b"z")       # the last byte is fine
    assert mem.read(65535, 1) == b"z"


def test_memory_growth_is_seen_after_guest_call(engine, core):
    inst = make(engine, core)
    mem = inst.memory
    mem.write(10, b"keep")
    assert mem.size() == 65536
    assert inst.export_func("grow")(3) == 1
    assert mem.size() == 4 * 65536
    mem.write(3 * 65536 + 5, b"new")
    assert mem.read(3 * 65536 + 5, 3) == b"new"
    assert mem.read(10, 4) == b"keep"


def test_memory_growth_is_seen_inside_host_call(engine, core):
    box = {}

    def h32(a, b):
        mem = box["inst"].memory
        mem.write(mem.size() - 4, b"tail")    # only valid after the refresh
        return mem.size()

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    inst.memory.read(0, 1)                     # warm any cached view before the growth
    assert inst.export_func("grow_then_h")(2) == 3 * 65536
    assert inst.memory.read(3 * 65536 - 4, 4) == b"tail"


def test_memory_cap_makes_grow_fail(engine, core):
    inst = make(engine, core, mem=4 * 65536)
    grow = inst.export_func("grow")
    assert grow(3) == 1
    assert grow(1) == 0xFFFFFFFF           # -1: refused by the limiter
    assert inst.memory.size() == 4 * 65536
    assert not inst.poisoned


def test_memory_header_pair_lowers_ascii_only_and_decodes_latin1(engine, core):
    # Memory.header_pair (C on the native crossing) is what the header-edit host functions
    # read their key and value with: bytes.lower() on the key, latin-1 for both.
    mem = make(engine, core).memory
    mem.write(100, b"X-Caf\xc9-\xe4Z:")
    mem.write(200, b"V\xe9 \x00\r\nEnd")
    assert mem.header_pair(100, 10, 200, 9) == ("x-caf\xc9-\xe4z:", "V\xe9 \x00\r\nEnd")
    key = "x" * 300 + "y"                       # longer than the C path's stack buffer
    mem.write(1000, key.upper().encode())
    assert mem.header_pair(1000, 301, 0, 0) == (key, "")
    # a zero-length string is "" wherever it points; any other range is bounds-checked
    assert mem.header_pair(0xFFFFFFFF, 0, 2**40, 0) == ("", "")
    assert mem.header_pair(65535, 1, 65534, 2) == ("\x00", "\x00\x00")
    for args in [(65535, 2, 0, 1), (0, 1, 65535, 2), (-1, 1, 0, 1), (0, 1, 0, -1)]:
        with pytest.raises(MemoryAccessError):
            mem.header_pair(*args)


def test_memory_helpers_see_a_growth_inside_a_host_call(engine, core):
    box = {}

    def h32(a, b):
        mem = box["inst"].memory
        top = mem.size()                        # (re-reads the size: grown by the guest)
        mem.write(top - 8, b"AbCdeFgh")
        assert mem.read(top - 8, 8) == b"AbCdeFgh"
        assert mem.header_pair(top - 8, 4, top - 4, 4) == ("abcd", "eFgh")
        return top

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    inst.memory.read(0, 1)
    assert inst.export_func("grow_then_h")(1) == 2 * 65536


def test_memory_put_result_allocates_writes_and_fills_the_out_pointers(engine, core):
    inst = make(engine, core)
    mem = inst.memory
    asked = []

    def alloc(n):
        asked.append(n)
        return 4096

    mem.write(16, b"\xff" * 8)
    assert mem.put_result(alloc, b"value", 16, 20) is True
    assert (asked, mem.read(4096, 5), mem.read_u32(16), mem.read_u32(20)) == ([5], b"value", 4096, 5)
    # empty data: no allocation, (0, 0) written; no allocator needed
    assert mem.put_result(None, b"", 16, 20) is True
    assert (asked, mem.read_u32(16), mem.read_u32(20)) == ([5], 0, 0)
    # the allocator answers 0: nothing written
    mem.write_u32(16, 7)
    assert mem.put_result(lambda n: 0, b"value", 16, 20) is False
    assert mem.put_result(lambda n: None, b"value", 16, 20) is False    # a void "allocator"
    assert mem.read_u32(16) == 7
    # a bad out-pointer raises after the allocation and the data write (cpp-host's order)
    asked.clear()
    with pytest.raises(MemoryAccessError):
        mem.put_result(alloc, b"late", 16, 65533)
    assert (asked, mem.read(4096, 4), mem.read_u32(16)) == ([4], b"late", 4096)
    with pytest.raises(MemoryAccessError):
        mem.put_result(alloc, b"late", 65533, 16)
    with pytest.raises(MemoryAccessError):     # an allocator answering outside memory
        mem.put_result(lambda n: 65535, b"ab", 16, 20)
    with pytest.raises(ZeroDivisionError):     # what the allocator raises goes through
        mem.put_result(lambda n: 1 // 0, b"ab", 16, 20)


def test_memory_put_result_into_memory_the_allocator_grew(engine, core):
    inst = make(engine, core)
    mem = inst.memory
    mem.read(0, 1)                              # a view of the first page only
    grow = inst.export_func("grow")

    def alloc(n):
        grow(1)
        return 65536 + 10

    assert mem.put_result(alloc, b"past the old end", 100, 104) is True
    assert mem.read(65546, 16) == b"past the old end"
    assert (mem.read_u32(100), mem.read_u32(104)) == (65546, 16)


def test_guarded_host_answers_as_the_generated_wrapper(crossing_impl):
    # engine.guarded_host is abi/hostcalls.py guarded()'s wrapper in C (native path only).
    from abi.engine import guarded_host
    from abi.hostcalls import _guarded_factory
    errors = []

    def adapter(first, a, b):
        if a == 1:
            raise MemoryAccessError("bad pointer")
        if a == 2:
            raise ValueError("a bug of ours")
        if a == 3:
            raise Trap("trap", "nested guest call trapped")
        if a == 4:
            raise HostTrap("proc_exit")
        if a == 5:
            raise KeyboardInterrupt
        return first + b

    c_host = guarded_host(adapter, 100, 6, 10, errors.append)
    if crossing_impl != "native":
        assert c_host is None                   # the generated wrapper is used instead
        return
    py_host = _guarded_factory(2)(SimpleNamespace(host_error=lambda name, e: errors.append(e)),
                                  "h", lambda f, a, b: adapter(100, a, b), 6, 10,
                                  MemoryAccessError, Trap, HostTrap)
    for host in (c_host, py_host):
        errors.clear()
        assert (host(0, 5), host(1, 0), host(2, 0)) == (105, 6, 10)
        assert [type(e) for e in errors] == [ValueError]
        assert errors[0].__traceback__ is not None
        for a, exc in ((3, Trap), (4, HostTrap), (5, KeyboardInterrupt)):
            with pytest.raises(exc):
                host(a, 0)
    void = guarded_host(adapter, 0, None, None, errors.append)
    assert (void(1, 0), void(2, 0)) == (None, None)


def test_initial_memory_above_cap_fails_instantiation(engine):
    module = engine.compile(b'(module (memory (export "memory") 20))')
    with pytest.raises(EngineError):
        make(engine, module, {}, mem=65536)


# -- traps and deadlines -----------------------------------------------------------------

def test_infinite_loop_hits_the_deadline(engine, core):
    inst = make(engine, core, deadline_ms=30)
    start = time.monotonic()
    with pytest.raises(Trap) as ei:
        inst.export_func("spin")()
    elapsed = time.monotonic() - start
    assert ei.value.kind == "deadline"
    assert elapsed >= 0.029          # never earlier than the deadline (upper bound: see bench)
    assert elapsed < 2.5
    assert inst.poisoned


def test_deadline_is_rearmed_for_each_top_level_call(engine, core):
    inst = make(engine, core, deadline_ms=20)
    add = inst.export_func("add")
    for _ in range(3):
        _burn_ms(25)                 # more CPU than the deadline between calls
        assert add(1, 1) == 2


WAIT_THEN_COUNT_WAT = b"""
(module
  (import "env" "nap" (func $nap))
  (func (export "nap_then_count") (param $n i32) (result i32)
    call $nap
    (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l (local.get $n)))
    (i32.const 7)))
"""


def test_a_call_is_charged_its_own_threads_cpu_not_anothers(engine, core):
    """A guest computing on another thread moves the shared epoch past this call's deadline
    while this call waits (here: in a host function); the engine's deadline callback then
    finds this thread used almost no CPU and lets the call finish. Computing itself past the
    deadline still traps, with a backtrace."""
    started = threading.Event()
    spun: list = []

    def spin_elsewhere():
        inst = make(engine, core, deadline_ms=600)
        started.set()
        with pytest.raises(Trap) as ei:
            inst.export_func("spin")()
        spun.append(ei.value.kind)

    spinner = threading.Thread(target=spin_elsewhere, daemon=True)
    spinner.start()
    assert started.wait(5)                                       # it spins during the nap
    module = engine.compile(WAIT_THEN_COUNT_WAT, name="nap.wasm")
    napper = make(engine, module, {("env", "nap"): lambda: time.sleep(0.3)}, deadline_ms=30)
    assert napper.export_func("nap_then_count")(2_000_000) == 7   # checks the deadline on the way
    spinner.join(10)
    assert spun == ["deadline"]                                  # the spinner still stopped
    napper = make(engine, module, {("env", "nap"): lambda: None}, deadline_ms=30)
    with pytest.raises(Trap) as ei:
        napper.export_func("nap_then_count")(0)               # 2**32 turns: far past 30 ms
    assert ei.value.kind == "deadline" and ei.value.backtrace == ["nap.wasm!nap_then_count"]


@pytest.mark.parametrize("export,needle", [("crash", "unreachable"),
                                           ("div0", "divide by zero"),
                                           ("recurse", "call stack exhausted")])
def test_trap_kinds_and_messages(engine, core, export, needle):
    inst = make(engine, core)
    with pytest.raises(Trap) as ei:
        inst.export_func(export)()
    assert ei.value.kind == "trap"
    assert needle in ei.value.message.lower()
    assert ei.value.backtrace


def test_backtrace_names_frames_innermost_first(engine, core):
    inst = make(engine, core)
    with pytest.raises(Trap) as ei:
        inst.export_func("outer")()
    assert ei.value.backtrace[:2] == ["core.wasm!crash", "core.wasm!outer"]


def test_host_trap_is_kind_exit(engine, core):
    def h32(a, b):
        raise HostTrap("proc_exit(3)")

    inst = make(engine, core, host_defaults(h32=h32))
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(0, 0)
    assert ei.value.kind == "exit"
    assert "proc_exit(3)" in ei.value.message
    assert inst.poisoned


def test_host_exception_is_kind_host_and_engine_survives(engine, core):
    def h32(a, b):
        raise ValueError("bug in host")

    inst = make(engine, core, host_defaults(h32=h32))
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(0, 0)
    assert ei.value.kind == "host"
    assert "bug in host" in ei.value.message
    # a fresh instance of the same module works
    assert make(engine, core).export_func("call_h32")(5, 6) == 5


def test_host_returning_garbage_traps_as_host(engine, core):
    inst = make(engine, core, host_defaults(h32=lambda a, b: "nope"))
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(0, 0)
    assert ei.value.kind == "host"


def test_poisoned_instance_refuses_calls(engine, core):
    inst = make(engine, core)
    with pytest.raises(Trap):
        inst.export_func("crash")()
    assert inst.poisoned
    with pytest.raises(Trap):
        inst.export_func("add")(1, 2)


def test_trap_in_start_function_raises_trap(engine):
    module = engine.compile(b'(module (func $s unreachable) (start $s))')
    with pytest.raises(Trap) as ei:
        make(engine, module, {})
    assert ei.value.kind == "trap"


def test_start_function_may_call_host(engine):
    seen = []
    module = engine.compile(b'''(module (import "env" "f" (func $f (param i32)))
        (func $s i32.const -3 call $f) (start $s))''')
    make(engine, module, {("env", "f"): seen.append})
    assert seen == [0xFFFFFFFD]


# -- linking -----------------------------------------------------------------------------

def test_missing_imports_are_all_listed(engine):
    module = engine.compile(b'''(module
        (import "env" "a" (func)) (import "env" "b" (func))
        (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))''')
    with pytest.raises(EngineError) as ei:
        make(engine, module, {("env", "b"): lambda: None})
    msg = str(ei.value)
    assert "env.a" in msg and "wasi_snapshot_preview1.fd_write" in msg
    assert "env.b" not in msg


def test_many_instances_are_isolated(engine, core):
    insts = [make(engine, core) for _ in range(50)]
    for n, inst in enumerate(insts):
        inst.memory.write(0, bytes([n]))
    assert [inst.memory.read(0, 1)[0] for inst in insts] == list(range(50))
    with pytest.raises(Trap):
        insts[7].export_func("crash")()
    assert insts[8].export_func("add")(1, 2) == 3
    for inst in insts:
        inst.close()


def test_closed_instances_are_collected_without_crash(engine, core):
    for _ in range(20):
        inst = make(engine, core, host_defaults(h32=lambda a, b: a + b))
        assert inst.export_func("call_h32")(2, 3) == 5
        inst.close()
        del inst
    gc.collect()
    assert make(engine, core).export_func("add")(2, 2) == 4


# -- compile cache -----------------------------------------------------------------------

def cache_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".cwasm")


def test_compile_cache_hit(tmp_path):
    eng = Engine(cache_dir=tmp_path)
    try:
        first = eng.compile(CORE_WAT)
        assert not first.cache_hit
        files = cache_files(tmp_path)
        assert len(files) == 1 and first.sha256 in files[0].name and "50.0.1" in files[0].name
        other = Engine(cache_dir=tmp_path)
        second = other.compile(CORE_WAT)
        assert second.cache_hit
        assert make(other, second).export_func("add")(2, 3) == 5
        other.close()
    finally:
        eng.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_cache_entry_is_recompiled(tmp_path, damage):
    eng = Engine(cache_dir=tmp_path)
    try:
        eng.compile(CORE_WAT)
        (path,) = cache_files(tmp_path)
        blob = bytearray(path.read_bytes())
        if damage == "flip":
            blob[len(blob) // 2] ^= 0xFF
        elif damage == "truncate":
            blob = blob[: len(blob) // 3]
        else:
            blob = bytearray()
        path.write_bytes(bytes(blob))
        again = eng.compile(CORE_WAT)
        assert not again.cache_hit
        assert make(eng, again).export_func("add")(40, 2) == 42
        assert eng.compile(CORE_WAT).cache_hit      # rewritten
    finally:
        eng.close()


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WASMGATE_CACHE_DIR", str(tmp_path / "c"))
    eng = Engine()
    try:
        assert eng.cache_dir == tmp_path / "c"
    finally:
        eng.close()


# -- raw binding, lifetime and re-entrancy hazards ---------------------------------------

def test_raw_bindings_are_the_ones_engine_was_written_against():
    """Fails loudly when wasmtime-py changes a C signature or struct abi/engine/crossing.py drives raw."""
    import ctypes
    from importlib.metadata import version
    from ctypes import POINTER, c_char, c_size_t, c_uint64, c_void_p

    import wasmtime._bindings as B
    from abi import engine
    from abi.engine import crossing

    assert version("wasmtime") == engine.WASMTIME_VERSION == "50.0.1"
    crossing._verify_bindings()        # what the module itself checks at import
    call = B._wasmtime_func_call_unchecked
    assert call.restype is POINTER(B.wasmtime_error_t)
    assert call.argtypes == [POINTER(B.wasmtime_context_t), POINTER(B.wasmtime_func_t),
                             POINTER(B.wasmtime_val_raw_t), c_size_t,
                             POINTER(POINTER(B.wasm_trap_t))]
    cb = B.wasmtime_func_unchecked_callback_t
    assert cb._restype_ is c_size_t
    assert cb._argtypes_ == (c_void_p, POINTER(B.wasmtime_caller_t),
                             POINTER(B.wasmtime_val_raw_t), c_size_t)
    assert B._wasmtime_context_set_epoch_deadline.argtypes[1] is c_uint64
    assert B._wasmtime_trap_new.argtypes == [POINTER(c_char), c_size_t]
    assert ctypes.sizeof(B.wasmtime_val_raw_t) == 16
    assert [f[0] for f in B.wasmtime_func_t._fields_] == ["store_id", "__private"]


FLOAT_WAT = b"""
(module
  (import "env" "hf" (func $hf (param f32 f64) (result f64)))
  (func (export "mul") (param f32 f64) (result f64) local.get 0 f64.promote_f32 local.get 1 f64.mul)
  (func (export "call_hf") (param f32 f64) (result f64) local.get 0 local.get 1 call $hf)
  (func (export "pair") (param i32) (result i32 i64) local.get 0 i64.const -1)
  (func (export "none"))
)
"""


def test_floats_multi_value_and_no_arg_functions(engine):
    module = engine.compile(FLOAT_WAT)
    inst = make(engine, module, {("env", "hf"): lambda a, b: a + b})
    assert inst.export_func("mul")(1.5, 2.0) == 3.0
    assert inst.export_func("call_hf")(0.5, 0.25) == 0.75
    assert inst.export_func("pair")(-2) == (0xFFFFFFFE, -1)
    assert inst.export_func("none")() is None


def test_wrong_argument_count_is_a_type_error_not_a_trap(engine, core):
    inst = make(engine, core)
    with pytest.raises(TypeError):
        inst.export_func("add")(1)
    assert not inst.poisoned


def test_memory_base_does_not_move_on_growth(engine, core):
    inst = make(engine, core, mem=256 * MB)
    view_before = inst.memory._view
    inst.export_func("grow")(2000)            # 125 MiB more
    inst.memory.size()
    # same base address: the old, shorter view aliases the new memory
    inst.memory.write(8, b"same")
    assert bytes(view_before[8:12]) == b"same"


def test_swallowed_nested_trap_still_fails_the_outer_call(engine, core):
    box = {}

    def h32(a, b):
        try:
            box["inst"].export_func("div0")()
        except Trap:
            pass                              # a careless host must not resurrect the guest
        return 0

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(0, 0)
    assert "divide by zero" in ei.value.message
    assert inst.poisoned


def test_close_inside_a_call_is_deferred_until_it_unwinds(engine, core):
    box = {}

    def h32(a, b):
        box["inst"].close()
        return 7

    inst = make(engine, core, host_defaults(h32=h32))
    box["inst"] = inst
    with pytest.raises(Trap):
        inst.export_func("call_h32")(0, 0)
    assert inst.poisoned
    with pytest.raises(Trap):
        inst.export_func("add")(1, 1)
    with pytest.raises(MemoryAccessError):
        inst.memory.read(0, 1)


def test_closed_instance_memory_and_calls_are_refused(engine, core):
    inst = make(engine, core)
    add, mem = inst.export_func("add"), inst.memory
    inst.close()
    inst.close()                              # idempotent
    with pytest.raises(Trap):
        add(1, 2)
    with pytest.raises(MemoryAccessError):
        mem.read(0, 4)


def test_caller_keeps_its_instance_alive(engine, core):
    add = make(engine, core).export_func("add")
    gc.collect()
    assert add(20, 22) == 42


def test_backtrace_uses_export_names_for_unnamed_functions(engine):
    module = engine.compile(b'(module (func (export "proxy_on_tick") (param i32) unreachable))',
                            name="auth.wasm")
    with pytest.raises(Trap) as ei:
        make(engine, module, {}).export_func("proxy_on_tick")(1)
    assert ei.value.backtrace == ["auth.wasm!proxy_on_tick"]


def test_deadline_counts_host_time_and_nested_calls_share_it(engine, core):
    box = {}

    def h32(a, b):
        if a:
            box["inst"].export_func("spin")()   # nested: no fresh deadline
        return 0

    inst = make(engine, core, host_defaults(h32=h32), deadline_ms=30)
    box["inst"] = inst
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(1, 0)
    assert ei.value.kind == "deadline"


def test_hostile_host_results_never_escape_as_python_errors(engine, core):
    for bad in (None, "x", 1.5, object(), 2**80):
        inst = make(engine, core, host_defaults(h32=lambda a, b, bad=bad: bad))
        try:
            inst.export_func("call_h32")(0, 0)
        except Trap as t:
            assert t.kind == "host"
        else:
            assert bad == 2**80               # an oversized int is masked to its low 32 bits


def test_idle_ticker_wakes_up_for_the_next_call(tmp_path):
    eng = Engine(cache_dir=tmp_path)
    try:
        inst = make(eng, eng.compile(CORE_WAT), deadline_ms=20, instantiate_deadline_ms=20)
        assert inst.export_func("add")(1, 2) == 3
        _wait_for(lambda: eng._ticker.idle)   # no call in progress: the ticker naps
        epoch = eng._ticker.epoch
        time.sleep(0.05)
        assert eng._ticker.idle and eng._ticker.epoch == epoch   # and costs nothing
        with pytest.raises(Trap) as ei:       # the call re-arms, wakes it, and is interrupted
            inst.export_func("spin")()
        assert ei.value.kind == "deadline"
    finally:
        eng.close()


def test_abi_host_may_clear_poisoned_after_a_benign_exit(engine, core):
    def h32(a, b):
        raise HostTrap("proc_exit(0)")

    inst = make(engine, core, host_defaults(h32=h32))
    with pytest.raises(Trap) as ei:
        inst.export_func("call_h32")(0, 0)
    assert ei.value.kind == "exit" and inst.poisoned
    inst.poisoned = False                     # as abi/filter.py does for TinyGo's _start
    assert inst.export_func("add")(2, 3) == 5
    inst.close()
    inst.poisoned = False                     # a closed instance stays refused
    assert inst.poisoned


def _wait_for(predicate, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_deadline_armed_while_ticker_idle_is_rearmed_after_the_next_nap(tmp_path):
    eng = Engine(cache_dir=tmp_path)
    try:
        core = eng.compile(CORE_WAT)
        inst = make(eng, core, deadline_ms=5, instantiate_deadline_ms=5)
        other = make(eng, core, deadline_ms=5, instantiate_deadline_ms=5)
        add = inst.export_func("add")
        _wait_for(lambda: eng._ticker.idle)
        assert add(1, 2) == 3                 # armed during a nap; wakes the ticker
        epoch = eng._ticker.epoch
        with pytest.raises(Trap):
            other.export_func("spin")()       # another store's call moves the epoch on
        _wait_for(lambda: eng._ticker.epoch >= epoch + 5)
        _wait_for(lambda: eng._ticker.idle)   # then a second nap
        assert add(2, 2) == 4                 # a stale deadline would trap here
        with pytest.raises(Trap) as ei:
            inst.export_func("spin")()
        assert ei.value.kind == "deadline"
    finally:
        eng.close()


def test_unsupported_value_types_are_engine_errors(engine):
    module = engine.compile(b'''(module (import "env" "r" (func (param externref)))
        (func (export "v") (param v128)))''')
    with pytest.raises(EngineError, match="env.r"):
        make(engine, module, {("env", "r"): lambda r: None})
    ok = engine.compile(b'(module (func (export "v") (param v128)))')
    with pytest.raises(EngineError, match="v128"):
        make(engine, ok, {}).export_func("v")


def test_exotic_signatures_never_abort_the_process(engine):
    # wasmtime-py's type inspection aborts on these; the engine reads signatures itself
    module = engine.compile(b'''(module
        (import "env" "memory" (memory 1))
        (import "env" "tbl" (table 1 funcref))
        (import "env" "g" (global i32))
        (func (export "r") (param (ref func)))
        (func (export "s") (param v128) (result v128) local.get 0))''')
    assert module.exports["r"].params == ("ref",)
    assert module.exports["s"] == module.exports["s"].__class__("func", ("v128",), ("v128",))
    kinds = [(i.name, i.kind) for i in module.imports]
    assert kinds == [("memory", "memory"), ("tbl", "table"), ("g", "global")]
    with pytest.raises(EngineError) as ei:
        make(engine, module, {})
    msg = str(ei.value)                  # a memory import is satisfied (see test below)
    assert "env.tbl (table)" in msg and "env.g (global)" in msg and "memory" not in msg


def test_keyboard_interrupt_in_host_is_not_masked_as_a_trap(engine, core):
    def h32(a, b):
        raise KeyboardInterrupt

    inst = make(engine, core, host_defaults(h32=h32))
    with pytest.raises(KeyboardInterrupt):
        inst.export_func("call_h32")(0, 0)
    assert inst.poisoned


from hypothesis import given, settings, strategies as st  # noqa: E402

_EDGES = st.sampled_from([0, 1, 4, 8, 65532, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**64])


@settings(max_examples=300, deadline=None)
@given(ptr=st.one_of(_EDGES, st.integers(-2**40, 2**40)),
       length=st.one_of(st.sampled_from([0, 1, 4, 8, 65535, 65536]), st.integers(-10, 70000)))
def test_memory_access_is_exact_or_memory_access_error(engine, core, ptr, length):
    mem = _shared_instance(engine, core).memory
    inside = ptr >= 0 and length >= 0 and ptr + length <= 65536
    try:
        assert len(mem.read(ptr, length)) == length
        assert inside
    except MemoryAccessError:
        assert not inside
    data = b"\x5a" * max(length, 0)
    try:
        mem.write(ptr, data)
        assert ptr >= 0 and ptr + len(data) <= 65536
    except MemoryAccessError:
        assert not (ptr >= 0 and ptr + len(data) <= 65536)
    for width, op in ((4, mem.read_u32), (8, mem.read_u64)):
        try:
            op(ptr)
            assert 0 <= ptr <= 65536 - width
        except MemoryAccessError:
            assert not 0 <= ptr <= 65536 - width


_SHARED: dict = {}


def _shared_instance(engine, core):
    inst = _SHARED.get(id(engine))
    if inst is None:
        inst = _SHARED[id(engine)] = make(engine, core)
    return inst


def test_same_export_reentered_through_host_keeps_each_levels_values(engine):
    # f(0) = 100; f(n) = host(n) + 1 where host(n) = 2 * f(n - 1)  => f(3) = 807
    module = engine.compile(b'''(module
        (import "env" "h" (func $h (param i32) (result i32)))
        (func (export "f") (param $n i32) (result i32)
          (if (result i32) (i32.eqz (local.get $n))
            (then (i32.const 100))
            (else (i32.add (call $h (local.get $n)) (i32.const 1))))))''')
    box = {}
    inst = make(engine, module, {("env", "h"): lambda n: 2 * box["f"](n - 1)})
    box["f"] = inst.export_func("f")
    assert box["f"](3) == 807
    assert box["f"](0) == 100


def test_table_growth_is_capped_too(engine):
    module = engine.compile(b'''(module (table $t 1 funcref)
        (func (export "grow") (param i32) (result i32)
          (table.grow $t (ref.null func) (local.get 0))))''')
    inst = make(engine, module, {}, mem=8 * MB)         # budget: 1M elements
    assert inst.export_func("grow")(2_000_000) == 0xFFFFFFFF
    assert inst.export_func("grow")(1000) == 1


def test_a_starved_ticker_never_fires_a_fresh_deadline_early(tmp_path):
    eng = Engine(cache_dir=tmp_path)
    try:
        inst = make(eng, eng.compile(CORE_WAT), deadline_ms=40)
        add = inst.export_func("add")
        switch = sys.getswitchinterval()
        sys.setswitchinterval(10.0)                      # keep the GIL: the ticker starves
        try:
            assert add(1, 1) == 2                        # registers this thread's CPU clock
            _burn_ms(120)                                # which runs on unseen meanwhile
            if not eng._ticker.native:
                # _crossing.c's ticker never needs the GIL: it lags only when the kernel
                # starves it, which a test cannot arrange; it still must not fire early.
                assert eng._ticker.now_ms() - eng._ticker.epoch >= 100
            start = time.thread_time()
            with pytest.raises(Trap) as ei:
                inst.export_func("spin")()               # the ticker catches up meanwhile
        finally:
            sys.setswitchinterval(switch)
        assert ei.value.kind == "deadline"
        assert time.thread_time() - start >= 0.039
    finally:
        eng.close()


# -- deadline control --------------------------------------------------------------------

NAP_WAT = b"""
(module
  (import "env" "host" (func $host (param i32)))
  (func (export "nap") (param i32) (local $i i32)
    local.get 0 call $host
    (loop $again                       ;; a loop back-edge checks the epoch after the host
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 2)))))
  (func (export "spin") (loop br 0))
)
"""


def _sleep_ms(ms):
    time.sleep(ms / 1000)               # off the CPU: like a worker descheduled by the kernel


def _burn_ms(ms):
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:     # on the CPU, holding the GIL
        pass


def test_time_off_the_cpu_inside_a_call_is_not_charged_to_its_deadline(engine):
    # The deadline is CPU time: a call descheduled for 3x its deadline (a host function
    # sleeping stands in for the kernel) completes; the loop after the host call checks the
    # epoch. With a wall-clock epoch this call trapped.
    module = engine.compile(NAP_WAT)
    inst = make(engine, module, {("env", "host"): _sleep_ms}, deadline_ms=100)
    inst.export_func("nap")(300)
    assert not inst.poisoned
    with pytest.raises(Trap) as ei:
        inst.export_func("spin")()      # while CPU spent in the guest is still stopped
    assert ei.value.kind == "deadline"


GC_THEN_WORK_WAT = b"""
(module
  (import "env" "host" (func $host (param i32)))
  (func (export "run") (param i32) (local $i i32)
    i32.const 0 call $host
    (loop $again
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (local.get 0)))))
  (func (export "spin") (loop br 0))
)
"""


def test_python_gc_inside_a_call_is_not_charged_to_its_deadline(engine):
    # A full collection of a large heap, triggered inside a host function, takes longer than
    # the call's deadline; it is the gateway's work, not the guest's.
    import gc
    heap = [[i] for i in range(2_000_000)]
    t0 = time.thread_time()
    gc.collect()
    assert time.thread_time() - t0 > 0.06, "the heap is too small to make the point"

    def collect(_):
        gc.collect()

    module = engine.compile(GC_THEN_WORK_WAT)
    inst = make(engine, module, {("env", "host"): collect}, deadline_ms=50)
    try:
        t0 = time.thread_time()
        inst.export_func("run")(10_000_000)   # then ~10 ms of its own: the ticker ticks meanwhile
        assert not inst.poisoned
        assert time.thread_time() - t0 > 0.06   # the call took longer than its deadline
        with pytest.raises(Trap) as ei:
            inst.export_func("spin")()      # the guest's own CPU still counts
        assert ei.value.kind == "deadline"
    finally:
        del heap


def test_a_guest_running_on_another_thread_still_hits_its_deadline(engine, core):
    # e.g. instantiation during a reload, off the event loop's thread
    spin = engine.compile(b'(module (func $s (loop br 0)) (start $s))')
    box = {}

    def build():
        try:
            Instance(engine, spin, {}, memory_limit_bytes=16 * MB, deadline_ms=10,
                     instantiate_deadline_ms=50)
        except Trap as t:
            box["trap"] = t

    worker = threading.Thread(target=build)
    worker.start()
    worker.join(5)
    assert not worker.is_alive()
    assert box["trap"].kind == "deadline"


def test_set_deadline_ms_lengthens_then_restores_the_callback_deadline(engine):
    module = engine.compile(NAP_WAT)
    inst = make(engine, module, {("env", "host"): _burn_ms}, deadline_ms=20)
    nap = inst.export_func("nap")
    inst.set_deadline_ms(2000)           # e.g. a Go runtime's _start
    nap(80)                              # 4x the callback deadline: fine now
    inst.set_deadline_ms(20)             # back to the per-callback deadline
    with pytest.raises(Trap) as ei:
        nap(80)
    assert ei.value.kind == "deadline"


def test_set_deadline_ms_applies_to_the_next_call_even_right_after_an_arm(engine):
    module = engine.compile(NAP_WAT)
    inst = make(engine, module, {("env", "host"): _burn_ms}, deadline_ms=5000)
    inst.export_func("nap")(0)           # armed with 5 s just now (re-arm is rate-limited)
    inst.set_deadline_ms(30)
    start = time.monotonic()
    with pytest.raises(Trap) as ei:
        inst.export_func("spin")()
    assert ei.value.kind == "deadline"
    assert 0.029 <= time.monotonic() - start < 2.5


def test_set_deadline_ms_rejects_non_positive(engine, core):
    with pytest.raises(ValueError):
        make(engine, core).set_deadline_ms(0)


START_NAP_WAT = b"""
(module
  (import "env" "host" (func $host (param i32)))
  (func $s (local $i i32)
    i32.const 60 call $host
    (loop $again
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 2)))))
  (start $s)
  (func (export "nap") (param i32) local.get 0 call $host)
)
"""


def test_instantiation_gets_its_own_longer_deadline_by_default(engine):
    module = engine.compile(START_NAP_WAT)
    # the start function takes 60 ms; the callback deadline is 10 ms
    inst = make(engine, module, {("env", "host"): _burn_ms}, deadline_ms=10)
    assert not inst.poisoned
    inst.export_func("nap")(0)           # calls work, with the callback deadline again


def test_instantiation_deadline_can_be_set_and_is_enforced(engine):
    module = engine.compile(START_NAP_WAT)
    with pytest.raises(Trap) as ei:
        Instance(engine, module, {("env", "host"): _burn_ms}, memory_limit_bytes=16 * MB,
                 deadline_ms=1000, instantiate_deadline_ms=20)
    assert ei.value.kind == "deadline"
    spin = engine.compile(b'(module (func $s (loop br 0)) (start $s))')
    start = time.monotonic()
    with pytest.raises(Trap) as ei:
        Instance(engine, spin, {}, memory_limit_bytes=16 * MB, deadline_ms=10,
                 instantiate_deadline_ms=50)
    assert ei.value.kind == "deadline"
    assert 0.049 <= time.monotonic() - start < 2.5


def test_first_call_after_instantiation_uses_the_callback_deadline(engine):
    module = engine.compile(b'''(module (func $s) (start $s) (func (export "spin") (loop br 0)))''')
    inst = Instance(engine, module, {}, memory_limit_bytes=16 * MB, deadline_ms=30,
                    instantiate_deadline_ms=5000)
    start = time.monotonic()
    with pytest.raises(Trap) as ei:
        inst.export_func("spin")()       # right after the (long) instantiation arm
    assert ei.value.kind == "deadline"
    assert time.monotonic() - start < 2.5


# -- duplicate imports -------------------------------------------------------------------

def test_same_import_twice_with_the_same_type_links_once(engine):
    module = engine.compile(b'''(module
        (import "env" "f" (func $a (param i32) (result i32)))
        (import "env" "f" (func $b (param i32) (result i32)))
        (func (export "both") (param i32) (result i32)
          (i32.add (call $a (local.get 0)) (call $b (local.get 0)))))''')
    assert [(i.module, i.name) for i in module.imports] == [("env", "f"), ("env", "f")]
    seen = []
    inst = make(engine, module, {("env", "f"): lambda a: seen.append(a) or a * 10})
    assert inst.export_func("both")(2) == 40
    assert seen == [2, 2]


def test_same_import_twice_with_different_types_is_a_clear_engine_error(engine):
    module = engine.compile(b'''(module
        (import "env" "f" (func (param i32)))
        (import "env" "f" (func (param i64) (result i32))))''')
    with pytest.raises(EngineError) as ei:
        make(engine, module, {("env", "f"): lambda a: 0})
    msg = str(ei.value)
    assert "env.f" in msg and "twice" in msg
    assert "(i32) -> ()" in msg and "(i64) -> (i32)" in msg


# -- host calls during instantiation -----------------------------------------------------

START_LOG_WAT = b"""
(module
  (import "env" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from start")
  (func $s (call $log (i32.const 16) (i32.const 16)))
  (start $s)
  (func (export "load") (param i32) (result i32) local.get 0 i32.load)
)
"""


def test_host_function_called_by_the_start_function_can_use_memory(engine):
    module = engine.compile(START_LOG_WAT)
    created, seen = [], []

    def log(ptr, size):
        mem = created[0].memory
        seen.append((mem, mem.read(ptr, size)))
        mem.write_u32(64, 0xC0FFEE)

    inst = Instance(engine, module, {("env", "log"): log}, memory_limit_bytes=16 * MB,
                    deadline_ms=100, on_created=created.append)
    assert created == [inst]
    assert seen[0][1] == b"hello from start"
    assert seen[0][0] is inst.memory     # the same Memory before and after instantiation
    assert inst.export_func("load")(64) == 0xC0FFEE
    assert inst.memory.read(16, 5) == b"hello"


def test_memory_is_resolved_once_and_later_calls_skip_the_hook(engine):
    module = engine.compile(START_LOG_WAT)
    calls = []
    inst = Instance(engine, module, {("env", "log"): lambda p, n: calls.append((p, n))},
                    memory_limit_bytes=16 * MB, deadline_ms=100)
    assert calls == [(16, 16)]
    assert inst.memory is not None and inst.memory.read(16, 16) == b"hello from start"
    assert inst._boot_cells and all(cell.cell_contents is None for cell in inst._boot_cells)


def test_modules_without_start_function_get_the_plain_host_callbacks(engine, core):
    assert not core.has_start and engine.compile(START_LOG_WAT).has_start
    assert make(engine, core)._boot_cells == []     # the hot path has no boot test at all


def test_failed_instantiation_still_runs_on_created_and_cleans_up(engine):
    module = engine.compile(b'''(module (import "env" "log" (func $log (param i32 i32)))
        (memory (export "memory") 1)
        (func $s (call $log (i32.const 0) (i32.const 4)) unreachable) (start $s))''')
    created, seen = [], []
    with pytest.raises(Trap):
        Instance(engine, module, {("env", "log"): lambda p, n: seen.append(
                     created[0].memory.read(p, n))},
                 memory_limit_bytes=16 * MB, deadline_ms=100, on_created=created.append)
    assert seen == [b"\0\0\0\0"]
    with pytest.raises(MemoryAccessError):
        created[0].memory.read(0, 4)      # closed: the view is detached


# -- imported memory ---------------------------------------------------------------------

IMPORTED_MEMORY_WAT = b"""
(module
  (import "env" "memory" (memory 2 10))
  (import "env" "log" (func $log (param i32 i32)))
  (data (i32.const 8) "imported")
  (func $s (call $log (i32.const 8) (i32.const 8)))
  (start $s)
  (func (export "size") (result i32) memory.size)
  (func (export "grow") (param i32) (result i32) local.get 0 memory.grow)
  (func (export "load") (param i32) (result i32) local.get 0 i32.load)
)
"""


def test_imported_memory_is_created_with_its_limits_and_capped(engine):
    module = engine.compile(IMPORTED_MEMORY_WAT)
    assert module.imports[0] == Import("env", "memory", "memory", limits=(2, 10))
    created, seen = [], []
    inst = Instance(engine, module,
                    {("env", "log"): lambda p, n: seen.append(created[0].memory.read(p, n))},
                    memory_limit_bytes=4 * 65536, deadline_ms=100, on_created=created.append)
    assert seen == [b"imported"]
    assert inst.memory.size() == 2 * 65536 and inst.export_func("size")() == 2
    inst.memory.write_u32(100, 7)
    assert inst.export_func("load")(100) == 7
    assert inst.export_func("grow")(2) == 2          # up to the 4-page cap
    assert inst.export_func("grow")(1) == 0xFFFFFFFF  # the cap, below the declared 10
    assert inst.memory.size() == 4 * 65536


def test_imported_memory_without_maximum_and_above_the_cap(engine):
    module = engine.compile(b'''(module (import "env" "memory" (memory 1))
        (func (export "grow") (param i32) (result i32) local.get 0 memory.grow))''')
    inst = make(engine, module, {}, mem=3 * 65536)
    assert inst.memory.size() == 65536
    assert inst.export_func("grow")(3) == 0xFFFFFFFF
    assert inst.export_func("grow")(2) == 1
    with pytest.raises(EngineError, match=r"env\.memory.*memory limit"):
        make(engine, engine.compile(b'(module (import "env" "memory" (memory 5)))'), {},
             mem=4 * 65536)


def test_shared_memory_import_is_an_engine_error(engine):
    try:
        module = engine.compile(b'(module (import "env" "memory" (memory 1 2 shared)))')
    except EngineError:
        pytest.skip("threads proposal disabled: shared memories do not even compile")
    with pytest.raises(EngineError, match="env.memory"):
        make(engine, module, {})


def test_start_function_host_call_may_call_back_into_exports(engine):
    # e.g. proxy_get_property during an AssemblyScript start section: the host allocates
    # guest memory through the exported allocator and writes the result there
    module = engine.compile(b'''(module
        (import "env" "get" (func $get (param i32)))
        (memory (export "memory") 1)
        (global $ptr (mut i32) (i32.const 0))
        (func (export "malloc") (param i32) (result i32) i32.const 256)
        (func $s (call $get (i32.const 8)))
        (start $s)
        (func (export "load") (param i32) (result i32) local.get 0 i32.load))''')
    created = []

    def get(out_ptr):
        inst = created[0]
        ptr = inst.export_func("malloc")(4)
        inst.memory.write(ptr, b"abcd")
        inst.memory.write_u32(out_ptr, ptr)

    inst = Instance(engine, module, {("env", "get"): get}, memory_limit_bytes=16 * MB,
                    deadline_ms=100, on_created=created.append)
    assert inst.export_func("load")(8) == 256
    assert inst.memory.read(256, 4) == b"abcd"
    assert inst.export_func("malloc")(1) == 256      # the caller made during start still works


def test_exports_are_not_reachable_before_the_start_function_runs(engine):
    module = engine.compile(b'''(module (import "env" "f" (func $f))
        (func (export "g")) (func $s call $f) (start $s))''')
    seen = []

    def on_created(inst):
        with pytest.raises(KeyError, match="not reachable yet"):
            inst.export_func("g")
        seen.append(inst)

    inst = make(engine, module, {("env", "f"): lambda: None}, on_created=on_created)
    assert seen == [inst]
    inst.export_func("g")()


def test_imported_memory_that_is_also_exported_keeps_one_memory_object(engine):
    module = engine.compile(b'''(module (import "env" "memory" (memory 1))
        (import "env" "f" (func $f)) (export "memory" (memory 0))
        (func $s call $f) (start $s))''')
    created, seen = [], []
    inst = make(engine, module, {("env", "f"): lambda: seen.append(created[0].memory)},
                on_created=created.append)
    assert seen == [inst.memory] and seen[0] is inst.memory


def test_an_instance_crosses_through_the_implementation_chosen_at_its_creation(engine, core,
                                                                            crossing_impl):
    """The parametrisation above is real: guest calls go through _crossing.c's GuestFn or the
    ctypes prototype, host callbacks through the C trampoline or a ctypes closure."""
    from abi.engine import crossing
    inst = make(engine, core)
    try:
        call = inst.export_func("call_h32")
        native = crossing_impl == "native"
        if native:
            assert isinstance(call, crossing._native.GuestFn)
        else:
            raw = call.__closure__[call.__code__.co_freevars.index("call_raw")].cell_contents
            assert raw is crossing._call_unchecked
        host_entries = inst._callbacks[1:]          # [0]: the epoch deadline callback (ctypes)
        assert len(host_entries) == 3
        assert all(isinstance(k, ctypes._CFuncPtr) != native for k in host_entries)
        assert call(3, 4) == 3          # h32 returns its first argument, through either path
    finally:
        inst.close()


def test_a_call_the_ticker_forgot_since_its_arm_is_counted_again(tmp_path, crossing_impl):
    # _crossing.c's ticker counts threads: it forgets one with no call running whose last arm
    # is older than REARM_S. The generated caller checks the re-arm rate limit before call()
    # marks the thread, so the ticker may forget it in between; call() must count it again,
    # or a guest spinning there would never reach its deadline.
    if crossing_impl != "native":
        pytest.skip("the ctypes crossings' ticker counts stores (depth), not threads")
    eng = Engine(cache_dir=tmp_path)
    box = {}

    def run():          # on a thread of its own: if the guest is never interrupted, the test
        try:            # still ends (the thread is a daemon)
            inst = make(eng, eng.compile(CORE_WAT), deadline_ms=20, instantiate_deadline_ms=20)
            assert inst.export_func("add")(1, 2) == 3     # arms: the ticker counts us
            _wait_for(lambda: eng._ticker.idle)            # and has forgotten us since
            inst._st.armed_at = time.monotonic()           # the rate limit passed just before
            inst.export_func("spin")()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            box["exc"] = e

    try:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the spinning guest was never interrupted"
        assert isinstance(box.get("exc"), Trap) and box["exc"].kind == "deadline", box
    finally:
        eng.close()


def test_integer_host_functions_take_the_typed_c_entry(engine, core, crossing_impl):
    # On the C crossings a host function with integer parameters and at most one integer result
    # (every Proxy-Wasm import) is called by _crossing.c's typed entry; the tests above run its
    # argument, result, failure and unwind rules on both paths.
    from abi.engine import crossing
    inst = make(engine, core)
    typed = [cb for cb in inst._callbacks
             if crossing._native is not None and isinstance(cb, crossing._native.HostFn)]
    assert len(typed) == (3 if crossing_impl == "native" else 0)     # h32, h64, hvoid
    assert inst.export_func("call_h64")(-5) == -5
    assert inst.export_func("call_h32")(0xFFFFFFFF, 1) == 0xFFFFFFFF


def test_top_level_calls_re_arm_at_most_once_per_rearm_period(engine, core):
    # Arming costs a C call and a clock read: a caller (GuestFn in C, or the generated one)
    # re-arms only when the last arm is older than REARM_S, so back-to-back calls share one;
    # nested calls never arm (they run under the outer call's deadline).
    from abi.engine.crossing import REARM_S
    inst = make(engine, core, host_defaults(h32=lambda a, b: box["add"](a, b)))
    box = {"add": inst.export_func("add")}
    st = inst._st
    arms = []                       # armed_at of each arm (st.arm() or GuestFn's, in C)
    start = time.monotonic()
    for i in range(2000):
        assert inst.export_func("call_h32")(i, 1) == i + 1
        if not arms or st.armed_at != arms[-1]:
            arms.append(st.armed_at)
    elapsed = time.monotonic() - start
    assert 1 <= len(arms) <= elapsed / REARM_S + 1
    assert all(b - a > REARM_S for a, b in zip(arms, arms[1:]))
    assert st.depth == 0


def test_a_bad_argument_is_a_type_error_and_the_store_stays_usable(engine, core):
    inst = make(engine, core)
    add, add64 = inst.export_func("add"), inst.export_func("add64")
    for bad in ("1", 1.5, None):
        with pytest.raises(TypeError):
            add(bad, 1)
    with pytest.raises(TypeError):
        add(1, b=2)
    assert add64(2**64 - 1, 2) == 1             # masked to 64 bits, as i32 to 32
    assert add(True, 2) == 3
    assert not inst.poisoned and inst._st.depth == 0


def test_a_tally_counts_top_level_calls_and_their_wall_time(engine, core):
    # Filter.calls / guest_ns (GET /filters) come from here: every top-level call counts, a
    # call from inside a host function (the allocator) is part of the outer call's time, a
    # trapped call counts too, and instances may share one tally (a filter's rebuilds).
    from abi.engine import Tally
    tally = Tally()
    box = {}

    def h32(a, b):
        _burn_ms(2)                         # time inside the outer call
        return box["add"](a, b)

    inst = make(engine, core, host_defaults(h32=h32), tally=tally)
    box["add"] = inst.export_func("add")
    assert (tally.calls, tally.ns) == (0, 0)         # instantiation is not counted
    assert inst.export_func("add")(1, 2) == 3
    assert tally.calls == 1
    assert inst.export_func("call_h32")(1, 2) == 3   # one call: the nested add is inside it
    assert tally.calls == 2 and tally.ns >= 2_000_000
    with pytest.raises(Trap):
        inst.export_func("crash")()
    assert tally.calls == 3
    other = make(engine, core, tally=tally)
    other.export_func("add")(1, 1)
    assert tally.calls == 4
    untallied = make(engine, core)
    untallied.export_func("add")(1, 1)
    assert tally.calls == 4


def test_the_c_caller_re_arms_without_a_python_frame_as_arm_would(engine, core, crossing_impl):
    # On _NativeTicker, GuestFn re-arms in C (_crossing.c "deadline re-arm"): no Python frame
    # on the request path, and the same state as _StoreState.arm, the reference, leaves.
    if crossing_impl != "native":
        pytest.skip("the ctypes crossings re-arm with _StoreState.arm (in Python)")
    inst = make(engine, core, deadline_ms=30)
    add, st = inst.export_func("add"), inst._st
    assert st.native_arm and type(add).__name__ == "GuestFn"
    add(1, 1)
    frames = []
    st.armed_at = -1e9              # stale: the next top-level call re-arms
    before_cpu = st.ticker.charged_ns()
    sys.setprofile(lambda frame, event, arg: event == "call" and frames.append(frame.f_code))
    try:
        t0 = time.monotonic()
        assert add(2, 3) == 5
        t1 = time.monotonic()
    finally:
        sys.setprofile(None)
    assert frames == []
    assert t0 - 0.001 <= st.armed_at <= t1
    assert before_cpu <= st.arm_cpu_ns <= st.ticker.charged_ns()
    assert st.budget_ns == st.deadline_ticks * 1_000_000 >= 30 * 1_000_000
    # The deadline it set is enforced (the ticker counts this thread from the arm on): a
    # spinning guest stops after its 30 ms of CPU.
    st.armed_at = -1e9
    start = time.monotonic()
    with pytest.raises(Trap) as ei:
        inst.export_func("spin")()
    assert ei.value.kind == "deadline"
    assert 0.029 <= time.monotonic() - start < 2.5
