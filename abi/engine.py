"""Every Python <-> wasm crossing of wasmgate lives here; nothing else imports ``wasmtime``.

* ``Engine`` compiles modules (with an on-disk cache) and owns the epoch ticker that
  enforces CPU deadlines. One per process (workers are separate processes).
* ``Instance`` is one Store + one instance: host functions are linked from a dict keyed by
  ``(module, name)`` (a pair imported twice with one type is defined once), exports are
  called through cached fast callers. ``close()`` frees it deterministically (otherwise the
  GC does, since callers and memory keep it alive). Each top-level call gets a CPU deadline
  (``set_deadline_ms`` changes it); instantiation gets its own. Host functions called by a
  start function can already use ``memory`` and exports (see ``on_created``); a memory import
  is satisfied with a fresh memory capped by the memory limit.
* ``Memory`` is bounds-checked access to the instance's exported linear memory.
* A guest call that ends abnormally raises ``Trap`` (kind: trap | deadline | exit | host) and
  poisons the instance.

i32 values cross as UNSIGNED Python ints in both directions (masked here, in one place);
i64 values cross signed.

Why the raw C API: wasmtime-py's ``Func.__call__`` re-reads the function type, boxes every
value and walks a context manager on each call (~30-44 us here); a Python host function pays
~11-12 us and ``Memory.read`` ~4 us. The hot paths below go straight to
``wasmtime_func_call_unchecked`` and ``wasmtime_linker_define_func_unchecked`` through ctypes
prototypes that take plain integer addresses, with code generated once per signature; memory
is a cached memoryview. Measured (``python -m bench.crossing``, quiet machine): guest call
~0.75 us, host call ~0.5 us, 32-byte read ~0.13 us. Cold paths (compile, link, instantiate,
trap decoding) keep using the public wasmtime-py API, except type inspection, which aborts the
process on v128/GC types and is therefore read from the binary here.

Not thread-safe: one thread at a time uses an Instance. abi/filter.py builds and starts each
instance on a build thread, then hands it to the worker's event loop; guest code releases the
GIL (so the loop runs meanwhile) and the CPU deadline follows whichever thread runs the call.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import os
import struct
import textwrap
import threading
import time
import weakref
from ctypes import CFUNCTYPE, POINTER, c_char, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import wasmtime as wt
from wasmtime import _bindings as _B
from wasmtime._ffi import WASMTIME_EXTERN_FUNC, WASMTIME_EXTERN_MEMORY
from wasmtime._trap import Frame, FrameList

__all__ = [
    "Engine", "EngineError", "Export", "HostTrap", "Import", "Instance", "Memory",
    "MemoryAccessError", "Module", "Trap", "WASMTIME_VERSION",
]

WASMTIME_VERSION = "50.0.1"   # pinned: the raw signatures below are checked against it
EPOCH_MS = 1                  # one epoch = 1 ms of CPU time; deadlines count these ticks
_EPOCH_NS = EPOCH_MS * 1_000_000
_UPDATE_DEADLINE_CONTINUE = 0  # wasmtime_update_deadline_kind_t
TICKER_PERIOD_S = 0.002       # how often the ticker advances the epoch (deadline slack)
REARM_S = 0.002               # a store re-arms its deadline at most this often (cost: a C call)
TABLE_ELEMENTS_FLOOR = 100_000  # table cap never below this (big Go binaries have ~10k funcs)
INSTANTIATE_DEADLINE_MS = 1000  # default floor of the deadline of instantiation (start section)
WASM_PAGE = 65536
_CACHE_MAGIC = b"WGCWASM1"    # our cache-file header: magic + sha256(payload) + payload
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_SLOT = 16                    # sizeof(wasmtime_val_raw_t)


class EngineError(Exception):
    """Compile, link or instantiate failure; the message is meant for users."""


class Trap(Exception):
    """A guest call ended abnormally."""

    def __init__(self, kind: str, message: str, backtrace: list[str] | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind                  # "trap" | "deadline" | "exit" | "host"
        self.message = message
        self.backtrace = backtrace or []  # innermost first


class HostTrap(Exception):
    """Raised by a host function to trap the guest on purpose (proc_exit, fatal misuse)."""


class MemoryAccessError(Exception):
    """A (ptr, len) pair outside linear memory."""


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    kind: str                       # "func" | "memory" | "table" | "global"
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    # memory imports: (minimum, maximum or None) in 64 KiB pages; flags "shared", "i64"
    limits: tuple[int, int | None] | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Export:
    kind: str
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()


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
        raise ImportError(f"abi/engine.py drives wasmtime {WASMTIME_VERSION} raw; "
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

# Releases the GIL while wasm runs (so the epoch ticker thread can interrupt a spinning guest).
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


def _new_trap(message: str) -> int:
    data = message.encode("utf-8", "replace")
    return _trap_new(data, len(data)) or 0


def _new_error(message: str) -> int:
    return ctypes.cast(_B.wasmtime_error_new(message.encode()), c_void_p).value or 0


# -- engine, cache -----------------------------------------------------------------------

def _default_cache_dir() -> Path:
    env = os.environ.get("WASMGATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wasmgate"


class _Ticker:
    """Background thread that keeps the engine epoch at the milliseconds of CPU time that the
    threads running guest calls have consumed.

    Why CPU time, and per thread: a deadline stops a guest that *computes* too long. Measured
    on the wall clock it also fired on healthy filters whose worker was merely descheduled
    (CPU contention: 3 spurious traps per ~1M requests under load). The process CPU clock
    would still charge a call for CPU burnt by other threads of the worker meanwhile
    (module compiles in ``to_thread`` during a reload, wasmtime's parallel compiler), and a
    guest waiting for the GIL while another thread runs Python. So the epoch advances by the
    CPU clock (CLOCK_THREAD_CPUTIME) of each thread that has a store in a guest call: by the
    largest advance among them, so every running call is charged at least its own CPU time
    (a deadline cannot become infinite, whichever thread runs the guest). While guests run on
    two threads at once (an instance starting on a build thread while the event loop runs
    guest calls), the epoch follows the busier one, so a store's deadline can come early:
    the engine then calls ``_StoreState.deadline_reached``, which charges the call only its
    own thread's CPU since the arm and lets it go on for what is left.

    Which threads: ``_StoreState.arm`` registers the store with its thread's clock (the hot
    path re-arms at most every REARM_S). The ticker forgets a store that is not in a call
    (``depth == 0``) and was armed more than REARM_S ago: a call sets ``depth`` *before* it
    checks the re-arm rate limit, so any later call of that store finds its arm stale and
    registers again. One thread at a time uses an Instance; its first call after instantiation
    (possibly on another thread) always re-arms.

    Why this shape: a Python thread wake-up costs ~20-25 us of CPU on these machines, so the
    ticker wakes every TICKER_PERIOD_S (not every ms) and sets the epoch to the clock, so sleep
    jitter does not stretch deadlines. The epoch never runs ahead of ``now_ms()``; when the
    ticker is starved (GIL, CPU) it lags, and catches up in one burst when it runs again.
    ``_StoreState.arm`` adds the current lag to the deadline, so that burst never cuts a call
    short. With no store registered the ticker sleeps until the next arm wakes it (an idle
    worker costs nothing); the epoch then resumes where it stopped.

    Python's cyclic garbage collector is not charged either: a collection triggered by an
    allocation inside a host function runs on the guest's thread, and with a large heap a full
    collection takes 100+ ms of CPU (seen in the test process) — longer than a callback
    deadline, for work that is not the guest's. ``_gc_callback`` counts each thread's GC CPU
    time and the deadline clock is the thread's CPU clock minus it; while a collection runs, that
    thread's clock stands still at its start (the ticker can get the GIL mid-collection, when
    finalizers run Python code).

    Holds only the wasmtime engine, so our Engine can be collected (its finalizer stops us).
    """

    def __init__(self, wt_engine: wt.Engine):
        self.epoch = 0              # engine epoch, published after the engine has reached it
        self.cpu_ns = 0             # the deadline clock: CPU ns charged to guest calls so far
        self.idle = False
        self._calls: dict[Any, int] = {}    # _StoreState -> CPU clock id of the arming thread
        self._last: dict[int, int] = {}     # CPU clock id -> its charged reading at the last tick
        self._gc: dict[int, _GcTime] = {}   # CPU clock id -> that thread's GC time
        self._lock = threading.Lock()
        self._local = threading.local()     # per thread: its clock id (dies with the thread)
        self._stopped = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(wt_engine,),
                                        name="wasmgate-epoch", daemon=True)
        self._thread.start()

    def register(self, st: "_StoreState") -> int:
        """Count the CPU time of this thread while ``st`` may run a call; returns the lag (ms):
        how far the engine epoch may still jump at once."""
        clock = getattr(self._local, "clock", None)
        if clock is None:
            clock = self._local.clock = _thread_cpu_clock()
            self._gc[clock] = _gc_time_of_this_thread()
        with self._lock:
            if clock not in self._last:
                reading = self._charged(clock)
                if reading is None:     # never uncounted: fall back to the process clock
                    clock = self._local.clock = time.CLOCK_PROCESS_CPUTIME_ID
                    reading = time.clock_gettime_ns(clock)
                self._last[clock] = reading
            self._calls[st] = clock
            st.armed_at = time.monotonic()
            return max(0, self._target(self._pending_ns()) - self.epoch)

    def now_ms(self) -> int:
        with self._lock:
            return self._target(self._pending_ns())

    def _charged(self, clock: int) -> int | None:
        """A thread's CPU clock minus its GC time (None: the thread has exited)."""
        reading = _read_clock(clock)
        gc_time = self._gc.get(clock)
        if reading is None or gc_time is None:
            return reading
        return (gc_time.started or reading) - gc_time.ns

    def _pending_ns(self) -> int:
        """CPU time charged since the last tick (lock held)."""
        step = 0
        for clock, last in self._last.items():
            reading = self._charged(clock)
            if reading is not None and reading - last > step:
                step = reading - last
        return step

    def _target(self, pending_ns: int) -> int:
        return (self.cpu_ns + pending_ns) // (EPOCH_MS * 1_000_000)

    def _tick(self) -> tuple[int, bool]:
        """Advance the clock, forget finished calls; (target epoch, nothing registered)."""
        now = time.monotonic()
        with self._lock:
            calls = self._calls
            for st in [st for st in calls if not st.depth and now - st.armed_at > REARM_S]:
                del calls[st]
            live = set(calls.values())
            step = 0
            for clock in list(self._last):
                reading = self._charged(clock) if clock in live else None
                if reading is None:             # no call on that thread (or thread gone)
                    del self._last[clock]
                    continue
                step = max(step, reading - self._last[clock])
                self._last[clock] = reading
            self.cpu_ns += step
            quiet = not calls
            if quiet:                       # under the lock: register() then sees idle
                self._wake.clear()
                self.idle = True
            return self._target(0), quiet

    def _run(self, wt_engine: wt.Engine) -> None:
        ptr = _addr(wt_engine.ptr())
        while not self._stopped:
            time.sleep(TICKER_PERIOD_S)
            target, quiet = self._tick()
            epoch = self.epoch
            while epoch < target:
                _increment_epoch(ptr)
                epoch += 1
            self.epoch = epoch
            if quiet:
                # register() adds under the lock, then reads idle: either _tick saw the store,
                # or register() sees idle and wakes us.
                if not self._stopped:
                    self._wake.wait()
                self.idle = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()


