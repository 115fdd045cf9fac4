"""Instances are built off the event loop: instantiation and the start sequence run on a build
thread (the loop keeps running), the CPU deadline still stops a start sequence that spins there,
host calls that need the loop (ticks, callouts) take effect at the swap, one build per filter
runs at a time, and closing a filter mid-build frees what the build makes."""
from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

import abi.filter as filter_mod
from abi.api import CallResponse, FilterLimits, FilterLoadError, Forward, LocalReply, LogInfo
from abi.pairs import serialize

from abi_helpers import REQ, info, rebuilt
from abi_wat import OUT, Wat

# Computes for $ms milliseconds of wall clock: pure wasm spins, a clock read every 100k turns.
BURN = f"""
(func $burn (param $ms i32)
  (local $until i64) (local $i i32)
  (drop (call $proxy_get_current_time_nanoseconds (i32.const {OUT + 32})))
  (local.set $until (i64.add (i64.load (i32.const {OUT + 32}))
                             (i64.mul (i64.extend_i32_u (local.get $ms)) (i64.const 1000000))))
  (block $done (loop $outer
    (drop (call $proxy_get_current_time_nanoseconds (i32.const {OUT + 32})))
    (br_if $done (i64.ge_u (i64.load (i32.const {OUT + 32})) (local.get $until)))
    (local.set $i (i32.const 100000))
    (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i)))
    (br $outer))))
"""


# A loop stall this long fails a test whose build takes >= 4 times as long (wide: 2 busy cores).
STALL_BAR_S = 0.1


def slow_start(configure_ms: int, request_body: str = "(i32.const 0)") -> Wat:
    w = Wat()
    w.extra.append(BURN)
    w.on("proxy_on_configure",
         f"(call $burn (i32.const {configure_ms})) {w.trace('proxy_on_configure', 2)} (i32.const 1)")
    w.on("proxy_on_request_headers", request_body)
    return w


TRAP_ON_X_BOOM = (f"(if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (i32.const 2048) "
                  f"(i32.const 6) (i32.const {OUT}) (i32.const {OUT + 4}))) (then unreachable)) "
                  "(i32.const 0)")


def trap_on_x_boom(configure_ms: int) -> Wat:
    w = slow_start(configure_ms, TRAP_ON_X_BOOM)
    w.extra.append('(data (i32.const 2048) "x-boom")')
    return w


class Heartbeat:
    """Measures how long the event loop goes without running a 2 ms timer. Python's cyclic GC
    is off meanwhile: in a big test process one collection can pause the loop 100+ ms, which
    is not what these tests measure."""

    def __init__(self):
        self.max_gap = 0.0
        self.beats = 0
        self._last = time.perf_counter()
        self._task: asyncio.Task | None = None

    def _beat(self) -> None:
        now = time.perf_counter()
        self.max_gap = max(self.max_gap, now - self._last)
        self._last = now

    async def _run(self):
        while True:
            await asyncio.sleep(0.002)
            self._beat()
            self.beats += 1

    def __enter__(self):
        self._gc_was_on = gc.isenabled()
        gc.disable()
        self._last = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self._beat()                     # a stall right before the end counts too
        self._task.cancel()
        if self._gc_was_on:
            gc.enable()


async def one(host, headers=REQ):
    s = host.stream(["f"], info())
    out = await asyncio.wait_for(s.request(headers, None), 5)
    await s.finish(LogInfo(status=200))
    return out


def threads_of(trace, callback: str) -> set[str]:
    return {r.threadName for r in trace.records if r.getMessage().startswith(f'filter "f": {callback}')}


async def test_slow_start_sequence_runs_on_a_build_thread_and_the_loop_keeps_running(load, trace):
    with Heartbeat() as hb:
        t0 = time.monotonic()
        host = await load(slow_start(400))
        took = time.monotonic() - t0
    assert took >= 0.4 and hb.beats >= 20
    assert hb.max_gap < STALL_BAR_S, f"the event loop stalled {hb.max_gap * 1000:.0f} ms during the load"
    threads = threads_of(trace, "proxy_on_configure")
    assert threads and all(t.startswith("wasmgate-build") for t in threads), threads
    assert isinstance(await one(host), Forward)


