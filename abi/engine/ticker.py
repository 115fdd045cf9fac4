"""CPU-time deadlines per thread: the epoch ticker (see ``_Ticker``) and the deadline clock of
the calling thread (its CPU time minus its time in Python's cyclic GC).

Two tickers with the same rules: ``_NativeTicker`` (a C thread of _crossing.c, no GIL), used
with the C crossings, and ``_Ticker`` (a Python thread), with the ctypes ones. An Engine makes
the one its instances need (``Engine.ticker``)."""
from __future__ import annotations

import gc
import threading
import time
from typing import Any

import wasmtime as wt

from . import crossing
from .crossing import REARM_S, CallState, _addr, _increment_epoch

EPOCH_MS = 1                  # one epoch = 1 ms of CPU time; deadlines count these ticks
_EPOCH_NS = EPOCH_MS * 1_000_000
TICKER_PERIOD_S = 0.002       # how often the ticker advances the epoch (deadline slack)


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
    The ticker of the ctypes crossings; with _crossing.c, ``_NativeTicker`` does the same
    without the GIL.
    """
    native = False

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

    def register(self, st: CallState) -> int:
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
            lag = max(0, self._target(self._pending_ns()) - self.epoch)
        # After adding under the lock: either _tick saw the store, or we see idle (see _run).
        if self.idle:
            self._wake.set()
        return lag

    def charged_ns(self) -> int:
        return _charged_cpu_ns()

    def enter(self) -> None:
        """A guest runs on this thread outside the generated callers (instantiation): the
        caller keeps its store's ``depth`` raised, which is what this ticker reads."""

    leave = enter

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

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()


class _NativeTicker:
    """_Ticker's rules in _crossing.c's ticker thread, which never takes the GIL (a Python
    thread waking every TICKER_PERIOD_S took the GIL from the event loop and cost futex
    round trips). One C thread per process ticks every engine; it counts a thread while a guest
    call runs on it (call() marks it) or while it armed a deadline less than REARM_S ago, and
    reads the GC time that ``_native.gc_callback`` counts. See "the epoch ticker without the
    GIL" in _crossing.c for what differs from _Ticker and why.

    Keeps the wasmtime engine alive until stop(): the C thread increments its epoch."""
    native = True

    def __init__(self, wt_engine: wt.Engine):
        native = crossing._native
        self._wt: wt.Engine | None = wt_engine
        self._ptr = _addr(wt_engine.ptr())
        self._native = native
        native.ticker_add(self._ptr)
        self.charged_ns = native.charged_ns
        self.enter = native.ticker_enter
        self.leave = native.ticker_leave
        self._register = native.ticker_register

    def register(self, st: CallState) -> int:
        st.armed_at = time.monotonic()
        return self._register()

    @property
    def epoch(self) -> int:
        return self._native.ticker_state(self._ptr)[0]

    def now_ms(self) -> int:
        return self._native.ticker_state(self._ptr)[1]

    @property
    def idle(self) -> bool:
        return self._native.ticker_state(self._ptr)[2]

    def stop(self) -> None:
        if self._wt is not None:
            self._native.ticker_remove(self._ptr)
            self._wt = None


def new_ticker(wt_engine: wt.Engine, native: bool) -> _Ticker | _NativeTicker:
    """The ticker for the crossings an instance uses (crossing.USE_NATIVE when it is made):
    _crossing.c's call() marks the calls _NativeTicker counts."""
    return _NativeTicker(wt_engine) if native else _Ticker(wt_engine)


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
if crossing._native is not None:
    crossing._native.ticker_configure(_addr(crossing._B._wasmtime_engine_increment_epoch),
                                      round(TICKER_PERIOD_S * 1e9), round(REARM_S * 1e9))
    gc.callbacks.append(crossing._native.gc_callback)


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