class _GcTime:
    """CPU time one thread has spent in Python's cyclic GC."""
    __slots__ = ("ns", "started")

    def __init__(self) -> None:
        self.ns = 0
        self.started = 0            # the thread's CPU clock when a running collection began


_gc_local = threading.local()


def _gc_time_of_this_thread() -> _GcTime:
    acc = getattr(_gc_local, "acc", None)
    if acc is None:
        acc = _gc_local.acc = _GcTime()
    return acc


def _charged_cpu_ns() -> int:
    """The calling thread's deadline clock: its CPU time minus its time in the cyclic GC (a
    collection in progress stands still at its start), as the ticker reads it."""
    acc = _gc_time_of_this_thread()
    return (acc.started or time.thread_time_ns()) - acc.ns


def _gc_callback(phase: str, info: dict, _now=time.thread_time_ns, _local=_gc_local) -> None:
    acc = getattr(_local, "acc", None)
    if acc is None:
        return                      # a thread that never ran a guest call
    if phase == "start":
        acc.started = _now()
    else:
        acc.ns += _now() - acc.started
        acc.started = 0


gc.callbacks.append(_gc_callback)


def _thread_cpu_clock() -> int:
    """The calling thread's CPU clock id; the process CPU clock where there is none (then
    other threads' CPU counts too: deadlines fire early, never late)."""
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return time.CLOCK_PROCESS_CPUTIME_ID


