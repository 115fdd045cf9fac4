"""Per-Store state that every crossing reads: deadline arming, why a call failed (trap
classification, backtraces), deferred close."""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_void_p
from typing import TYPE_CHECKING, Callable

import wasmtime as wt
from wasmtime import _bindings as _B
from wasmtime._trap import Frame, FrameList

from .crossing import CallCore, Tally, _new_error, _new_trap, _set_epoch_deadline
from .errors import HostTrap, Trap
from .ticker import _EPOCH_NS, _NativeTicker, _Ticker

if TYPE_CHECKING:
    from .compile import Module

_UPDATE_DEADLINE_CONTINUE = 0  # wasmtime_update_deadline_kind_t


class _StoreState(CallCore):
    """Mutable per-Store facts read on every crossing; deliberately holds no reference to the
    Instance, so callbacks do not keep it alive. (``depth``, ``poisoned``, ``armed_at`` and
    arm()'s state are C fields of CallCore when _crossing.c is built: GuestFn reads them
    directly and, on _NativeTicker (``native_arm``), re-arms in C as arm() does.)"""

    def __init__(self, ctx: int, ticker: _Ticker | _NativeTicker, deadline_ticks: int,
                 module: Module, tally: Tally | None = None):
        self.ctx = ctx
        self.tally = tally              # what the top-level calls add up to (None: not counted)
        self.ticker = ticker
        self.deadline_ticks = deadline_ticks
        self.armed_at = -1e9            # time.monotonic() of the last arm()
        self.arm_cpu_ns = 0             # the arming thread's deadline clock at the last arm()
        self.budget_ns = 0              # the CPU the calls of that arm may use
        self.native_arm = ticker.native  # GuestFn re-arms in C ("deadline re-arm", _crossing.c)
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
        see _Ticker). The reference of _crossing.c's rearm(), which GuestFn runs instead on
        _NativeTicker: change both together.

        The deadline is counted from the engine epoch, which may lag the clock and then jump:
        adding the current lag keeps that jump from eating into this deadline.
        """
        self.arm_cpu_ns = self.ticker.charged_ns()
        self.budget_ns = self.deadline_ticks * _EPOCH_NS
        _set_epoch_deadline(self.ctx, self.deadline_ticks + self.ticker.register(self))

    # Called by the engine on the thread running the call (a ctypes callback): never raises.
    def deadline_reached(self, delta_p, kind_p) -> int:
        """The engine epoch passed this store's deadline. The epoch follows the busiest
        guest thread (see _Ticker): only the CPU of this thread since the arm counts. Some
        left: go on, checking again once the epoch has advanced that much; none: trap."""
        try:
            left = self.budget_ns - (self.ticker.charged_ns() - self.arm_cpu_ns)
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
