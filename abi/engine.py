"""Every Python <-> wasm crossing of wasmgate lives here; nothing else imports ``wasmtime``.

Interface (other modules code against exactly this):

* ``Engine`` compiles modules (with an on-disk cache) and owns the epoch ticker that
  enforces CPU deadlines.
* ``Instance`` is one Store + one instance: host functions are linked from a dict keyed by
  ``(module, name)``, exports are called through cached fast callers.
* ``Memory`` is bounds-checked access to the instance's exported linear memory.
* A guest call that ends abnormally raises ``Trap`` (kind: trap | deadline | exit | host) and
  poisons the instance.

i32 values cross as UNSIGNED Python ints in both directions (masked here, in one place);
i64 values cross signed.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import wasmtime as wt

__all__ = [
    "Engine", "EngineError", "Export", "HostTrap", "Import", "Instance", "Memory",
    "MemoryAccessError", "Module", "Trap",
]

WASMTIME_VERSION = "50.0.1"
EPOCH_TICK_S = 0.001          # one epoch = 1 ms; deadlines are counted in these ticks
_CACHE_MAGIC = b"WGCWASM1"    # our cache-file header: magic + sha256(payload) + payload
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class EngineError(Exception):
    """Compile, link or instantiate failure; the message is meant for users."""


class Trap(Exception):
    """A guest call ended abnormally."""

    def __init__(self, kind: str, message: str, backtrace: list[str] | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.backtrace = backtrace or []


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


@dataclass(frozen=True)
class Export:
    kind: str
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()


def _default_cache_dir() -> Path:
    env = os.environ.get("WASMGATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wasmgate"


class _Ticker:
    """Background thread advancing the engine epoch every EPOCH_TICK_S.

    Holds only the wasmtime engine (not our Engine), so our Engine can be collected; the
    finalizer of our Engine stops the thread.
    """

    def __init__(self, wt_engine: wt.Engine):
        self._stop = threading.Event()
        self.ticks = 0
        self._thread = threading.Thread(target=self._run, args=(wt_engine,),
                                        name="wasmgate-epoch", daemon=True)
        self._thread.start()

    def _run(self, wt_engine: wt.Engine) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            wt_engine.increment_epoch()
            self.ticks += 1

    def stop(self) -> None:
        self._stop.set()


class Engine:
    """One wasmtime engine with epoch interruption and a compiled-module disk cache."""

    def __init__(self, cache_dir: Path | None = None):
        cfg = wt.Config()
        cfg.epoch_interruption = True
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
        path = self.cache_dir / f"{digest}-{self.version}.cwasm"
        wt_module = self._load_cached(path)
        cache_hit = wt_module is not None
        if wt_module is None:
            wt_module = self._compile_fresh(wasm)
            self._store_cached(path, wt_module)
        return Module(wt_module, digest, name, cache_hit)

    def _compile_fresh(self, wasm: bytes) -> wt.Module:
        try:
            if not wasm.startswith(b"\0asm"):
                wasm = wt.wat2wasm(wasm.decode("utf-8"))
            return wt.Module(self._wt, wasm)
        except (wt.WasmtimeError, UnicodeDecodeError) as e:
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


def _short_message(text: str) -> str:
    # wasmtime appends the backtrace and puts the cause last; we report frames separately.
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _valtypes(types) -> tuple[str, ...]:
    return tuple(str(t) for t in types)


def _extern_sig(ty) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    if isinstance(ty, wt.FuncType):
        return "func", _valtypes(ty.params), _valtypes(ty.results)
    if isinstance(ty, wt.MemoryType):
        return "memory", (), ()
    if isinstance(ty, wt.TableType):
        return "table", (), ()
    if isinstance(ty, wt.GlobalType):
        return "global", (), ()
    return "unknown", (), ()


class Module:
    """A compiled module: its sha256, imports and exports (with value types)."""

    def __init__(self, wt_module: wt.Module, sha256: str, name: str = "", cache_hit: bool = False):
        self._wt = wt_module
        self.sha256 = sha256
        self.name = name
        self.cache_hit = cache_hit
        self.imports: list[Import] = []
        for imp in wt_module.imports:
            kind, params, results = _extern_sig(imp.type)
            self.imports.append(Import(imp.module, imp.name or "", kind, params, results))
        self.exports: dict[str, Export] = {}
        for exp in wt_module.exports:
            kind, params, results = _extern_sig(exp.type)
            self.exports[exp.name] = Export(kind, params, results)


def _to_wasm_arg(ty: str, v):
    # i32 may be given unsigned or signed; wasmtime-py wants the signed view.
    if ty == "i32":
        v &= _U32
        return v - (1 << 32) if v & 0x80000000 else v
    if ty == "i64":
        v &= _U64
        return v - (1 << 64) if v & (1 << 63) else v
    return v


def _from_wasm_result(ty: str, v):
    if ty == "i32":
        return v & _U32
    return v


class Memory:
    """Bounds-checked view of an instance's exported linear memory.

    The view is cached and dropped whenever the guest may have grown the memory (after a
    guest call returns and when a host function is entered).
    """

    def __init__(self, store: wt.Store, wt_memory: wt.Memory):
        self._store = store
        self._mem = wt_memory
        self._view: memoryview | None = None

    def _invalidate(self) -> None:
        self._view = None

    def _current(self) -> memoryview:
        view = self._view
        if view is None:
            view = memoryview(self._mem.get_buffer_ptr(self._store)).cast("B")
            self._view = view
        return view

    def _span(self, ptr: int, length: int) -> memoryview:
        view = self._current()
        if ptr < 0 or length < 0 or ptr + length > len(view):
            raise MemoryAccessError(f"({ptr}, {length}) outside linear memory of {len(view)} bytes")
        return view

    def size(self) -> int:
        return len(self._current())

    def read(self, ptr: int, length: int) -> bytes:
        view = self._span(ptr, length)
        return view[ptr:ptr + length].tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        view = self._span(ptr, len(data))
        view[ptr:ptr + len(data)] = data

    def read_u32(self, ptr: int) -> int:
        return struct.unpack_from("<I", self._span(ptr, 4), ptr)[0]

    def write_u32(self, ptr: int, v: int) -> None:
        struct.pack_into("<I", self._span(ptr, 4), ptr, v & _U32)

    def read_u64(self, ptr: int) -> int:
        return struct.unpack_from("<Q", self._span(ptr, 8), ptr)[0]

    def write_u64(self, ptr: int, v: int) -> None:
        struct.pack_into("<Q", self._span(ptr, 8), ptr, v & _U64)


class Instance:
    """One module instance in its own Store, with memory cap and per-call CPU deadline."""

    def __init__(self, engine: Engine, module: Module,
                 host_functions: dict[tuple[str, str], Callable[..., int | None]],
                 *, memory_limit_bytes: int, deadline_ms: int):
        self.engine = engine
        self.module = module
        self.poisoned = False
        self._depth = 0
        self._deadline_ticks = max(1, -(-deadline_ms // int(EPOCH_TICK_S * 1000))) + 1
        self._callers: dict[str, Callable] = {}
        self._store = wt.Store(engine._wt)
        self._store.set_limits(memory_size=memory_limit_bytes)
        self._store.set_epoch_deadline(self._deadline_ticks)
        linker = self._link(host_functions)
        self.memory: Memory | None = None
        self._instantiate(linker)

    # -- linking -------------------------------------------------------------------------

    def _link(self, host_functions) -> wt.Linker:
        missing = [f"{imp.module}.{imp.name}" for imp in self.module.imports
                   if imp.kind != "func" or (imp.module, imp.name) not in host_functions]
        if missing:
            raise EngineError("unknown imports: " + ", ".join(missing))
        linker = wt.Linker(self.engine._wt)
        for imp in self.module.imports:
            fn = self._wrap_host(host_functions[(imp.module, imp.name)], imp)
            ty = wt.FuncType([_VALTYPE[p] for p in imp.params], [_VALTYPE[r] for r in imp.results])
            linker.define_func(imp.module, imp.name, ty, fn)
        return linker

    def _wrap_host(self, fn: Callable, imp: Import) -> Callable:
        masks = tuple(_U32 if p == "i32" else None for p in imp.params)
        result = imp.results[0] if imp.results else None

        def host(*args):
            if self.memory is not None:
                self.memory._invalidate()    # the guest may have grown memory before calling us
            args = tuple(a & m if m else a for a, m in zip(args, masks))
            try:
                r = fn(*args)
                return None if result is None else _to_wasm_arg(result, r)
            except BaseException as e:      # travels to the outer call via wasmtime-py
                self._pending = e
                raise
        return host

    def _instantiate(self, linker: wt.Linker) -> None:
        self._pending: BaseException | None = None
        self._depth += 1
        try:
            self._wt_instance = linker.instantiate(self._store, self.module._wt)
        except wt.Trap as t:
            raise self._trap_from(t) from None
        except wt.WasmtimeError as e:
            if self._pending is not None:
                raise self._trap_from(e) from None
            raise EngineError(f"instantiation failed: {e}") from None
        except BaseException as e:
            raise self._trap_from(e) from None
        finally:
            self._depth -= 1
        exports = self._wt_instance.exports(self._store)
        mem = exports.get("memory")
        if isinstance(mem, wt.Memory):
            self.memory = Memory(self._store, mem)

    # -- calls ---------------------------------------------------------------------------

    def has_export(self, name: str) -> bool:
        exp = self.module.exports.get(name)
        return exp is not None and exp.kind == "func"

    def export_func(self, name: str) -> Callable[..., int | None]:
        caller = self._callers.get(name)
        if caller is None:
            caller = self._make_caller(name)
            self._callers[name] = caller
        return caller

    def _make_caller(self, name: str) -> Callable[..., int | None]:
        exp = self.module.exports.get(name)
        if exp is None or exp.kind != "func":
            raise KeyError(f"no exported function {name!r}")
        func = self._wt_instance.exports(self._store)[name]
        params, results = exp.params, exp.results
        store = self._store

        def call(*args):
            if self.poisoned:
                raise Trap("trap", "instance is poisoned by an earlier trap")
            if len(args) != len(params):
                raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
            wargs = [_to_wasm_arg(t, a) for t, a in zip(params, args)]
            if self._depth == 0:
                store.set_epoch_deadline(self._deadline_ticks)
                self._pending = None
            self._depth += 1
            try:
                r = func(store, *wargs)
            except BaseException as e:
                raise self._trap_from(e) from None
            finally:
                self._depth -= 1
                if self.memory is not None:
                    self.memory._invalidate()
            if not results:
                return None
            return _from_wasm_result(results[0], r)
        call.__name__ = name
        return call

    def _trap_from(self, e: BaseException) -> Trap:
        self.poisoned = True
        pending, self._pending = self._pending, None
        if isinstance(pending, Trap):          # a nested call trapped: keep its kind
            return pending
        if isinstance(pending, HostTrap):
            return Trap("exit", str(pending), self._backtrace(e))
        if pending is not None:
            return Trap("host", f"{type(pending).__name__}: {pending}", self._backtrace(e))
        if isinstance(e, wt.Trap):
            kind = "deadline" if e.trap_code == wt.TrapCode.INTERRUPT else "trap"
            return Trap(kind, _short_message(e.message), self._backtrace(e))
        return Trap("trap", str(e))

    def _backtrace(self, e: BaseException) -> list[str]:
        if not isinstance(e, wt.Trap):
            return []
        prefix = self.module.name or "wasm"
        return [f"{prefix}!{f.func_name or f'<func {f.func_index}>'}" for f in e.frames]

    def close(self) -> None:
        """Drop the store; the instance must not be used afterwards."""
        self.poisoned = True
        self._callers.clear()
        self.memory = None
        self._wt_instance = None
        self._store = None


_VALTYPE = {"i32": wt.ValType.i32(), "i64": wt.ValType.i64(),
            "f32": wt.ValType.f32(), "f64": wt.ValType.f64()}