def _read_clock(clock: int) -> int | None:
    try:
        return time.clock_gettime_ns(clock)
    except OSError:                 # the thread has exited
        return None


class Engine:
    """One wasmtime engine with epoch interruption and a compiled-module disk cache."""

    def __init__(self, cache_dir: Path | None = None):
        cfg = wt.Config()
        cfg.epoch_interruption = True
        # Linear memory never moves when it grows, so a cached base address stays valid and
        # only the cached size needs refreshing (see Memory).
        cfg.memory_may_move = False
        self._wt = wt.Engine(cfg)
        self.version = WASMTIME_VERSION
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self._ticker = _Ticker(self._wt)
        self._finalizer = weakref.finalize(self, self._ticker.stop)

    def close(self) -> None:
        """Stop the epoch ticker (instances of this engine then never hit their deadline)."""
        self._finalizer()

    def compile(self, wasm: bytes, name: str = "") -> "Module":
        """Compile a module (binary or WAT text); reuse the disk cache when possible.

        ``name`` (e.g. "auth.wasm") prefixes backtrace frames.
        """
        digest = hashlib.sha256(wasm).hexdigest()
        binary = _to_binary(wasm)
        path = self.cache_dir / f"{digest}-{self.version}.cwasm"
        wt_module = self._load_cached(path)
        cache_hit = wt_module is not None
        if wt_module is None:
            wt_module = self._compile_fresh(binary)
            self._store_cached(path, wt_module)
        return Module(wt_module, digest, name, cache_hit, _parse_signatures(binary))

    def _compile_fresh(self, binary: bytes) -> wt.Module:
        try:
            return wt.Module(self._wt, binary)
        except wt.WasmtimeError as e:
            raise EngineError(f"invalid wasm module: {e}") from None

    def _load_cached(self, path: Path) -> wt.Module | None:
        # A cache entry is trusted native code: verify our checksum before deserializing,
        # and treat any problem as a miss (recompile and overwrite).
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        head = len(_CACHE_MAGIC) + 32
        payload = blob[head:]
        if blob[:len(_CACHE_MAGIC)] != _CACHE_MAGIC or \
                hashlib.sha256(payload).digest() != blob[len(_CACHE_MAGIC):head]:
            return None
        try:
            return wt.Module.deserialize(self._wt, payload)
        except wt.WasmtimeError:
            return None

    def _store_cached(self, path: Path, module: wt.Module) -> None:
        try:
            payload = bytes(module.serialize())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(_CACHE_MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)   # atomic: concurrent workers never see half a file
        except (OSError, wt.WasmtimeError):
            pass                    # the cache is an optimisation, never a failure


def _to_binary(wasm: bytes) -> bytes:
    if wasm.startswith(b"\0asm"):
        return wasm
    try:
        return bytes(wt.wat2wasm(wasm.decode("utf-8")))
    except (wt.WasmtimeError, UnicodeDecodeError) as e:
        raise EngineError(f"invalid wasm module: {e}") from None


class _Reader:
    """Just enough of the wasm binary format to read signatures of imports and exports.

    Why not wasmtime-py's ImportType/ExportType: asking it for a v128 or GC reference value
    type calls ``wasm_valtype_kind``, which aborts the whole process. The module is already
    validated by wasmtime when this runs, so only the unsupported-but-valid cases matter.
    """

    _VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
                 0x70: "funcref", 0x6F: "externref"}

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def leb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self) -> str:
        n = self.leb()
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def valtype(self) -> str:
        b = self.byte()
        if b in self._VALTYPES:
            return self._VALTYPES[b]
        if b in (0x63, 0x64):               # (ref null? heaptype): typed function references
            self.leb()
            return "ref"
        raise EngineError(f"unsupported wasm value type 0x{b:02x}")

    def limits(self) -> tuple[int, int | None, int]:
        """(minimum, maximum or None, flags byte)."""
        flags = self.byte()
        minimum = self.leb()
        maximum = self.leb() if flags & 0x01 else None
        if flags & 0x08:                    # custom-page-sizes: page size log2
            self.leb()
        return minimum, maximum, flags


_Sig = tuple[tuple[str, ...], tuple[str, ...]]