async def test_start_deadline_stops_a_start_sequence_spinning_on_the_build_thread(load, monkeypatch):
    monkeypatch.setattr(filter_mod, "START_DEADLINE_MS", 400)
    w = Wat()
    w.on("proxy_on_configure", "(loop $l (br $l)) (i32.const 1)")
    with Heartbeat() as hb:
        with pytest.raises(FilterLoadError) as ei:
            await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=50))
    msg = str(ei.value)
    assert "f.wat" in msg and "proxy_on_configure" in msg and "deadline" in msg, msg
    assert hb.max_gap < STALL_BAR_S, f"the event loop stalled {hb.max_gap * 1000:.0f} ms"


async def test_requests_during_a_rebuild_follow_the_policy_at_once_and_start_no_second_build(load, trace):
    host = await load(trap_on_x_boom(400))
    f = host.filters["f"]
    out = await one(host, REQ + [("x-boom", "1")])
    assert isinstance(out, LocalReply) and out.status == 503
    with Heartbeat() as hb:
        await asyncio.sleep(0)                    # the first failure's rebuild starts now
        assert f.building is not None
        answers = []
        while f.instance is None:
            t0 = time.perf_counter()
            out = await one(host)
            answers.append((out, time.perf_counter() - t0))
        await rebuilt(f)
    # (the last one may have met the new instance: the swap can land while it is in flight)
    refused = [t for o, t in answers if isinstance(o, LocalReply) and o.status == 503]
    assert len(refused) >= len(answers) - 1 and len(refused) >= 5, answers
    assert max(refused) < STALL_BAR_S, "a request waited for the build"
    assert hb.max_gap < STALL_BAR_S
    # one build for all those requests: the start sequence ran twice (load + one rebuild)
    assert len([l for l in trace.lines("f") if l.startswith("proxy_on_configure")]) == 2
    assert f.rebuilds == 1 and isinstance(await one(host), Forward)


async def test_ticks_and_callouts_asked_for_by_the_start_sequence_run_on_the_loop(load, services, trace):
    services.clusters["c"] = CallResponse(200, [("x-r", "1")], b"pong")
    w = Wat()
    hdrs = serialize([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])
    w.on("proxy_on_configure",
         "(drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))"
         f"(drop (call $proxy_http_call {w.s('c')} {w.s(hdrs)} (i32.const 0) (i32.const 0) "
         f"(i32.const 0) (i32.const 0) (i32.const 1000) (i32.const {OUT})))"
         f"{w.trace('proxy_on_configure', 2)} (i32.const 1)")
    w.on("proxy_on_tick", f"{w.trace('proxy_on_tick', 1)}"
         "(drop (call $proxy_set_tick_period_milliseconds (i32.const 0)))")
    host = await load(w)
    deadline = time.monotonic() + 5
    while not (threads_of(trace, "proxy_on_tick") and threads_of(trace, "proxy_on_http_call_response")):
        assert time.monotonic() < deadline, trace.lines("f")
        await asyncio.sleep(0.005)
    loop_thread = threading.current_thread().name
    assert all(t.startswith("wasmgate-build") for t in threads_of(trace, "proxy_on_configure"))
    assert threads_of(trace, "proxy_on_tick") == {loop_thread}
    assert threads_of(trace, "proxy_on_http_call_response") == {loop_thread}
    assert [c[0] for c in services.calls] == ["c"]
    assert host.filters["f"].instance is not None


async def test_closing_a_filter_mid_build_frees_the_instance_it_makes(load, monkeypatch):
    made = []

    class Recorded(filter_mod.Instance):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(filter_mod, "Instance", Recorded)
    host = await load(trap_on_x_boom(300))
    f = host.filters["f"]
    await one(host, REQ + [("x-boom", "1")])
    await asyncio.sleep(0)
    assert f.building is not None and len(made) <= 2
    await host.close()                             # waits for the build, frees its instance
    assert f.closed and f.building is None and f.instance is None and f.root is None
    assert len(made) == 2 and all(i._st.closed for i in made)
    assert f.ensure_ready() is False and f.building is None   # never rebuilt once closed


