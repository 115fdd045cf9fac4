"""One loaded filter in one worker: its instance, root context, start sequence, failures.

The instance is reused across requests and never re-entered: callout responses, ticks and
queue events are delivered from the event loop, i.e. only between guest calls. Any trap
discards the instance (a trapped SDK is poisoned, reference §0.5); a fresh one is built
proactively after a backoff that grows while the filter keeps failing (Envoy FAIL_RELOAD).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol

from .seam import CallFailed, CallResponse, FilterLoadError, FilterSpec, HostServices
from .buffers import BodyBuffer, HeaderMap, valid_header
from .context import CalloutData, ChainView, Context, HttpContext, RootContext, VmContext
from .engine import (Engine, EngineError, FilterCore, Instance, MemoryAccessError, Tally, Trap,
                     native_crossings)
from .enums import Status, WasiErrno
from . import capabilities, foreign
from .hostcalls import HOSTCALLS, PY_LEVELS, guarded, restricted_get_property
from .limits import MAX_LOG_BYTES, MAX_PENDING_CALLS
from .grpc_call import GrpcCalls
from .module import LoadedModule
from .redis_call import RedisCalls
from .shared_store import SharedStore, VmStore
from .wasi import WASI, WASI_MODULES

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 30.0
ROOT_DONE_WAIT_S = 1.0
START_DEADLINE_MS = 5000          # _initialize/main/_start + vm_start + configure, if the engine allows
BUILD_THREADS = 4                # instances of different filters built at once (one per filter)
_U32 = 0xFFFFFFFF


class FilterFailure(Exception):
    """A guest call failed; the instance is already discarded, logged and counted."""

    def __init__(self, filter_name: str, callback: str, kind: str, message: str):
        super().__init__(f'filter "{filter_name}": {kind} in {callback}: {message}')
        self.callback = callback
        self.kind = kind
        self.message = message


class FilterHostView(Protocol):
    """The FilterHost (filter_host.py, which imports this module) as a Filter calls back on it."""
    on_event: Callable[[FilterSpec, str, str], None] | None    # rebuilds, for the audit log

    def set_queue_owner(self, qid: int, f: Filter) -> None: ...


class StartError(Exception):
    def __init__(self, callback: str, message: str):
        super().__init__(f"{callback}: {message}")
        self.callback = callback


class Filter:
    def __init__(self, spec: FilterSpec, loaded: LoadedModule, engine: Engine,
                 services: HostServices, store: SharedStore, host: FilterHostView):
        self.spec = spec
        self.name = spec.name
        self.loaded = loaded
        self.has: Callable[[str], bool] = loaded.exports.__contains__
        # Per-request dispatch decided once: what the chain calls for every context.
        self.has_context_create = "proxy_on_context_create" in loaded.exports
        self.on_headers: tuple[bool, bool] = tuple(   # (request, response) headers callbacks
            n in loaded.exports for n in ("proxy_on_request_headers", "proxy_on_response_headers"))
        self.body_callbacks: tuple[bool, bool] = tuple(  # (request, response) body or trailers
            any(f"proxy_on_{side}_{part}" in loaded.exports for part in ("body", "trailers"))
            for side in ("request", "response"))
        self.teardown_callbacks: tuple[str, ...] = tuple(
            n for n in ("proxy_on_done", "proxy_on_log", "proxy_on_delete") if n in loaded.exports)
        self.abi_010 = loaded.abi_version == "0.1.0"
        # (request, response): the header callback takes end_of_stream (arity 3, not 2)
        self.headers_eos: tuple[bool, bool] = loaded.headers_take_eos
        self.engine = engine
        self.services = services
        self.log: logging.Logger = services.log
        self.store = VmStore(store, spec.vm_id)          # shared data and queues of its VM
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.instance: Instance | None = None
        self.generation = 0
        self.root: RootContext | None = None
        self.contexts: dict[int, Context] = {}
        self.callout: CalloutData | None = None
        self.call_status: tuple[int, str] = (Status.OK, "")
        self.configuring = False
        self.closed = False
        self.consecutive_failures = 0
        self.failures: Counter[tuple[str, str]] = Counter()
        self.rebuilds = 0
        self.host_errors = 0
        self.denied_calls: Counter[str] = Counter()     # capability group → calls refused
        self.tally = Tally()             # top-level guest calls and their wall time (GET /filters)
        self._denied_logged: set[str] = set()
        self._next_id = 1
        self._warned_pseudo: set[str] = set()
        self._next_token = 4                 # http callouts: type 0 in the low 2 bits (cpp-host)
        self._current: Context | None = None
        self._effective: Context | None = None
        self._vm_ctx = VmContext(self, 0)
        self._funcs: dict[str, Callable] = {}
        self._mem = None                 # instance.memory once instantiated (None: look it up)
        self._alloc: Callable | None = None
        self._booting = None             # the instance its build thread is starting (see _build)
        self._allocating = False
        self._deferred: list[Callable[[], None]] = []
        self._pending_done: dict[int, asyncio.Event] = {}
        self._calls: dict[int, tuple[asyncio.Task, int]] = {}
        self._call_bytes: dict[int, int] = {}   # token → callout bytes it holds (request + response)
        self._callout_bytes = 0                  # their sum, at most spec.limits.max_callout_bytes
        self.redis = RedisCalls(self)
        self.grpc = GrpcCalls(self)
        self._tick_period_ms = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._rebuild_handle: asyncio.TimerHandle | None = None
        self._next_attempt = 0.0
        self.building: asyncio.Task[StartError | None] | None = None   # the build in flight
        self._build_thread: int | None = None    # thread id running that build's start sequence
        self._held: list[Callable[[], None]] = []   # loop actions waiting for the swap
        self.starting = False            # inside _initialize/main/_start
        self.observer = getattr(services, "observer", None)   # api.HostObserver: try / tests only
        if self.observer is not None:
            self.now_ns = self.observer.now_ns
        self.host_functions = self._host_functions()

    # -- linking ---------------------------------------------------------------------------

    def _host_functions(self) -> dict[tuple[str, str], Callable]:
        table = {}
        # A foreign function doing a group's work checks the group itself (foreign.GROUPS); the
        # C shortcut of proxy_call_foreign_function does not, so it is left out for a filter
        # that lacks one of those groups.
        foreign_checks = any(not capabilities.grants(self.spec.capabilities, group)
                             for group in foreign.GROUPS.values())
        for name, (fn, params, results) in HOSTCALLS.items():
            void = not results
            table[("env", name)] = guarded(
                self, name, fn, bad_memory=None if void else Status.INVALID_MEMORY_ACCESS,
                internal=None if void else Status.INTERNAL_FAILURE, arity=len(params),
                in_c=not (foreign_checks and name == "proxy_call_foreign_function"))
        for name, (fn, params, results) in WASI.items():
            void = not results
            wrapped = guarded(self, name, fn, bad_memory=None if void else WasiErrno.FAULT,
                              internal=None if void else WasiErrno.INVAL, arity=len(params))
            for module in WASI_MODULES:
                table[(module, name)] = wrapped
        # Capabilities (abi/capabilities.py): bound here, once; a granted call costs nothing more.
        for name, group in capabilities.denied(self.spec.capabilities).items():
            for key in [("env", name), *((m, name) for m in WASI_MODULES)]:
                if key in table:
                    table[key] = capabilities.denial_stub(self, name, group, wasi=key[0] != "env")
        if self.spec.readable_properties is not None:
            fn = restricted_get_property(capabilities.readable(self.spec.readable_properties))
            table[("env", "proxy_get_property")] = guarded(
                self, "proxy_get_property", fn, bad_memory=Status.INVALID_MEMORY_ACCESS,
                internal=Status.INTERNAL_FAILURE, arity=4)
        if self.observer is not None:
            table = {key: _observed_host(self.observer, self.name, key[1], fn)
                     for key, fn in table.items()}
        return table

    def capability_denied(self, what: str, group: str) -> None:
        """A call the filter's capabilities refuse: counted; logged once per function (bounded)."""
        self.denied_calls[group] += 1
        if what not in self._denied_logged and len(self._denied_logged) < 64:
            self._denied_logged.add(what)
            self.log.warning('filter "%s": %s denied: capability "%s" not granted (logged once; '
                             "counted in wasmgate_filter_denied_calls_total)", self.name, what, group)

    def _export(self, inst: Instance, name: str) -> Callable:
        fn = inst.export_func(name)
        return fn if self.observer is None else _observed_guest(self.observer, self.name, name, fn)

    # -- start sequence (reference §2.3) ----------------------------------------------------
    #
    # Every instance is built off the event loop: a build thread instantiates the module and
    # runs the start sequence (a Go runtime's init, or an on_configure that computes for
    # seconds, would otherwise freeze every connection of the worker), then the event loop
    # swaps the ready instance in, between guest calls. One build per filter at a time
    # (``building``). While it runs, the build thread owns the per-instance fields (_booting,
    # _mem, _alloc, _funcs, _vm_ctx, _current/_effective, the root in ``contexts``); the loop
    # touches none of them, because every loop path into the guest is gated on ``instance``
    # and ``root``, which only the swap publishes. Host functions that would touch loop state
    # (set_tick_period, http_call, redis_call: ``on_loop``) and queue events meanwhile are held
    # until the swap.

    async def start_at_load(self) -> None:
        """Build the first instance; FilterLoadError names the file and the callback at fault."""
        try:
            error = await asyncio.shield(self._start_build(rebuild=False))
        except asyncio.CancelledError:
            self.closed = True           # the build frees its instance when its thread ends
            raise
        if error is not None:
            self.closed = True           # never used: no rebuilds, no timers
            raise FilterLoadError(self.name, f"{self.loaded.path}: {error}") from None

    def _start_build(self, rebuild: bool) -> "asyncio.Task[StartError | None]":
        task = self.building = self.loop.create_task(self._build(rebuild))
        return task

    async def _build(self, rebuild: bool) -> StartError | None:
        """Build and start an instance on a build thread, then swap it in (on the loop).
        Returns why it failed, or None once the new instance serves."""
        self.generation += 1
        self._tick_period_ms = 0          # the new instance sets its own period
        self._held = []
        job = _build_executor().submit(self._start_instance, self.generation)
        try:
            inst, root = await asyncio.wrap_future(job)
        except asyncio.CancelledError:   # the loop is shutting down: never serve it
            job.add_done_callback(_close_built)
            raise
        except Exception as e:           # noqa: BLE001 — StartError, or a bug of ours
            self._forget_instance()
            error = e if isinstance(e, StartError) else self._internal_error(e)
        else:
            error = None
            if self.closed:              # closed (reload, shutdown) during the build
                inst.close()
                self._forget_instance()
                error = StartError("start", "the filter was closed during its start")
        finally:
            self.building = None
        if error is None:
            self._swap(inst, root)
        if rebuild:
            self._rebuilt(error)
        return error

    def _internal_error(self, e: Exception) -> StartError:
        self.log.error('filter "%s": building an instance failed', self.name, exc_info=e)
        return StartError("start", f"internal error: {type(e).__name__}: {e}")

    def _swap(self, inst: Instance, root: RootContext) -> None:
        """Publish a started instance (event loop, between guest calls) and do what its start
        sequence asked of the loop."""
        self.instance = inst
        self.root = root
        held, self._held = self._held, []
        for action in held:
            action()

    def _start_instance(self, generation: int) -> tuple[Instance, RootContext]:
        """Build thread: instantiate and run the start sequence; raises StartError."""
        self._build_thread = threading.get_ident()
        try:
            return self._start_sequence_on(self._instantiate(), generation)
        finally:
            self._booting = None
            self._build_thread = None

    def _instantiate(self) -> Instance:
        try:
            # A start section (AssemblyScript) may call host functions before Instance() returns:
            # on_created lets them reach this instance's memory and allocator meanwhile.
            return Instance(self.engine, self.loaded.module, self.host_functions,
                            memory_limit_bytes=self.spec.limits.memory_bytes,
                            deadline_ms=self.spec.limits.callback_ms,
                            on_created=lambda i: setattr(self, "_booting", i),
                            tally=self.tally)
        except EngineError as e:
            self.consecutive_failures += 1
            raise StartError("instantiate", str(e)) from None
        except Trap as t:
            self._record_failure("instantiate", t)
            raise StartError("instantiate", f"{t.kind}: {t.message}") from None

    def _start_sequence_on(self, inst: Instance, generation: int) -> tuple[Instance, RootContext]:
        """Build thread: run the start sequence of a fresh instance; closes it on failure."""
        self._booting = inst
        self._funcs = {}
        self._effective = None           # (a start section's host calls may have set it)
        try:
            # Settled once the instance is built (an exported memory is resolved during
            # instantiation at the latest); None when it has none: read() then says so.
            self._mem = inst.memory
            alloc = "proxy_on_memory_allocate" if self.has("proxy_on_memory_allocate") else "malloc"
            self._alloc = inst.export_func(alloc) if self.has(alloc) else None
            self._vm_ctx = VmContext(self, generation)
            self._set_deadline(inst, max(START_DEADLINE_MS, self.spec.limits.callback_ms))
            root = self._run_start_sequence(generation)
        except FilterFailure as e:       # trapped: counted and logged by call()
            inst.close()
            raise StartError(e.callback, f"{e.kind}: {e.message}") from None
        except StartError as e:
            self.consecutive_failures += 1
            self.failures[(e.callback, "rejected")] += 1
            inst.close()
            raise
        except BaseException:
            inst.close()
            raise
        self._set_deadline(inst, self.spec.limits.callback_ms)
        return inst, root

    @staticmethod
    def _set_deadline(inst: Instance, ms: int) -> None:
        # Runtime start-up (Go's especially) may need longer than one callback; engines that
        # can change the deadline of an instance get a longer one for the start sequence.
        setter = getattr(inst, "set_deadline_ms", None)
        if setter is not None:
            setter(ms)

    def _run_start_sequence(self, generation: int) -> RootContext:
        vm = self._vm_ctx
        self.starting = True
        try:
            if self.has("_initialize"):
                self.call(vm, "_initialize")
                if self.has("main") and self.loaded.arity("main") == 2:
                    self.call(vm, "main", 0, 0)
            elif self.has("_start"):
                self.call(vm, "_start")
        finally:
            self.starting = False
        root = RootContext(self, self._new_id(), generation)
        self.contexts[root.id] = root
        if self.has("proxy_on_context_create"):
            self.call(root, "proxy_on_context_create", root.id, 0)
        # The plugin configuration is readable during vm_start and configure (cpp-host keeps
        # temp_plugin_ set for both).
        self.configuring = True
        try:
            self._start_callback(root, "proxy_on_vm_start", len(self.spec.vm_configuration))
            self._start_callback(root, "proxy_on_configure", len(self.spec.configuration))
        finally:
            self.configuring = False
        return root

    def _start_callback(self, root: RootContext, name: str, size: int) -> None:
        if self.has(name) and self.call(root, name, root.id, size) == 0:
            raise StartError(name, "returned false (the filter rejected its configuration)")

    def ensure_ready(self) -> bool:
        """True when an instance is up. Otherwise starts a build (unless one is in flight or
        the backoff forbids it) and answers False at once: the caller follows its policy."""
        if self.instance is not None:
            return True
        if self.closed or self.building is not None or time.monotonic() < self._next_attempt:
            return False
        self._start_build(rebuild=True)
        return False

    def _rebuilt(self, error: StartError | None) -> None:
        if self.closed:
            return
        on_event = self.host.on_event
        if error is not None:
            self.log.error('filter "%s": rebuild failed: %s', self.name, error)
            if on_event is not None:
                on_event(self.spec, "rebuild", str(error))
            self._schedule_rebuild()
            return
        self.rebuilds += 1
        self.log.warning('filter "%s": instance rebuilt after a failure', self.name)
        if on_event is not None:
            on_event(self.spec, "rebuild", "")

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    # -- calling the guest -------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Top-level guest calls so far, every instance of this filter (the instances count
        them: ``tally``)."""
        return self.tally.calls

    @property
    def guest_ns(self) -> int:
        """The wall time of those calls."""
        return self.tally.ns

    def call(self, ctx: Context, name: str, *args: int) -> int | None:
        """Call an export with `ctx` current; a trap raises FilterFailure (instance gone)."""
        inst = self.instance
        fn = self._funcs.get(name)
        if fn is None or inst is None:
            inst, fn = self._resolve(inst, name)
        if self._current is not None:    # from inside a host function: see _call_nested
            return self._call_nested(inst, fn, ctx, name, args)
        self._current = ctx              # (_effective is None between calls)
        try:
            return fn(*args)
        except Trap as t:
            raise self._trapped(inst, ctx, name, t) from None
        finally:
            self._current = self._effective = None
            if self._deferred:
                self._run_deferred()

    def headers(self, chain: ChainView, i: int, ctx: HttpContext, direction: int, eos: bool) -> int:
        """This filter's headers callback as position `i` of `chain`: its state (chain.py's
        CONTINUE, PAUSED, SKIPPED). Chain._headers does it; NativeFilter's C does its common
        case without a Python frame and hands the chain the rest."""
        return chain._headers(i, self, ctx, direction, eos)

    def _call_nested(self, inst: Instance, fn: Callable, ctx: Context, name: str,
                     args: tuple[int, ...]) -> int | None:
        """call() made while another call of this filter runs (from a host function it called):
        the outer call's current and effective contexts come back afterwards. (The allocator
        is not called this way: it runs without a context switch, see write_result.)"""
        prev_current = self._current
        prev_effective = self._effective
        self._current = ctx
        self._effective = None
        try:
            return fn(*args)
        except Trap as t:
            raise self._trapped(inst, ctx, name, t) from None
        finally:
            self._current = prev_current
            self._effective = prev_effective
            if self._deferred:
                self._run_deferred()

    def finish_context(self, ctx: HttpContext, failed: bool) -> None:
        """A finished request's context, in one frame (every request runs it for every
        filter): its callouts dropped; on_done → on_log → on_delete (the exported ones, spec
        order: what ``call`` does for each, with one context switch for the three), stopping
        when the instance dies; success noted unless the request saw `failed`; then, whatever
        happened, the context released and detached from its chain. A trap raises
        FilterFailure."""
        try:
            if ctx.pending_calls:
                self.cancel_calls(ctx)
            inst = self.instance
            if inst is not None and ctx.generation == self.generation:
                funcs = self._funcs
                cid = ctx.id
                prev_current = self._current
                prev_effective = self._effective
                self._current = ctx
                name = ""
                try:
                    for name in self.teardown_callbacks:
                        if ctx.generation != self.generation:     # the instance died (not ctx.alive)
                            break
                        fn = funcs.get(name)
                        if fn is None:
                            fn = funcs[name] = self._export(inst, name)
                        self._effective = None
                        fn(cid)
                        if self._deferred:
                            self._run_deferred()
                except Trap as t:
                    raise self._trapped(inst, ctx, name, t) from None
                finally:
                    self._current = prev_current
                    self._effective = prev_effective
            if not failed and ctx.generation == self.generation:
                self.consecutive_failures = 0
        finally:                         # release: what a teardown callback dispatched goes too
            if ctx.pending_calls:
                self.cancel_calls(ctx)
            contexts = self.contexts
            if contexts.get(ctx.id) is ctx:
                del contexts[ctx.id]
            ctx.chain = None             # detached: no chain ↔ context cycle (HttpContext.chain)
            ctx._props = None

    def _resolve(self, inst: Instance | None, name: str) -> tuple[Instance, Callable]:
        """The instance to call and its export `name` (cached in _funcs), when the fast
        lookup in call() missed: first call of an export, or a start sequence running."""
        if inst is None:
            inst = self._starting_instance(name)
        fn = self._funcs.get(name)
        if fn is None:
            fn = self._funcs[name] = self._export(inst, name)
        return inst, fn

    def _trapped(self, inst: Instance, ctx: Context, name: str, t: Trap) -> FilterFailure:
        ctx.failure = t.kind             # the request's filter trace names it
        self._record_failure(name, t)
        if inst is self.instance:        # a start sequence's failure is its build's to handle
            self._discard()
        return FilterFailure(self.name, name, t.kind, t.message)

    def on_loop(self, action: Callable[[], None]) -> None:
        """Do something that needs the event loop (a timer, a task): now, or — asked by a
        start sequence, on its build thread — at the swap, if the build succeeds."""
        if self.instance is None:
            self._held.append(action)
        else:
            action()

    def _starting_instance(self, name: str) -> Instance:
        """The instance whose start sequence runs on this thread (its build thread only)."""
        inst = self._booting
        if inst is None or self._build_thread != threading.get_ident():
            raise FilterFailure(self.name, name, "unavailable", "no live instance")
        return inst

    def notify_root(self, name: str, *args: int) -> None:
        """Call a root callback with the root's id first (an answer to a call it made); a
        failure is already logged and counted by call()."""
        root = self.root
        try:
            self.call(root, name, root.id, *args)
        except FilterFailure:
            pass

    def _run_deferred(self) -> None:
        todo, self._deferred = self._deferred, []
        for action in todo:
            try:
                action()
            except FilterFailure:
                pass

    def ctx(self) -> Context:
        return self._effective or self._current or self._vm_ctx

    def _record_failure(self, callback: str, t: Trap) -> None:
        self.failures[(callback, t.kind)] += 1
        self.consecutive_failures += 1
        trace = "\n    ".join(t.backtrace) if t.backtrace else "(none)"
        self.log.error('filter "%s" (%s): %s in %s: %s\n  wasm backtrace:\n    %s',
                       self.name, self.loaded.path.name, t.kind, callback, t.message, trace)

    def record_soft_failure(self, callback: str, kind: str, message: str) -> None:
        """A protocol violation that leaves the instance usable (invalid action, pause timeout)."""
        self.failures[(callback, kind)] += 1
        self.log.error('filter "%s" (%s): %s in %s: %s', self.name, self.loaded.path.name,
                       kind, callback, message)

    def _discard(self) -> None:
        inst, self.instance = self.instance, None
        if inst is not None:
            inst.close()
        self.generation += 1            # every context of the old instance is now dead
        self.root = None
        self.callout = None
        for ctx in self._forget_instance().values():
            if isinstance(ctx, HttpContext):
                ctx.wake()
        for task, _origin in self._calls.values():
            task.cancel()
        self._calls.clear()
        self.redis.cancel_all()
        for ev in self._pending_done.values():
            ev.set()
        self._pending_done.clear()
        self._cancel_tick()
        self._schedule_rebuild()

    def _forget_instance(self) -> dict[int, Context]:
        """Drop the per-instance guest-call state; returns the contexts it had."""
        self._mem = None
        self._funcs = {}
        self._alloc = None
        self._held = []
        self._forget_callout_bytes()     # (also what a failed build's held callouts reserved)
        self.grpc.cancel_all()           # (also a failed build's gRPC callouts, never started)
        contexts, self.contexts = self.contexts, {}
        return contexts

    def _schedule_rebuild(self) -> None:
        n = self.consecutive_failures
        delay = 0.0 if n <= 1 else min(BACKOFF_FIRST_S * 2 ** (n - 2), BACKOFF_MAX_S)
        self._next_attempt = time.monotonic() + delay
        if self._rebuild_handle is not None:
            self._rebuild_handle.cancel()
        if not self.closed:
            self._rebuild_handle = self.loop.call_later(delay, self._rebuild_soon)

    def _rebuild_soon(self) -> None:
        self._rebuild_handle = None
        if self.instance is None and not self.closed:
            self.ensure_ready()

    # -- guest memory (used by the host functions) -------------------------------------------

    def _memory(self):
        inst = self.instance if self.instance is not None else self._booting
        mem = inst.memory if inst is not None else None
        if mem is None:
            raise MemoryAccessError("the module has no exported memory")
        return mem

    def read(self, ptr: int, size: int) -> bytes:
        if size == 0:
            return b""
        mem = self._mem
        return mem.read(ptr, size) if mem is not None else self._memory().read(ptr, size)

    def read_prefix(self, ptr: int, size: int, cap: int) -> bytes:
        """The first `cap` bytes of (ptr, size), the whole range bounds-checked: a size the
        guest claims never sizes a host allocation beyond `cap`."""
        if size <= cap:
            return self.read(ptr, size)
        self.check_out(ptr, size)
        return self.read(ptr, cap)

    def write(self, ptr: int, data: bytes) -> None:
        (self._mem or self._memory()).write(ptr, data)

    def write_u32(self, ptr: int, value: int) -> None:
        (self._mem or self._memory()).write_u32(ptr, value)

    def write_u64(self, ptr: int, value: int) -> None:
        (self._mem or self._memory()).write_u64(ptr, value)

    def check_out(self, ptr: int, size: int) -> None:
        mem = self._mem or self._memory()
        if ptr + size > mem._size:      # the size known first: reading it anew is a ctypes call
            mem._check(ptr, size)       # (raises MemoryAccessError if still outside)

    def _booting_allocator(self) -> Callable | None:
        for name in ("proxy_on_memory_allocate", "malloc"):
            if self.has(name):
                try:
                    return self._booting.export_func(name)
                except KeyError:     # the start section has not reached a host call yet
                    return None
        return None

    def write_result(self, data: bytes, ret_pp: int, ret_size_p: int) -> int:
        """Copy `data` into guest-owned memory (guest allocator) and fill the out-pointers.

        Bad out-pointers surface as MemoryAccessError after the allocation, as in cpp-host."""
        alloc = self._alloc
        if data:
            if alloc is None and self._booting is not None:
                alloc = self._booting_allocator()
            if alloc is None or self._allocating:
                # No allocator, or one that calls back into the host for more data: refuse
                # rather than recurse host → guest → host until Python's stack gives out.
                return Status.INVALID_MEMORY_ACCESS
        mem = self._mem or self._memory()
        self._allocating = True
        try:
            written = mem.put_result(alloc, data, ret_pp, ret_size_p)
        finally:
            self._allocating = False
        return Status.OK if written else Status.INVALID_MEMORY_ACCESS

    # -- logging -------------------------------------------------------------------------------

    def guest_log(self, level: int, message: bytes, total: int) -> None:
        """`message`: at most MAX_LOG_BYTES of a line `total` bytes long."""
        py = PY_LEVELS[level]
        if self.log.isEnabledFor(py):
            self.log.log(py, 'filter "%s": %s', self.name, _clip(message, total))

    def guest_stdio(self, fd: int, data: bytes, total: int) -> None:
        py = logging.INFO if fd == 1 else logging.ERROR
        if data and self.log.isEnabledFor(py):
            text = _clip(data, total)
            self.log.log(py, 'filter "%s" %s: %s', self.name, "stdout" if fd == 1 else "stderr",
                         text[:-1] if text.endswith("\n") else text)

    def host_error(self, name: str, e: Exception) -> None:
        self.host_errors += 1
        self.log.error('filter "%s": host function %s failed: %r', self.name, name, e,
                       exc_info=e)

    now_ns = staticmethod(time.time_ns)     # (C: no Python frame when a filter reads the clock)

    # -- contexts ------------------------------------------------------------------------------

    def new_http_context(self, chain: ChainView) -> HttpContext | None:
        """A context for one request, or None when no instance is available (backoff)."""
        if self.instance is None and not self.ensure_ready():
            return None
        cid = self._next_id
        self._next_id = cid + 1
        ctx = HttpContext(self, cid, self.generation, chain)
        self.contexts[cid] = ctx
        if self.has_context_create:
            self.call(ctx, "proxy_on_context_create", cid, self.root.id)
        return ctx

    def set_effective_context(self, context_id: int) -> int:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            return Status.BAD_ARGUMENT
        self._effective = ctx
        return Status.OK

    def proxy_done(self, ctx: Context) -> int:
        ev = self._pending_done.pop(ctx.id, None)
        if ev is None:
            return Status.NOT_FOUND

        def delete() -> None:
            if self.instance is not None and self.has("proxy_on_delete"):
                self.call(ctx, "proxy_on_delete", ctx.id)
            ev.set()
        self._deferred.append(delete)    # cpp-host: on_delete after the current call returns
        return Status.OK

    # -- ticks (reference §5.7) --------------------------------------------------------------

    def set_tick_period(self, period_ms: int) -> None:
        self._tick_period_ms = period_ms
        self.on_loop(self._restart_tick)

    def _restart_tick(self) -> None:
        self._cancel_tick()
        if self._tick_period_ms and not (self.observer and self.observer.manual_ticks):
            self._tick_handle = self.loop.call_later(self._tick_period_ms / 1000, self._tick,
                                                     self.generation)

    def _cancel_tick(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _tick(self, generation: int) -> None:
        self._tick_handle = None
        if generation != self.generation or self.closed or not self._tick_period_ms:
            return
        period = self._tick_period_ms
        self._tick_handle = self.loop.call_later(period / 1000, self._tick, generation)
        if self.root is not None and self.has("proxy_on_tick"):
            try:
                self.call(self.root, "proxy_on_tick", self.root.id)
            except FilterFailure:
                pass

    def tick_now(self) -> bool:
        """Deliver one proxy_on_tick (HostObserver.manual_ticks); False when there is none to
        deliver (no instance, no export, or no tick period set)."""
        if self.root is None or not self._tick_period_ms or not self.has("proxy_on_tick"):
            return False
        try:
            self.call(self.root, "proxy_on_tick", self.root.id)
        except FilterFailure:
            pass
        return True

    # -- HTTP callouts (reference §5.2) --------------------------------------------------------

    def http_call(self, ctx: Context, cluster: str, headers: list[tuple[str, str]], body: bytes,
                  timeout_ms: int) -> tuple[int, int]:
        if self.closed or not self.services.has_cluster(cluster):
            return Status.BAD_ARGUMENT, 0
        if len(self._calls) + len(self._held) >= MAX_PENDING_CALLS:
            return Status.INTERNAL_FAILURE, 0      # a filter dispatching in a loop

        pseudo: dict[str, str] = {}
        rest = []
        for k, v in headers:
            if k.startswith(":"):
                # A pseudo-header given twice (set, then the request's own copied in): the
                # first is the filter's choice. Envoy's addCopy would join them with ",".
                k = k.lower()
                if k in pseudo:
                    self._warn_repeated_pseudo(cluster, k, pseudo[k])
                else:
                    pseudo[k] = v
            else:
                rest.append((k.lower(), v))
        method, path, authority = pseudo.get(":method"), pseudo.get(":path"), pseudo.get(":authority")
        if not method or not path or authority is None \
                or not all(valid_header(k.lower(), v) for k, v in headers):
            return Status.BAD_ARGUMENT, 0
        cost = len(body) + sum(len(k) + len(v) for k, v in headers)
        if self._callout_bytes + cost > self.spec.limits.max_callout_bytes:
            self.failures[("proxy_http_call", "callout_limit")] += 1
            return Status.INTERNAL_FAILURE, 0      # as a failed dispatch; the SDKs expect it
        token = self._next_token
        self._next_token = (token + 4) & _U32 or 4
        timeout = timeout_ms / 1000 if timeout_ms else None
        self._call_bytes[token] = cost
        self._callout_bytes += cost

        def dispatch() -> None:
            task = self.loop.create_task(self._run_http_call(
                token, self.generation, cluster, method, path, authority, rest, body, timeout))
            self._calls[token] = (task, ctx.id)
            if isinstance(ctx, HttpContext):
                ctx.pending_calls.add(token)
        self.on_loop(dispatch)
        return Status.OK, token

    def _warn_repeated_pseudo(self, cluster: str, name: str, kept: str) -> None:
        if name not in self._warned_pseudo:         # once per filter and name: calls repeat
            self._warned_pseudo.add(name)
            self.log.warning('filter "%s": http_call to %s gives %s more than once; the first '
                             '(%r) is used', self.name, cluster, name, kept)

    async def _run_http_call(self, token: int, generation: int, cluster: str, method: str,
                             path: str, authority: str, headers: list[tuple[str, str]],
                             body: bytes, timeout: float | None) -> None:
        response: CallResponse | None = None
        try:
            call = self.services.http_call(cluster, method, path, authority, headers, body, timeout,
                                           reserve=lambda n: self._reserve_callout_bytes(token, n))
            response = await (asyncio.wait_for(call, timeout) if timeout else call)
        except (CallFailed, asyncio.TimeoutError) as e:
            self.log.info('filter "%s": http call to %s failed: %s', self.name, cluster,
                          getattr(e, "reason", None) or "timeout")
        except asyncio.CancelledError:
            raise
        except Exception as e:           # noqa: BLE001 — a gateway bug is a failed call here
            self.log.error('filter "%s": http call to %s failed: %r', self.name, cluster, e)
        self._deliver_http_response(token, generation, response)

    def _reserve_callout_bytes(self, token: int, n: int) -> bool:
        """Let a response body chunk of call `token` be kept, if the budget has room."""
        held = self._call_bytes.get(token)
        if held is None or self._callout_bytes + n > self.spec.limits.max_callout_bytes:
            return False
        self._call_bytes[token] = held + n
        self._callout_bytes += n
        return True

    def _release_callout_bytes(self, token: int) -> None:
        self._callout_bytes -= self._call_bytes.pop(token, 0)

    def _forget_callout_bytes(self) -> None:
        self._call_bytes.clear()
        self._callout_bytes = 0

    def _deliver_http_response(self, token: int, generation: int,
                               response: CallResponse | None) -> None:
        try:
            self._deliver(token, generation, response)
        finally:
            self._release_callout_bytes(token)   # the response is dropped once delivered

    def _deliver(self, token: int, generation: int, response: CallResponse | None) -> None:
        entry = self._calls.pop(token, None)
        if entry is None or generation != self.generation or self.root is None:
            return
        origin = self.contexts.get(entry[1])
        if isinstance(origin, HttpContext):
            origin.pending_calls.discard(token)
        if not self.has("proxy_on_http_call_response"):
            return
        if response is None:
            data = CalloutData(HeaderMap([]), BodyBuffer(False), HeaderMap([]))
            self.call_status = (Status.BROKEN_CONNECTION, "reset")
            counts = (0, 0, 0)
        else:
            hdrs = HeaderMap([(":status", str(response.status))]
                             + [(k.lower(), v) for k, v in response.headers])
            data = CalloutData(hdrs, BodyBuffer(False, response.body),
                               HeaderMap([(k.lower(), v) for k, v in response.trailers]))
            self.call_status = (Status.OK, "")
            counts = (len(hdrs), len(response.body), len(response.trailers))
        self.callout = data
        root = self.root
        try:
            self.call(root, "proxy_on_http_call_response", root.id, token, *counts)
        except FilterFailure:
            pass
        finally:
            self.callout = None

    def track_callout(self, ctx: Context, token: int) -> None:
        """A request's callout: dropped with the request if still pending (cancel_calls)."""
        if isinstance(ctx, HttpContext):
            ctx.pending_calls.add(token)

    def untrack_callout(self, origin_id: int, token: int) -> None:
        origin = self.contexts.get(origin_id)
        if isinstance(origin, HttpContext):
            origin.pending_calls.discard(token)

    def cancel_calls(self, ctx: HttpContext) -> None:
        for token in ctx.pending_calls:
            if token & 3:                # gRPC call / stream (abi/grpc_call.py)
                self.grpc.drop(token)
                continue
            entry = self._calls.pop(token, None)
            if entry is not None:
                entry[0].cancel()
            self._release_callout_bytes(token)
        ctx.pending_calls.clear()

    # -- queues (reference §5.5) ----------------------------------------------------------------

    def register_queue(self, name: str) -> int:
        qid = self.store.register_queue(name)
        self.host.set_queue_owner(qid, self)
        return qid

    def queue_ready(self, qid: int) -> None:
        """Store callback; delivery waits for the event loop (never inside a guest call)."""
        self.loop.call_soon_threadsafe(self._deliver_queue_ready, qid, self.generation)

    def _deliver_queue_ready(self, qid: int, generation: int) -> None:
        if self.building is not None:    # the next instance is starting: its root gets it
            self._held.append(lambda: self._deliver_queue_ready(qid, self.generation))
            return
        root = self.root
        if generation != self.generation or root is None or not self.has("proxy_on_queue_ready"):
            return
        try:
            self.call(root, "proxy_on_queue_ready", root.id, qid)
        except FilterFailure:
            pass

    # -- shutdown (reference §2.6) -----------------------------------------------------------

    async def close(self) -> None:
        # Ticks and callouts keep working while the root finishes (on_done false → proxy_done).
        if self._rebuild_handle is not None:
            self._rebuild_handle.cancel()
        build = self.building
        if build is not None:            # no instance yet: the build frees the one it makes
            self.closed = True
            await asyncio.shield(build)  # bounded by the start deadline
        root = self.root
        if self.instance is not None and root is not None and not self.closed:
            try:
                done = self.call(root, "proxy_on_done", root.id) if self.has("proxy_on_done") else 1
                if done == 0:
                    ev = self._pending_done[root.id] = asyncio.Event()
                    try:
                        await asyncio.wait_for(ev.wait(), ROOT_DONE_WAIT_S)
                    except asyncio.TimeoutError:
                        self._pending_done.pop(root.id, None)
                        self._delete_root(root)
                else:
                    self._delete_root(root)
            except FilterFailure:
                pass
        self.closed = True
        self._cancel_tick()
        if self._rebuild_handle is not None:
            self._rebuild_handle.cancel()
        for task, _origin in list(self._calls.values()):
            task.cancel()
        self._calls.clear()
        self._forget_callout_bytes()
        self.redis.cancel_all()
        self.grpc.cancel_all()
        self._mem = None
        if self.instance is not None:
            self.instance.close()
            self.instance = None
        self.generation += 1

    def _delete_root(self, root: RootContext) -> None:
        if self.instance is not None and self.has("proxy_on_delete"):
            self.call(root, "proxy_on_delete", root.id)