def _parse_signatures(binary: bytes) -> tuple[list[Import], dict[str, Export], dict[int, str],
                                               bool]:
    """Imports and exports with value types, function index -> export name (so backtraces
    of stripped modules still name ``proxy_on_request_headers``), and whether the module has
    a start function."""
    types: list[_Sig] = []
    imports: list[Import] = []
    func_types: list[int] = []              # type index per function index
    exports: dict[str, Export] = {}
    names: dict[int, str] = {}
    has_start = False
    r = _Reader(binary, 8)
    try:
        while r.pos < len(binary):
            section, size = r.byte(), r.leb()
            end = r.pos + size
            if section == 1:
                types = [_functype(r) for _ in range(r.leb())]
            elif section == 2:
                for _ in range(r.leb()):
                    imports.append(_import(r, types, func_types))
            elif section == 3:
                func_types += [r.leb() for _ in range(r.leb())]
            elif section == 7:
                for _ in range(r.leb()):
                    name, kind, index = r.name(), r.byte(), r.leb()
                    if kind == 0:
                        exports[name] = Export("func", *types[func_types[index]])
                        names.setdefault(index, name)
                    else:
                        exports[name] = Export(_EXTERN_KINDS.get(kind, "unknown"))
            elif section == 8:
                has_start = True
            r.pos = end
    except (IndexError, ValueError) as e:
        raise EngineError(f"cannot read the module's imports/exports: {e}") from None
    return imports, exports, names, has_start


_EXTERN_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


def _functype(r: _Reader) -> _Sig:
    form = r.byte()
    if form != 0x60:
        raise EngineError("unsupported wasm type definition (GC proposal)")
    params = tuple(r.valtype() for _ in range(r.leb()))
    results = tuple(r.valtype() for _ in range(r.leb()))
    return params, results


def _import(r: _Reader, types: list[_Sig], func_types: list[int]) -> Import:
    module, name, kind = r.name(), r.name(), r.byte()
    if kind == 0:
        index = r.leb()
        func_types.append(index)
        return Import(module, name, "func", *types[index])
    if kind == 1:
        r.valtype()
        r.limits()
    elif kind == 2:
        minimum, maximum, flags = r.limits()
        odd = tuple(f for bit, f in ((0x02, "shared"), (0x04, "i64"), (0x08, "page-size"))
                    if flags & bit)
        return Import(module, name, "memory", limits=(minimum, maximum), flags=odd)
    elif kind == 3:
        r.valtype()
        r.byte()
    elif kind == 4:
        r.byte()
        r.leb()                         # a tag's type index
    return Import(module, name, _EXTERN_KINDS.get(kind, "unknown"))


class Module:
    """A compiled module: its sha256, imports and exports (with value types)."""

    def __init__(self, wt_module: wt.Module, sha256: str, name: str,
                 cache_hit: bool,
                 signatures: tuple[list[Import], dict[str, Export], dict[int, str], bool]):
        self._wt = wt_module
        self.sha256 = sha256
        self.name = name
        self.cache_hit = cache_hit
        self.imports, self.exports, self._export_names, self.has_start = signatures


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
    try:
        if monotonic() - st.armed_at > REARM_S:
            st.arm()
        pack_into(buf, 0{comma_packed})
        err = call_raw(ctx, fptr, bufaddr, nslots, trapaddr)
    finally:
        st.depth = 0
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


def _buffer_address(buf: bytearray) -> int:
    # The bytearray is never resized, so its storage address is stable while it is alive
    # (the generated caller keeps it alive).
    return ctypes.addressof((c_char * len(buf)).from_buffer(buf))


def _guest_caller(owner: "Instance", st: "_StoreState", name: str, fptr: int,
                  params: tuple[str, ...], results: tuple[str, ...]) -> Callable[..., Any]:
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
    src = _GUEST_CALL_SRC.format(fn="call", args=", ".join(names),
                                 comma_packed=", " + packed if packed else "", ret=ret)
    env = {
        "st": st, "monotonic": time.monotonic, "REARM_S": REARM_S, "ctx": st.ctx, "fptr": fptr,
        "buf": buf, "bufaddr": _buffer_address(buf),
        "nbuf": nbuf, "nbufaddr": _buffer_address(nbuf), "nslots": nslots,
        "trap_slot": st.trap_slot, "trapaddr": ctypes.addressof(st.trap_slot),
        "call_raw": _call_unchecked, "pack_into": _struct(params, _PACK).pack_into,
        "unpack_from": _struct(results, _UNPACK).unpack_from,
    }
    call = _bind(src, env, "call")
    call.__name__ = call.__qualname__ = name
    call._owner = owner     # a caller keeps its instance (and so its store) alive
    return call


_BOOT_SRC = """
        if boot:
            boot(caller)"""


def _host_callback(st: "_StoreState", fn: Callable, params: tuple[str, ...],
                   results: tuple[str, ...], boot: bool = False) -> Callable:
    """The Python side of a host function.

    With ``boot`` (modules with a start function only, so other modules pay nothing), its
    closure cell ``boot`` is None except while the module instantiates: then it holds a hook
    that gets the wasmtime caller first.
    """
    names = [f"a{i}" for i in range(len(params))]
    nslots = max(len(params), len(results))
    view = f"v = slots.from_address(raw)" if nslots else "pass"
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


# -- store state shared by callers, callbacks and memory ---------------------------------

