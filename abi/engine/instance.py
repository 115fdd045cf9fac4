"""``Instance`` (one Store + one instance of a Module) and ``Memory`` (bounds-checked access to
its linear memory).

Cold paths (link, instantiate, trap decoding) use the public wasmtime-py API; the calls they
set up are the generated code of crossing.py.
"""
from __future__ import annotations

import ctypes
import struct
from functools import partial
from ctypes import POINTER, c_char
from typing import Any, Callable

import wasmtime as wt
from wasmtime import _bindings as _B
from wasmtime._ffi import WASMTIME_EXTERN_FUNC, WASMTIME_EXTERN_MEMORY

from .binary import Import, _describe
from .compile import Engine, Module
from . import crossing
from .crossing import (_NO_FINALIZER, REARM_S, Tally, _DeadlineCallback, _addr, _guest_caller,
                       _host_callback, _memory_data, _memory_data_size, host_entry)
from .errors import EngineError, MemoryAccessError
from .store import _short_message, _StoreState
from .ticker import EPOCH_MS

TABLE_ELEMENTS_FLOOR = 100_000  # table cap never below this (big Go binaries have ~10k funcs)
INSTANTIATE_DEADLINE_MS = 1000  # default floor of the deadline of instantiation (start section)
WASM_PAGE = 65536
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


_EMPTY = memoryview(bytearray())


class Memory:
    """Bounds-checked view of an instance's exported linear memory.

    Memory only grows and (memory_may_move=False) never moves, so a view over the first
    ``_size`` bytes stays valid for the store's lifetime; an access beyond it re-reads the
    size once (the guest may have grown) before failing.

    ``read``, ``header_pair`` and ``put_result`` are what host functions call most: on a
    native instance they are _crossing.c's (bound to this Memory, no Python frame), otherwise
    the ``_py_*`` methods below, which say what they do (the tests run both).
    """

    __slots__ = ("_st", "_handle", "_view", "_size", "_owner", "read", "header_pair",
                 "put_result", "__weakref__")

    def __init__(self, owner: "Instance", st: _StoreState, wt_memory: wt.Memory):
        self._owner = owner               # keeps the store alive while the view is in use
        self._st = st
        self._handle = wt_memory          # owns the wasmtime_memory_t we pass by address
        self._view = _EMPTY
        self._size = 0
        self._refresh()
        native = crossing._native if owner._native else None
        if native is not None:
            self.read = partial(native.mem_read, self)
            self.header_pair = partial(native.mem_header_pair, self)
            self.put_result = partial(native.mem_put_result, self)
        else:
            self.read = self._py_read
            self.header_pair = self._py_header_pair
            self.put_result = self._py_put_result

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

    def _py_read(self, ptr: int, length: int) -> bytes:
        end = ptr + length
        if not 0 <= ptr <= end <= self._size:
            self._check(ptr, length)
        return self._view[ptr:end].tobytes()

    def _py_header_pair(self, key_ptr: int, key_size: int, value_ptr: int,
                        value_size: int) -> tuple[str, str]:
        """A header edit's (name, value) as the ABI takes them: the name lower-cased (ASCII,
        as Envoy's LowerCaseString), both latin-1 (one char per byte). A zero-length string
        is "" whatever its pointer (as a zero-length read in abi/filter.py)."""
        key = self._py_read(key_ptr, key_size).lower().decode("latin-1") if key_size else ""
        return key, self._py_read(value_ptr, value_size).decode("latin-1") if value_size else ""

    def _py_put_result(self, alloc: Callable[[int], int] | None, data: bytes, ret_pp: int,
                       ret_size_p: int) -> bool:
        """``data`` into a block from the guest's allocator ``alloc``, then its address and
        size into the out-pointers ``ret_pp`` and ``ret_size_p`` (in that order: a bad
        out-pointer raises MemoryAccessError after the allocation, as cpp-host). Empty data
        allocates nothing and writes (0, 0). False: the allocator answered 0."""
        addr = 0
        if data:
            addr = alloc(len(data))
            if not addr:
                return False
            self.write(addr, data)      # (re-reads the size if the allocator grew the memory)
        self.write_u32(ret_pp, addr)
        self.write_u32(ret_size_p, len(data))
        return True

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
    * ``tally``: a ``Tally`` that every top-level guest call of this instance adds itself and
      its wall time to (calls from inside a host function are part of the outer call's time;
      instantiation is not counted). Several instances may share one (a filter's rebuilds).
    """

    def __init__(self, engine: Engine, module: Module,
                 host_functions: dict[tuple[str, str], Callable[..., int | None]],
                 *, memory_limit_bytes: int, deadline_ms: int,
                 instantiate_deadline_ms: int | None = None,
                 on_created: Callable[["Instance"], None] | None = None,
                 tally: Tally | None = None):
        self.engine = engine
        self.module = module
        self.memory: Memory | None = None
        self._callers: dict[str, Callable[..., Any]] = {}
        self._callbacks: list[Any] = []       # ctypes closures: alive as long as the store
        self._boot_cells: list[Any] = []      # each host callback's ``boot`` closure cell
        self._linker: wt.Linker | None = None
        self._wt_instance = None
        self._boot_funcs: dict[str, wt.Func] = {}  # exports reached during instantiation
        self._native = crossing.USE_NATIVE    # crossings through _crossing.c, not ctypes
        self._store = wt.Store(engine._wt)
        # Tables get the same byte budget as memory (wasmtime counts 8 bytes per element):
        # otherwise a table.grow could allocate gigabytes outside the memory cap.
        self._store.set_limits(memory_size=memory_limit_bytes,
                               table_elements=max(TABLE_ELEMENTS_FLOOR, memory_limit_bytes // 8))
        self._st = st = _StoreState(_addr(self._store._context()), engine.ticker(self._native),
                                    self._ticks(deadline_ms), module, tally)
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
        callback = _host_callback(self._st, fn, imp.params, imp.results, boot, self._native)
        if boot:
            freevars = callback.__code__.co_freevars
            self._boot_cells.append(callback.__closure__[freevars.index("boot")])
        keep, entry, env = host_entry(callback, self._native)
        self._callbacks.append(keep)
        ty = wt.FuncType([_VALTYPE[p] for p in imp.params], [_VALTYPE[r] for r in imp.results])
        mod, name = imp.module.encode(), imp.name.encode()
        err = _B.wasmtime_linker_define_func_unchecked(
            self._linker.ptr(), mod, len(mod), name, len(name), ty.ptr(),
            entry, env, _NO_FINALIZER)
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
        st.ticker.enter()           # wasmtime-py runs the start function, not our caller
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
            st.ticker.leave()
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
                               exp.params, exp.results, self._native)
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