async def test_queue_items_enqueued_during_a_rebuild_reach_the_new_root(load, trace):
    consumer = trap_on_x_boom(300)
    consumer.on("proxy_on_configure",
                f"(drop (call $proxy_register_shared_queue {consumer.s('q')} (i32.const {OUT + 40})))"
                f"(call $burn (i32.const 300)) {consumer.trace('proxy_on_configure', 2)} (i32.const 1)")
    producer = Wat()
    producer.on("proxy_on_request_headers",
                f"(drop (call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) {producer.s('q')} "
                f"(i32.const {OUT}))) (drop (call $proxy_enqueue_shared_queue (i32.load (i32.const {OUT})) "
                f"{producer.s('item')})) (i32.const 0)")
    host = await load({"f": consumer, "p": producer})
    f = host.filters["f"]
    await one(host, REQ + [("x-boom", "1")])
    await asyncio.sleep(0)
    assert f.building is not None
    s = host.stream(["p"], info())
    assert isinstance(await s.request(REQ, None), Forward)
    await s.finish(LogInfo(status=200))
    await rebuilt(f)
    deadline = time.monotonic() + 5
    while not [l for l in trace.lines("f") if l.startswith("proxy_on_queue_ready")]:
        assert time.monotonic() < deadline, "the queue item was never announced"
        await asyncio.sleep(0.005)
    ready = [l for l in trace.lines("f") if l.startswith("proxy_on_queue_ready")]
    assert ready == [f"proxy_on_queue_ready {f.root.id} 1"]


async def test_a_callback_is_charged_its_own_cpu_not_a_concurrent_builds(load, services):
    """While filter "slow" computes its start sequence on a build thread, a callback of filter
    "h" on the loop that waits 200 ms without computing (here: a slow log handler) must not be
    charged the build's CPU: its 50 ms deadline counts its own thread's CPU only."""
    import logging

    class SlowHandler(logging.Handler):
        def emit(self, record):
            if "nap" in record.getMessage():
                time.sleep(0.2)

    healthy = Wat()
    healthy.extra.append(BURN)
    healthy.on("proxy_on_request_headers",       # then compute 5 ms: deadline checks run
               f"(drop (call $proxy_log (i32.const 2) {healthy.s('nap')})) (call $burn (i32.const 5)) "
               "(i32.const 0)")
    host = await load({"slow": trap_on_x_boom(1500), "h": healthy},
                      limits=FilterLimits(memory_bytes=16 << 20, callback_ms=50))
    slow = host.filters["slow"]
    s = host.stream(["slow"], info())
    await s.request(REQ + [("x-boom", "1")], None)
    await s.finish(LogInfo(status=200))
    deadline = time.monotonic() + 5
    while slow.building is None:
        assert time.monotonic() < deadline, "the rebuild did not start"
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.1)                     # the build is computing on its thread
    handler = SlowHandler()
    services.log.addHandler(handler)
    try:
        s = host.stream(["h"], info())
        out = await s.request(REQ, None)
        await s.finish(LogInfo(status=200))
    finally:
        services.log.removeHandler(handler)
    assert slow.building is not None, "the build ended before the check: nothing was measured"
    assert isinstance(out, Forward), host.filters["h"].failures
    assert not host.filters["h"].failures


async def test_a_request_callback_keeps_the_gil_while_a_build_thread_releases_it(load):
    # The loop thread's guest calls keep the GIL (_crossing.c run_guest: the loop waits for
    # them anyway, and a release costs two mutex round trips per call); a build thread's
    # release it, so the loop runs meanwhile (the tests above). Seen from another Python
    # thread: it cannot run while a request callback computes.
    from abi.engine import crossing
    if crossing._native is None:
        pytest.skip("abi/engine/_crossing.c is not built: the ctypes crossing always releases")
    host = await load(slow_start(0, "(call $burn (i32.const 60)) (i32.const 0)"))
    await one(host)                      # this thread now serves requests (its first chain walk)
    ran, stop, worst = threading.Event(), threading.Event(), []

    def count():
        last = time.perf_counter()
        gap = 0.0
        while not stop.is_set():
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
            ran.set()
        worst.append(gap)

    t = threading.Thread(target=count)
    t.start()
    assert await asyncio.to_thread(ran.wait, 5)
    await one(host)                      # 60 ms of guest computing on this thread
    stop.set()
    t.join(5)
    assert worst and worst[0] >= 0.05
