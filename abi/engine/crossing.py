"""The raw crossing: our ctypes prototypes over wasmtime's C API and the per-signature code
generated for guest calls (Python -> wasm) and host callbacks (wasm -> Python).

Why the raw C API: wasmtime-py's ``Func.__call__`` re-reads the function type, boxes every
value and walks a context manager on each call (~30-44 us here); a Python host function pays
~11-12 us and ``Memory.read`` ~4 us. The hot paths here go straight to
``wasmtime_func_call_unchecked`` and ``wasmtime_linker_define_func_unchecked`` through ctypes
prototypes that take plain integer addresses, with code generated once per signature; memory
is a cached memoryview (instance.py). Measured (``python -m bench.crossing``, quiet machine):
guest call ~0.75 us, host call ~0.5 us, 32-byte read ~0.13 us. ctypes itself is most of what
is left (a raw prototype call ~0.85 us of a ~0.95 us guest call on a loaded machine), so the
two hottest entries also exist in C (``_crossing.c``, optional; see "the C fast path" below).
On that path an integer host function is called by C alone (``_native.HostFn``: ~0.11 us a
host call, vs ~0.41 us through the generated callback), and so is an integer guest export
(``_native.GuestFn``: ~0.12 us a guest call, vs ~0.53 us through the generated caller and
``_native.call``; a host call with a nested allocator call ~0.21 us, vs ~0.65).

i32 values cross as UNSIGNED Python ints in both directions (masked here, in one place);
i64 values cross signed.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import textwrap
import time
import warnings
from ctypes import CFUNCTYPE, POINTER, c_char, c_size_t, c_uint64, c_void_p
from typing import Any, Callable, Protocol

from wasmtime import _bindings as _B

from .errors import HostTrap, MemoryAccessError, Trap

WASMTIME_VERSION = "50.0.1"   # pinned: the raw signatures below are checked against it
_SLOT = 16                    # sizeof(wasmtime_val_raw_t)
REARM_S = 0.002               # a store re-arms its deadline at most this often (cost: a C call)


# -- raw C entry points ------------------------------------------------------------------
# Our own prototypes over the library's symbols: every pointer is a plain int, so ctypes
# converts nothing on the hot path. _verify_bindings() pins what these assume.

def _addr(cfunc) -> int:
    return ctypes.cast(cfunc, c_void_p).value


def _verify_bindings() -> None:
    """Fail loudly if the wasmtime-py we drive raw is not the one these prototypes match."""
    from importlib.metadata import version
    installed = version("wasmtime")
    if installed != WASMTIME_VERSION:
        raise ImportError(f"abi/engine/crossing.py drives wasmtime {WASMTIME_VERSION} raw; "
                          f"wasmtime {installed} is installed")
    for name, (restype, argtypes) in EXPECTED_SIGNATURES.items():
        fn = getattr(_B, "_" + name)
        if fn.restype is not restype or list(fn.argtypes) != argtypes:
            raise ImportError(f"wasmtime._bindings.{name} changed signature")
    cb = _B.wasmtime_func_unchecked_callback_t
    if cb._restype_ is not c_size_t or cb._argtypes_ != (
            c_void_p, POINTER(_B.wasmtime_caller_t), POINTER(_B.wasmtime_val_raw_t), c_size_t):
        raise ImportError("wasmtime_func_unchecked_callback_t changed signature")
    if ctypes.sizeof(_B.wasmtime_val_raw_t) != _SLOT:
        raise ImportError("wasmtime_val_raw_t is no longer 16 bytes")


EXPECTED_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "wasmtime_func_call_unchecked": (
        POINTER(_B.wasmtime_error_t),
        [POINTER(_B.wasmtime_context_t), POINTER(_B.wasmtime_func_t),
         POINTER(_B.wasmtime_val_raw_t), c_size_t, POINTER(POINTER(_B.wasm_trap_t))]),
    "wasmtime_linker_define_func_unchecked": (
        POINTER(_B.wasmtime_error_t),
        [POINTER(_B.wasmtime_linker_t), POINTER(c_char), c_size_t, POINTER(c_char), c_size_t,
         POINTER(_B.wasm_functype_t), _B.wasmtime_func_unchecked_callback_t, c_void_p,
         CFUNCTYPE(None, c_void_p)]),
    "wasmtime_context_set_epoch_deadline": (None, [POINTER(_B.wasmtime_context_t), c_uint64]),
    "wasmtime_engine_increment_epoch": (None, [POINTER(_B.wasm_engine_t)]),
    "wasmtime_memory_data": (POINTER(ctypes.c_uint8),
                             [POINTER(_B.wasmtime_context_t), POINTER(_B.wasmtime_memory_t)]),
    "wasmtime_memory_data_size": (c_size_t,
                                  [POINTER(_B.wasmtime_context_t), POINTER(_B.wasmtime_memory_t)]),
    "wasmtime_trap_new": (POINTER(_B.wasm_trap_t), [POINTER(c_char), c_size_t]),
    "wasmtime_store_context": (POINTER(_B.wasmtime_context_t), [POINTER(_B.wasmtime_store_t)]),
    # cold paths (once per instance, through the public binding): see Instance.__init__ and
    # Instance._resolve_memory
    "wasmtime_store_epoch_deadline_callback": (None, [
        POINTER(_B.wasmtime_store_t),
        CFUNCTYPE(c_size_t, POINTER(_B.wasmtime_context_t), c_void_p, POINTER(c_uint64),
                  POINTER(_B.wasmtime_update_deadline_kind_t)),
        c_void_p, CFUNCTYPE(None, c_void_p)]),
    "wasmtime_caller_export_get": (ctypes.c_bool, [
        POINTER(_B.wasmtime_caller_t), POINTER(c_char), c_size_t, POINTER(_B.wasmtime_extern_t)]),
}

_verify_bindings()

# Releases the GIL while wasm runs (so the Python epoch ticker can interrupt a spinning guest).
_call_unchecked = CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p)(
    _addr(_B._wasmtime_func_call_unchecked))
_set_epoch_deadline = CFUNCTYPE(None, c_void_p, c_uint64)(
    _addr(_B._wasmtime_context_set_epoch_deadline))
# An atomic add: keep the GIL (PYFUNCTYPE) instead of bouncing it twice per tick.
_increment_epoch = ctypes.PYFUNCTYPE(None, c_void_p)(_addr(_B._wasmtime_engine_increment_epoch))
_memory_data = CFUNCTYPE(c_void_p, c_void_p, c_void_p)(_addr(_B._wasmtime_memory_data))
_memory_data_size = CFUNCTYPE(c_size_t, c_void_p, c_void_p)(_addr(_B._wasmtime_memory_data_size))
_trap_new = CFUNCTYPE(c_void_p, c_void_p, c_size_t)(_addr(_B._wasmtime_trap_new))
# Host callback: (env, caller, args_and_results, len) -> wasm_trap_t* or 0, all plain ints.
_HostCallback = CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_NO_FINALIZER = ctypes.cast(None, CFUNCTYPE(None, c_void_p))
# Epoch deadline reached: (context, env, *delta, *kind) -> wasmtime_error_t* or 0.
_DeadlineCallback = EXPECTED_SIGNATURES["wasmtime_store_epoch_deadline_callback"][1][1]


# -- the C fast path (optional) ----------------------------------------------------------
# _crossing.c does the two hot crossings without ctypes: a guest call (GuestFn: the whole
# generated caller; call(): the raw call for other signatures) and the entry of a host
# callback; and it runs the epoch ticker without the GIL (ticker.py). Built at
# install when a C compiler is there (setup.py); without it, or with WASMGATE_PURE_PYTHON=1,
# the ctypes prototypes above (and a Python ticker) do the same. An Instance picks one when it
# is created (``USE_NATIVE``; the tests run both).

def _load_native():
    if os.environ.get("WASMGATE_PURE_PYTHON"):
        return None
    try:
        from . import _crossing
    except ImportError:
        return None
    missing = [n for n in _NATIVE_NAMES if not hasattr(_crossing, n)]
    if missing:     # built from an older _crossing.c: rebuild (pip install -e . / build_ext)
        warnings.warn(f"{_crossing.__file__} is stale (no {', '.join(missing)}): using ctypes; "
                      f"rebuild it with `python setup.py build_ext --inplace`")
        return None
    _crossing.set_call_target(_addr(_B._wasmtime_func_call_unchecked))
    _crossing.set_deadline_target(_addr(_B._wasmtime_context_set_epoch_deadline))
    return _crossing


_NATIVE_NAMES = ("call", "set_call_target", "HOST_TRAMPOLINE", "HostFn", "TYPED_TRAMPOLINE",
                 "ticker_configure", "ticker_add", "ticker_remove", "ticker_register",
                 "ticker_state", "ticker_enter", "ticker_leave", "charged_ns", "gc_callback",
                 "mem_read", "mem_header_pair", "mem_put_result", "Guarded", "serialize_pairs",
                 "CallCore", "GuestFn", "Tally", "FilterCore", "walk_request", "walk_response",
                 "walk_finish", "stream_head", "set_deadline_target", "ContextCore",
                 "HeaderMapCore")


_native = _load_native()
USE_NATIVE = _native is not None
# abi/pairs.py serialize_str() of a list of latin-1 str pairs in C (None: anything else, or
# no C build); what every proxy_get_header_map_pairs hands the guest.
serialize_pairs: Callable[[list], bytes | None] | None = \
    _native.serialize_pairs if _native is not None else None
# abi/hostcalls.py's header edits and clock read, whole in C on their common path (_crossing.c
# "host calls of every request"); None without the C build (or with one older than them).
native_header_edit: Callable[..., int] | None = getattr(_native, "header_edit", None)
native_time_ns: Callable[..., int] | None = getattr(_native, "time_ns", None)
native_stream_property: Callable[..., int] | None = getattr(_native, "stream_property", None)
native_shared_data_get: Callable[..., int] | None = getattr(_native, "shared_data_get", None)
native_foreign_set_ttl: Callable[..., int] | None = getattr(_native, "foreign_set_ttl", None)
# The base of store._StoreState: with _crossing.c, its depth/poisoned/armed_at/tally and the
# deadline arm's state are C fields that _native.GuestFn reads (and re-arms) without an
# attribute lookup (Python sees attributes).
CallCore: type = _native.CallCore if _native is not None else object


# The C base of abi/filter.py's NativeFilter (a filter's per-request calls without a Python
# frame: call, new_http_context, headers, finish_context); None without _crossing.c.
FilterCore: type | None = _native.FilterCore if _native is not None else None
# The chain's per-filter loops in C: abi/chain.py's _walk_request, _walk_response and
# _walk_finish, in that order; None without _crossing.c.
chain_walks: tuple[Callable, Callable, Callable] | None = (
    (_native.walk_request, _native.walk_response, _native.walk_finish) if _native is not None else None)
# abi/chain.py's _stream_head (a stream's header map items and content-length) in C for the
# plain case, None for the rest; None without _crossing.c.
native_stream_head: Callable[..., tuple | None] | None = getattr(_native, "stream_head", None)


# The C base of abi/context.py's HttpContext (its construction without a Python frame, for
# every request and filter); None without _crossing.c.
ContextCore: type | None = _native.ContextCore if _native is not None else None
# The C base of abi/buffers.py's HeaderMap (likewise, twice per request); None without it.
HeaderMapCore: type | None = _native.HeaderMapCore if _native is not None else None


def native_crossings() -> bool:
    """Whether what is made now (an Instance, a filter) uses _crossing.c (the tests flip it)."""
    return USE_NATIVE


class _PyTally:
    """What the top-level guest calls of the stores given it add up to: ``calls`` and their
    wall time ``ns`` (as ``Filter.calls`` / ``guest_ns`` report). _native.Tally with the C
    crossings (GuestFn counts in C), this otherwise."""
    __slots__ = ("calls", "ns")

    def __init__(self) -> None:
        self.calls = 0
        self.ns = 0


Tally: type = _native.Tally if _native is not None else _PyTally


def host_entry(callback: Callable[..., int], native: bool) -> tuple[Any, Any, int | None]:
    """What wasmtime_linker_define_func_unchecked gets for a host callback of _host_callback:
    (object to keep alive as long as the store, callback pointer, env pointer)."""
    if native:
        typed = isinstance(callback, _native.HostFn)
        entry = ctypes.cast(_native.TYPED_TRAMPOLINE if typed else _native.HOST_TRAMPOLINE,
                            _B.wasmtime_func_unchecked_callback_t)
        return callback, entry, id(callback)
    closure = _HostCallback(callback)
    return closure, ctypes.cast(closure, _B.wasmtime_func_unchecked_callback_t), None


def guarded_host(fn: Callable[..., Any], first: object, bad_memory: Any, internal: Any,
                 on_error: Callable[[Exception], object]) -> Callable[..., Any] | None:
    """``fn(first, *args)`` as a C callable that answers ``bad_memory`` for a
    MemoryAccessError, lets Trap, HostTrap and non-Exceptions through and hands any other
    Exception to ``on_error`` and answers ``internal``: abi/hostcalls.py's guarded() wrapper
    without its Python frame on every host call. None when the C path is off (its caller
    then generates the wrapper in Python)."""
    if not USE_NATIVE:
        return None
    return _native.Guarded(fn, first, bad_memory, internal, on_error,
                           MemoryAccessError, (Trap, HostTrap))


def _new_trap(message: str) -> int:
    data = message.encode("utf-8", "replace")
    return _trap_new(data, len(data)) or 0


def _new_error(message: str) -> int:
    return ctypes.cast(_B.wasmtime_error_new(message.encode()), c_void_p).value or 0


# -- per-signature code generation -------------------------------------------------------
# One slot of 16 bytes per value; i32 is read with "I" so it arrives unsigned for free.

_UNPACK = {"i32": "I12x", "i64": "q8x", "f32": "f12x", "f64": "d8x"}
_PACK = {"i32": "I12x", "i64": "Q8x", "f32": "f12x", "f64": "d8x"}
_MASK = {"i32": " & 0xFFFFFFFF", "i64": " & 0xFFFFFFFFFFFFFFFF", "f32": "", "f64": ""}


def _struct(types: tuple[str, ...], table: dict[str, str]) -> struct.Struct:
    return struct.Struct("<" + "".join(table[t] for t in types))


def _packed(names: list[str], types: tuple[str, ...]) -> str:
    return ", ".join(f"{n}{_MASK[t]}" for n, t in zip(names, types))


@functools.lru_cache(maxsize=None)
def _factory(src: str, env_names: tuple[str, ...], name: str) -> Callable[..., Callable]:
    """Compile a template once; each call of the returned factory binds it to its values.

    Generated per signature so the hot path has no loops over arguments; cached per template
    text so building an instance (29+ host functions) compiles nothing after the first time.
    """
    body = textwrap.indent(src, "    ")
    code = f"def factory({', '.join(env_names)}):\n{body}\n    return {name}\n"
    scope: dict[str, Any] = {}
    exec(compile(code, f"<wasmgate engine: {name}>", "exec"), scope)
    return scope["factory"]


def _bind(src: str, env: dict[str, Any], name: str) -> Callable:
    return _factory(src, tuple(env), name)(**env)


_GUEST_CALL_SRC = """
def {fn}({args}):
    if st.depth or st.poisoned:
        return nested({args})
    st.depth = 1                # before the rate limit: the ticker relies on it (see _Ticker)
    {start}
    try:
        if monotonic() - st.armed_at > REARM_S:
            st.arm()
        pack_into(buf, 0{comma_packed})
        err = call_raw(ctx, fptr, bufaddr, nslots, trapaddr)
    finally:
        st.depth = 0{count}
    if err or trap_slot.value or st.poisoned:
        raise st.failure(err)
    {ret}