_executor: tuple[int, ThreadPoolExecutor] | None = None


if FilterCore is not None:
    FilterCore.bind(Trap, FilterFailure)

    class NativeFilter(FilterCore, Filter):
        """A Filter whose per-request calls (``call``, ``new_http_context``, ``headers``,
        ``finish_context``: each filter runs them on every request) and the state they read
        are _crossing.c's FilterCore: one C call each, no Python frame. Filter's methods of
        those names are the pure-Python path (WASMGATE_PURE_PYTHON=1, no C build) and say what
        the C does."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._context_type = HttpContext    # what new_http_context builds (a C field)


def new_filter(spec: FilterSpec, loaded: LoadedModule, engine: Engine, services: HostServices,
               store: SharedStore, host: FilterHostView) -> Filter:
    """A NativeFilter when the C crossings are on (decided per filter, as for an Instance),
    else a Filter."""
    cls = NativeFilter if FilterCore is not None and native_crossings() else Filter
    return cls(spec, loaded, engine, services, store, host)


def _build_executor() -> ThreadPoolExecutor:
    """The threads that build instances (one pool per process, made on first use)."""
    global _executor
    if _executor is None or _executor[0] != os.getpid():
        _executor = (os.getpid(), ThreadPoolExecutor(BUILD_THREADS, "wasmgate-build"))
    return _executor[1]


def _close_built(job: "Future[tuple[Instance, RootContext]]") -> None:
    """A build whose waiter went away (loop shutdown): free its instance once it is made."""
    if not job.cancelled() and job.exception() is None:
        job.result()[0].close()


def _observed_host(observer, filter_name: str, name: str, fn: Callable) -> Callable:
    def host(*args):
        t0 = time.perf_counter_ns()
        result = fn(*args)
        observer.host_call(filter_name, name, result, time.perf_counter_ns() - t0)
        return result
    host.__name__ = name
    return host


def _observed_guest(observer, filter_name: str, name: str, fn: Callable) -> Callable:
    def guest(*args):
        t0 = time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            observer.guest_call(filter_name, name, time.perf_counter_ns() - t0)
    return guest


def _clip(data: bytes, total: int) -> str:
    text = data[:MAX_LOG_BYTES].decode("utf-8", "replace")
    return text if total <= MAX_LOG_BYTES else f"{text}… ({total} bytes)"