class _StoreState:
    """Mutable per-Store facts read on every crossing; deliberately holds no reference to the
    Instance, so callbacks do not keep it alive."""

    def __init__(self, ctx: int, ticker: _Ticker, deadline_ticks: int, module: Module):
        self.ctx = ctx
        self.ticker = ticker
        self.deadline_ticks = deadline_ticks
        self.armed_at = -1e9            # time.monotonic() of the last arm()
        self.arm_cpu_ns = 0             # the arming thread's deadline clock at the last arm()
        self.budget_ns = 0              # the CPU the calls of that arm may use
        self.depth = 0                  # guest calls in progress (nesting through host calls)
        self.poisoned = False
        self.closed = False
        self.pending: BaseException | None = None   # why a host callback trapped the guest
        self.trap_slot = c_void_p(0)    # wasm_trap_t* out-param of every call
        self.module = module
        self.on_unwound: Callable[[], None] | None = None   # deferred close
        self.last_trap: Trap | None = None

    def arm(self) -> None:
        """Give the calls of the next REARM_S a fresh deadline (caller: ``depth`` already set,
        see _Ticker).

        The deadline is counted from the engine epoch, which may lag the clock and then jump:
        adding the current lag keeps that jump from eating into this deadline.
        """
        ticker = self.ticker
        self.arm_cpu_ns = _charged_cpu_ns()
        self.budget_ns = self.deadline_ticks * _EPOCH_NS
        _set_epoch_deadline(self.ctx, self.deadline_ticks + ticker.register(self))
        if ticker.idle:
            ticker.wake()

    # Called by the engine on the thread running the call (a ctypes callback): never raises.
    def deadline_reached(self, delta_p, kind_p) -> int:
        """The engine epoch passed this store's deadline. The epoch follows the busiest
        guest thread (see _Ticker): only the CPU of this thread since the arm counts. Some
        left: go on, checking again once the epoch has advanced that much; none: trap."""
        try:
            left = self.budget_ns - (_charged_cpu_ns() - self.arm_cpu_ns)
            if left > 0:
                delta_p[0] = -(-left // _EPOCH_NS)
                kind_p[0] = _UPDATE_DEADLINE_CONTINUE
                return 0
            self.poisoned = True
            if self.pending is None:
                self.pending = Trap("deadline", "wasm trap: interrupt")
            return _new_error("deadline")
        except BaseException:            # noqa: BLE001 - nothing may cross the C frame
            delta_p[0] = 1               # check again at the next epoch
            kind_p[0] = _UPDATE_DEADLINE_CONTINUE
            return 0

    # Called from inside a ctypes callback: must never raise.
    def host_failed(self, exc: BaseException) -> int:
        try:
            self.poisoned = True
            if self.pending is None:
                self.pending = exc
            text = exc.message if isinstance(exc, Trap) else str(exc) or type(exc).__name__
            return _new_trap(text)
        except BaseException:            # noqa: BLE001 - nothing may cross the C frame
            try:
                return _new_trap("host function failed")
            except BaseException:        # noqa: BLE001
                return 0                 # guest goes on; the outer call sees poisoned

    def unwind(self) -> int:
        """A host function returned normally although the instance got poisoned (a nested
        call trapped and the host swallowed it): unwind the guest too."""
        try:
            if self.pending is None:
                self.pending = self.last_trap
            return _new_trap("instance poisoned during this call")
        except BaseException:            # noqa: BLE001
            return 0

    def refusal(self) -> Trap:
        why = "closed" if self.closed else "poisoned by an earlier trap"
        return Trap("trap", f"instance is {why}")

    def failure(self, err: int | None) -> BaseException:
        """Turn the outcome of a failed raw call into the exception to raise."""
        trap_ptr, self.trap_slot.value = self.trap_slot.value, None
        wt_trap = wt.Trap._from_ptr(ctypes.cast(trap_ptr, POINTER(_B.wasm_trap_t))) \
            if trap_ptr else None
        wt_err = wt.WasmtimeError._from_ptr(ctypes.cast(err, POINTER(_B.wasmtime_error_t))) \
            if err else None
        return self.conclude(wt_trap, wt_err)

    def conclude(self, wt_trap, wt_err) -> BaseException:
        """Poison the store and pick the exception that explains why the call failed."""
        self.poisoned = True
        pending, self.pending = self.pending, None
        if self.depth == 0 and self.on_unwound is not None:
            self.on_unwound()
        if pending is not None and not isinstance(pending, Exception):
            return pending               # KeyboardInterrupt, SystemExit: not ours to mask
        self.last_trap = self._classify(pending, wt_trap, wt_err)
        return self.last_trap

    def _classify(self, pending, wt_trap, wt_err) -> Trap:
        frames = self._backtrace(wt_trap)
        if isinstance(pending, Trap):            # a nested call trapped, or the deadline
            if not pending.backtrace and wt_err is not None:
                pending.backtrace = self._error_backtrace(wt_err)
            return pending
        if isinstance(pending, HostTrap):
            return Trap("exit", str(pending), frames)
        if pending is not None:
            return Trap("host", f"{type(pending).__name__}: {pending}", frames)
        if wt_trap is not None:
            code = wt_trap.trap_code
            kind = "deadline" if code == wt.TrapCode.INTERRUPT else "trap"
            return Trap(kind, _short_message(wt_trap.message), frames)
        if wt_err is not None:
            return Trap("trap", _short_message(str(wt_err)))
        return Trap("trap", "instance poisoned during this call")

    def _backtrace(self, wt_trap) -> list[str]:
        return [] if wt_trap is None else self._frame_names(wt_trap.frames)

    def _error_backtrace(self, wt_err) -> list[str]:
        """The wasm frames of an error raised inside a call (deadline_reached's)."""
        frames = FrameList(wt_err)
        _B.wasmtime_error_wasm_trace(wt_err.ptr(), ctypes.byref(frames.vec))
        return self._frame_names([Frame._from_ptr(frames.vec.data[i], frames)
                                  for i in range(frames.vec.size)])

    def _frame_names(self, frames) -> list[str]:
        prefix = self.module.name or "wasm"
        names = self.module._export_names
        out = []
        for f in frames:
            idx = f.func_index
            out.append(f"{prefix}!{f.func_name or names.get(idx) or f'func[{idx}]'}")
        return out


def _short_message(text: str) -> str:
    # wasmtime appends the backtrace and puts the cause last; frames are reported separately.
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


# -- memory ------------------------------------------------------------------------------

_EMPTY = memoryview(bytearray())


class Memory:
    """Bounds-checked view of an instance's exported linear memory.

    Memory only grows and (memory_may_move=False) never moves, so a view over the first
    ``_size`` bytes stays valid for the store's lifetime; an access beyond it re-reads the
    size once (the guest may have grown) before failing.
    """

    __slots__ = ("_st", "_handle", "_view", "_size", "_owner", "__weakref__")

    def __init__(self, owner: "Instance", st: _StoreState, wt_memory: wt.Memory):
        self._owner = owner               # keeps the store alive while the view is in use
        self._st = st
        self._handle = wt_memory          # owns the wasmtime_memory_t we pass by address
        self._view = _EMPTY
        self._size = 0
        self._refresh()

    def _refresh(self) -> None:
        st = self._st
        if st.closed:
            self._view, self._size = _EMPTY, 0
            return
        mem = ctypes.addressof(self._handle._memory)
        size = _memory_data_size(st.ctx, mem)
        if size and size != self._size:
            base = _memory_data(st.ctx, mem)
            self._view = memoryview((c_char * size).from_address(base)).cast("B")
        self._size = size

    def _detach(self) -> None:
        self._view, self._size = _EMPTY, 0

    def _check(self, ptr: int, length: int) -> None:
        if ptr >= 0 and length >= 0:
            self._refresh()
            if ptr + length <= self._size:
                return
        raise MemoryAccessError(f"({ptr}, {length}) outside linear memory of {self._size} bytes")

    def size(self) -> int:
        self._refresh()
        return self._size

    def read(self, ptr: int, length: int) -> bytes:
        end = ptr + length
        if not 0 <= ptr <= end <= self._size:
            self._check(ptr, length)
        return self._view[ptr:end].tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        end = ptr + len(data)
        if not 0 <= ptr <= end <= self._size:
            self._check(ptr, len(data))
        self._view[ptr:end] = data

    def read_u32(self, ptr: int) -> int:
        if not 0 <= ptr <= self._size - 4:
            self._check(ptr, 4)
        return _U32S.unpack_from(self._view, ptr)[0]

    def write_u32(self, ptr: int, v: int) -> None:
        if not 0 <= ptr <= self._size - 4:
            self._check(ptr, 4)
        _U32S.pack_into(self._view, ptr, v & _U32)

    def read_u64(self, ptr: int) -> int:
        if not 0 <= ptr <= self._size - 8:
            self._check(ptr, 8)
        return _U64S.unpack_from(self._view, ptr)[0]

    def write_u64(self, ptr: int, v: int) -> None:
        if not 0 <= ptr <= self._size - 8:
            self._check(ptr, 8)
        _U64S.pack_into(self._view, ptr, v & _U64)


_U32S = struct.Struct("<I")
_U64S = struct.Struct("<Q")


# -- instance ----------------------------------------------------------------------------

class Instance:
    """One module instance in its own Store, with memory cap and per-call CPU deadline.

    * ``deadline_ms``: CPU deadline of each top-level guest call; ``set_deadline_ms`` changes
      it (e.g. longer for a runtime's start-up, then back).
    * ``instantiate_deadline_ms``: deadline of instantiation itself (the module's start
      function); default ``max(INSTANTIATE_DEADLINE_MS, deadline_ms)``.
    * ``on_created(instance)``: called once linked, just before instantiation runs the start
      function, so host functions the start function calls can reach the instance; its
      ``memory`` is usable from them (the exported "memory" is resolved through the caller
      on the first host call, an imported memory exists from the start).
    * Memory imports (e.g. ``env.memory`` of some Emscripten builds) are satisfied with a
      fresh memory of the declared limits, its maximum capped by ``memory_limit_bytes``.
    """

    def __init__(self, engine: Engine, module: Module,
                 host_functions: dict[tuple[str, str], Callable[..., int | None]],
                 *, memory_limit_bytes: int, deadline_ms: int,
                 instantiate_deadline_ms: int | None = None,
                 on_created: Callable[["Instance"], None] | None = None):
        self.engine = engine
        self.module = module
        self.memory: Memory | None = None
        self._callers: dict[str, Callable[..., Any]] = {}
        self._callbacks: list[Any] = []       # ctypes closures: alive as long as the store
        self._boot_cells: list[Any] = []      # each host callback's ``boot`` closure cell
        self._linker: wt.Linker | None = None
        self._wt_instance = None
        self._boot_funcs: dict[str, wt.Func] = {}  # exports reached during instantiation
        self._store = wt.Store(engine._wt)
        # Tables get the same byte budget as memory (wasmtime counts 8 bytes per element):
        # otherwise a table.grow could allocate gigabytes outside the memory cap.
        self._store.set_limits(memory_size=memory_limit_bytes,
                               table_elements=max(TABLE_ELEMENTS_FLOOR, memory_limit_bytes // 8))
        self._st = st = _StoreState(_addr(self._store._context()), engine._ticker,
                                    self._ticks(deadline_ms), module)
        on_deadline = _DeadlineCallback(lambda ctx, env, delta_p, kind_p:
                                        st.deadline_reached(delta_p, kind_p))
        self._callbacks.append(on_deadline)
        _B.wasmtime_store_epoch_deadline_callback(self._store.ptr(), on_deadline, None,
                                                  _NO_FINALIZER)
        if instantiate_deadline_ms is None:
            instantiate_deadline_ms = max(INSTANTIATE_DEADLINE_MS, deadline_ms)
        try:
            self._link(host_functions, memory_limit_bytes)
            if on_created is not None:
                on_created(self)
            self._instantiate(self._ticks(instantiate_deadline_ms))
        except BaseException:
            self.close()
            raise

    def _ticks(self, ms: int) -> int:
        """Epoch ticks to arm for a deadline of ``ms``. A call may start up to REARM_S after
        the arm its deadline comes from, and the epoch is floored: never earlier than ``ms``;
        later by about one ticker period."""
        if ms <= 0:
            raise ValueError(f"deadline must be positive, got {ms} ms")
        return -(-ms // EPOCH_MS) + round(REARM_S * 1000) + 1

    def set_deadline_ms(self, ms: int) -> None:
        """CPU deadline of each top-level guest call from the next one on (a call in progress
        keeps the deadline it started with)."""
        st = self._st
        st.deadline_ticks = self._ticks(ms)
        st.armed_at = -1e9              # the next top-level call arms the new deadline

    @property
    def poisoned(self) -> bool:
        """True after any Trap: discard the instance. The ABI host may clear it for a trap it
        knows to be benign (proc_exit(0) at the end of a command's _start)."""
        return self._st.poisoned

    @poisoned.setter
    def poisoned(self, value: bool) -> None:
        st = self._st
        if value or not st.closed:
            st.poisoned = bool(value)
            st.pending = st.last_trap = None

    # -- linking -------------------------------------------------------------------------

    def _link(self, host_functions: dict[tuple[str, str], Callable[..., Any]],
              memory_limit_bytes: int) -> None:
        # A module may import the same (module, name) more than once (legal wasm): a linker
        # holds one definition per name, so define it once if the types agree.
        unique: dict[tuple[str, str], Import] = {}
        conflicts = []
        for imp in self.module.imports:
            first = unique.setdefault((imp.module, imp.name), imp)
            if first != imp:
                conflicts.append(f"{imp.module}.{imp.name} is imported twice with different "
                                 f"types: {_describe(first)} and {_describe(imp)}")
        if conflicts:
            raise EngineError("conflicting imports: " + "; ".join(conflicts))
        missing = [f"{imp.module}.{imp.name}" + ("" if imp.kind == "func" else f" ({imp.kind})")
                   for key, imp in unique.items()
                   if not (imp.kind == "memory" or
                           imp.kind == "func" and key in host_functions)]
        if missing:
            raise EngineError("unknown imports: " + ", ".join(missing))
        self._linker = wt.Linker(self.engine._wt)
        for key, imp in unique.items():
            if imp.kind == "memory":
                self._define_memory(imp, memory_limit_bytes)
            else:
                self._define(imp, host_functions[key])

    def _define_memory(self, imp: Import, memory_limit_bytes: int) -> None:
        what = f"{imp.module}.{imp.name}"
        if imp.flags:
            raise EngineError(f"{what}: unsupported memory import ({', '.join(imp.flags)})")
        minimum, maximum = imp.limits or (0, None)
        cap = memory_limit_bytes // WASM_PAGE
        if minimum > cap:
            raise EngineError(f"{what}: the imported memory needs {minimum} pages "
                              f"({minimum * WASM_PAGE} bytes), above the memory limit of "
                              f"{memory_limit_bytes} bytes")
        maximum = cap if maximum is None else min(maximum, cap)
        try:
            mem = wt.Memory(self._store, wt.MemoryType(wt.Limits(minimum, maximum)))
            self._linker.define(self._store, imp.module, imp.name, mem)
        except wt.WasmtimeError as e:
            raise EngineError(f"cannot define {what}: {_short_message(str(e))}") from None
        if self.memory is None:
            self.memory = Memory(self, self._st, mem)

    def _define(self, imp: Import, fn: Callable[..., Any]) -> None:
        _require_supported(f"{imp.module}.{imp.name}", imp.params + imp.results)
        # Only a start function runs host functions before the exports are reachable.
        boot = self.module.has_start
        callback = _host_callback(self._st, fn, imp.params, imp.results, boot)
        if boot:
            freevars = callback.__code__.co_freevars
            self._boot_cells.append(callback.__closure__[freevars.index("boot")])
        closure = _HostCallback(callback)
        self._callbacks.append(closure)
        ty = wt.FuncType([_VALTYPE[p] for p in imp.params], [_VALTYPE[r] for r in imp.results])
        mod, name = imp.module.encode(), imp.name.encode()
        err = _B.wasmtime_linker_define_func_unchecked(
            self._linker.ptr(), mod, len(mod), name, len(name), ty.ptr(),
            ctypes.cast(closure, _B.wasmtime_func_unchecked_callback_t), None, _NO_FINALIZER)
        if err:
            raise EngineError(f"cannot define {imp.module}.{imp.name}: "
                              f"{wt.WasmtimeError._from_ptr(err)}")

    def _instantiate(self, deadline_ticks: int) -> None:
        st = self._st
        boot = bool(self._boot_cells)
        if boot:                    # the start function's first host call resolves exports
            self._set_boot(self._resolve_exports)
        callback_ticks, st.deadline_ticks = st.deadline_ticks, deadline_ticks
        st.depth += 1               # the start function may call host functions; before arm()
        wt_trap = wt_err = None
        try:
            st.arm()
            self._wt_instance = self._linker.instantiate(self._store, self.module._wt)
        except wt.Trap as e:
            wt_trap = e
        except wt.WasmtimeError as e:
            if st.pending is None:
                raise EngineError(f"instantiation failed: {_short_message(str(e))}") from None
            wt_err = e
        finally:
            st.depth -= 1
            st.deadline_ticks = callback_ticks
            st.armed_at = -1e9      # the first call arms its own deadline
            if boot:
                self._set_boot(None)
                self._boot_funcs = {}
        if wt_trap is not None or st.poisoned:
            raise st.conclude(wt_trap, wt_err)
        mem = self._wt_instance.exports(self._store).get("memory")
        if isinstance(mem, wt.Memory) and (
                self.memory is None or not _same_memory(self.memory._handle, mem)):
            self.memory = Memory(self, st, mem)

    def _set_boot(self, hook: Callable[[int], None] | None) -> None:
        for cell in self._boot_cells:
            cell.cell_contents = hook

    def _resolve_exports(self, caller: int) -> None:
        """Boot hook: the start function calls a host function before the instance (and so
        its exports) is reachable from here. Find the exported memory and functions through
        the caller, once; their handles stay valid for the store's lifetime."""
        self._set_boot(None)
        if not caller:
            return
        caller_p = ctypes.cast(caller, POINTER(_B.wasmtime_caller_t))
        for name, exp in self.module.exports.items():
            want_memory = name == "memory" and exp.kind == "memory" and self.memory is None
            if exp.kind != "func" and not want_memory:
                continue
            ext = _B.wasmtime_extern_t()
            raw = name.encode()
            if not _B.wasmtime_caller_export_get(caller_p, raw, len(raw), ctypes.byref(ext)):
                continue
            if want_memory and ext.kind == WASMTIME_EXTERN_MEMORY.value:
                self.memory = Memory(self, self._st, wt.Memory._from_raw(ext.of.memory))
            elif ext.kind == WASMTIME_EXTERN_FUNC.value:
                self._boot_funcs[name] = wt.Func._from_raw(ext.of.func)

    # -- calls ---------------------------------------------------------------------------

    def has_export(self, name: str) -> bool:
        exp = self.module.exports.get(name)
        return exp is not None and exp.kind == "func"

    def export_func(self, name: str) -> Callable[..., int | None]:
        """A cached caller for export ``name``; raises KeyError if there is no such function."""
        caller = self._callers.get(name)
        if caller is None:
            caller = self._make_caller(name)
            self._callers[name] = caller
        return caller

    def _make_caller(self, name: str) -> Callable[..., int | None]:
        exp = self.module.exports.get(name)
        if exp is None or exp.kind != "func":
            raise KeyError(f"no exported function {name!r}")
        if self._st.closed:
            raise self._st.refusal()
        _require_supported(name, exp.params + exp.results)
        if self._wt_instance is not None:
            func = self._wt_instance.exports(self._store)[name]
        elif name in self._boot_funcs:      # called from the start function's host calls
            func = self._boot_funcs[name]
        else:
            raise KeyError(f"export {name!r} is not reachable yet (instantiation in progress "
                           "and no host call of the start function has run)")
        caller = _guest_caller(self, self._st, name, ctypes.addressof(func._func),
                               exp.params, exp.results)
        caller._func = func         # keeps the wasmtime_func_t we pass by address alive
        return caller

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the store, linker and callbacks. Inside a call, deferred to its unwinding."""
        st = self._st if hasattr(self, "_st") else None
        if st is not None:
            st.poisoned = True
            if st.depth:
                st.on_unwound = self.close
                return
            st.closed = True
            st.on_unwound = None
        if self.memory is not None:
            self.memory._detach()
        self._callers.clear()
        # Order matters: nothing can call a callback once store and linker are gone.
        for owner in ("_store", "_linker"):
            obj = getattr(self, owner, None)
            if obj is not None:
                obj.close()
                setattr(self, owner, None)
        self._wt_instance = None
        self._callbacks.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:            # noqa: BLE001 - interpreter teardown
            pass


def _describe(imp: Import) -> str:
    if imp.kind == "func":
        return f"func ({', '.join(imp.params)}) -> ({', '.join(imp.results)})"
    if imp.kind == "memory" and imp.limits is not None:
        lo, hi = imp.limits
        extra = "".join(f" {f}" for f in imp.flags)
        return f"memory {lo}..{'' if hi is None else hi} pages{extra}"
    return imp.kind


def _same_memory(a: wt.Memory, b: wt.Memory) -> bool:
    x, y = a._memory, b._memory
    return (x._anon_1.store_id == y._anon_1.store_id
            and getattr(x._anon_1, "__private1") == getattr(y._anon_1, "__private1")
            and getattr(x, "__private2") == getattr(y, "__private2"))


def _require_supported(what: str, types: tuple[str, ...]) -> None:
    odd = [t for t in types if t not in _VALTYPE]
    if odd:
        raise EngineError(f"{what}: unsupported value type {', '.join(odd)}")


_VALTYPE = {"i32": wt.ValType.i32(), "i64": wt.ValType.i64(),
            "f32": wt.ValType.f32(), "f64": wt.ValType.f64()}


# -- benchmark baseline ------------------------------------------------------------------

def public_api_crossing(wat: bytes, guest_export: str, guest_args: tuple[int, ...],
                        host_loop_export: str, host_import: tuple[str, str],
                        guest_calls: int, host_calls: int) -> dict[str, float]:
    """Time the same crossings through wasmtime-py's public API (the slow path this module
    avoids), for bench/crossing.py's side-by-side baseline. Not used by the gateway."""
    engine = wt.Engine()
    store = wt.Store(engine)
    module = wt.Module(engine, _to_binary(wat))
    linker = wt.Linker(engine)
    imp = next(i for i in module.imports if (i.module, i.name) == host_import)
    linker.define_func(imp.module, imp.name, imp.type, lambda *a: a[0] if imp.type.results else None)
    exports = linker.instantiate(store, module).exports(store)
    guest, loop = exports[guest_export], exports[host_loop_export]
    start = time.perf_counter()
    for _ in range(guest_calls):
        guest(store, *guest_args)
    guest_us = (time.perf_counter() - start) / guest_calls * 1e6
    start = time.perf_counter()
    loop(store, host_calls)
    host_us = (time.perf_counter() - start) / host_calls * 1e6
    return {"guest_call_us": guest_us, "host_call_us": host_us}