def nested({args}):
    # From inside a host function (e.g. the guest allocator). Reusing one buffer even when
    # this export is re-entered is safe: wasmtime reads arguments on entry and writes results
    # on exit, and we unpack ours before the outer call can finish.
    if st.poisoned:
        raise st.refusal()
    pack_into(nbuf, 0{comma_packed})
    st.depth += 1
    try:
        err = call_raw(ctx, fptr, nbufaddr, nslots, trapaddr)
    finally:
        st.depth -= 1
    if err or trap_slot.value:
        raise st.failure(err)
    buf = nbuf
    {ret}
"""

_HOST_CALLBACK_SRC = """
def callback(env, caller, raw, nraw):
    try:{boot}
        {view}
        {unpack}
        r = fn({args})
        {pack}
        if st.poisoned:
            return st.unwind()
        return 0
    except BaseException as e:
        return st.host_failed(e)
"""


class CallState(Protocol):
    """A store's call state (store._StoreState, above this module) as the generated crossings
    above and the ticker read and set it."""
    ctx: int                        # wasmtime_context_t*
    trap_slot: c_void_p             # wasm_trap_t* out-param of every call
    armed_at: float                 # time.monotonic() of the last arm()
    tally: Any                      # a Tally top-level calls add to, or None
    depth: int                      # guest calls in progress
    poisoned: bool

    def arm(self) -> None: ...
    def failure(self, err: int | None) -> BaseException: ...
    def refusal(self) -> BaseException: ...
    def host_failed(self, exc: BaseException) -> int: ...
    def unwind(self) -> int: ...


def _buffer_address(buf: bytearray) -> int:
    # The bytearray is never resized, so its storage address is stable while it is alive
    # (the generated caller keeps it alive).
    return ctypes.addressof((c_char * len(buf)).from_buffer(buf))


_GUEST_CODES = {"i32": ("I", "I"), "i64": ("Q", "q")}    # (param, result) codes of GuestFn


def _guest_caller(owner: object, st: CallState, name: str, fptr: int,
                  params: tuple[str, ...], results: tuple[str, ...],
                  native: bool = False) -> Callable[..., Any]:
    """The caller of a guest export: on the C crossings, for integer signatures with at most
    one result (every Proxy-Wasm callback and allocator), a ``_native.GuestFn`` that does all
    of the generated code below in C (no frame, struct or arm check in Python); otherwise the
    generated caller."""
    if native and len(results) <= 1 and len(params) <= 16 and \
            all(t in _GUEST_CODES for t in params + results):
        call = _native.GuestFn(st, name, st.ctx, fptr, ctypes.addressof(st.trap_slot),
                               "".join(_GUEST_CODES[t][0] for t in params),
                               "".join(_GUEST_CODES[t][1] for t in results))
        call._owner = owner     # as below
        return call
    names = [f"a{i}" for i in range(len(params))]
    nslots = max(len(params), len(results), 1)
    buf = bytearray(nslots * _SLOT)
    nbuf = bytearray(nslots * _SLOT)
    if not results:
        ret = "return None"
    elif len(results) == 1:
        ret = "return unpack_from(buf)[0]"
    else:
        ret = "return unpack_from(buf)"
    packed = _packed(names, params)
    tally = st.tally            # set when the store is made, before any caller
    src = _GUEST_CALL_SRC.format(fn="call", args=", ".join(names),
                                 comma_packed=", " + packed if packed else "", ret=ret,
                                 start="t0 = perf_counter_ns()" if tally is not None else "",
                                 count=_COUNT_SRC if tally is not None else "")
    env = {
        "st": st, "monotonic": time.monotonic, "REARM_S": REARM_S, "ctx": st.ctx, "fptr": fptr,
        "buf": buf, "bufaddr": _buffer_address(buf),
        "nbuf": nbuf, "nbufaddr": _buffer_address(nbuf), "nslots": nslots,
        "trap_slot": st.trap_slot, "trapaddr": ctypes.addressof(st.trap_slot),
        "call_raw": _native.call if native else _call_unchecked,
        "pack_into": _struct(params, _PACK).pack_into,
        "unpack_from": _struct(results, _UNPACK).unpack_from,
        "tally": tally, "perf_counter_ns": time.perf_counter_ns,
    }
    call = _bind(src, env, "call")
    call.__name__ = call.__qualname__ = name
    call._owner = owner     # a caller keeps its instance (owner; and so its store) alive
    return call


_COUNT_SRC = """
        tally.calls += 1
        tally.ns += perf_counter_ns() - t0"""


_BOOT_SRC = """
        if boot:
            boot(caller)"""


_TYPED_CODES = {"i32": ("I", "I"), "i64": ("q", "Q")}     # (param, result) codes of HostFn


def _host_callback(st: CallState, fn: Callable, params: tuple[str, ...],
                   results: tuple[str, ...], boot: bool = False,
                   native: bool = False) -> Callable:
    """The Python side of a host function. ``native``: called by _crossing.c's trampoline,
    which hands the argument slots as a memoryview rather than an address; or, for the
    signatures every Proxy-Wasm host function has (integers, at most one result, no boot
    hook), a ``_native.HostFn`` that does all of the generated code below in C (~0.2 us less
    per call, no memoryview or frame).

    With ``boot`` (modules with a start function only, so other modules pay nothing), its
    closure cell ``boot`` is None except while the module instantiates: then it holds a hook
    that gets the wasmtime caller first.
    """
    if native and not boot and len(results) <= 1 and len(params) <= 16 and \
            all(t in _TYPED_CODES for t in params + results):
        return _native.HostFn(st, fn, "".join(_TYPED_CODES[t][0] for t in params),
                              "".join(_TYPED_CODES[t][1] for t in results))
    names = [f"a{i}" for i in range(len(params))]
    nslots = max(len(params), len(results))
    view = ("v = raw" if native else "v = slots.from_address(raw)") if nslots else "pass"
    unpack = f"{', '.join(names)}, = unpack_from(v)" if params else "pass"
    if not results:
        pack = "pass"    # a stray return value is ignored, as a void C function would
    elif len(results) == 1:
        pack = f"pack_into(v, 0, {_packed(['r'], results)})"
    else:
        pack = f"pack_into(v, 0, {_packed([f'r[{i}]' for i in range(len(results))], results)})"
    src = _HOST_CALLBACK_SRC.format(view=view, unpack=unpack, args=", ".join(names), pack=pack,
                                    boot=_BOOT_SRC if boot else "")
    env = {"st": st, "fn": fn, "boot": None, "slots": c_char * (nslots * _SLOT),
           "unpack_from": _struct(params, _UNPACK).unpack_from,
           "pack_into": _struct(results, _PACK).pack_into}
    return _bind(src, env, "callback")
