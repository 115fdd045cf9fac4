"""Bounds on what a filter can make the host allocate: gathered log lines, header maps,
properties. Peak host allocation is measured with tracemalloc around the guest call."""
from __future__ import annotations

import asyncio
import tracemalloc

from abi.api import FilterLimits, Forward, LocalReply, LogInfo
from abi.limits import MAX_LOG_BYTES

from abi_helpers import REQ, info
from abi_wat import OUT, Wat

IOVS = 0x10000          # where the guest builds its iovec list
WRITTEN = OUT + 8       # fd_write's nwritten out-param


def iovec_flood(w: Wat, n: int, ptr: int, length: int, fd: int = 1, last: tuple[int, int] | None = None) -> str:
    """WAT: fill an n-entry iovec list at IOVS, every entry (ptr, length) (the last one `last`
    if given), call fd_write with it and trace its errno and nwritten."""
    body = ("(local $i i32)"
            "(loop $l"
            f" (i32.store (i32.add (i32.const {IOVS}) (i32.shl (local.get $i) (i32.const 3))) (i32.const {ptr}))"
            f" (i32.store (i32.add (i32.const {IOVS + 4}) (i32.shl (local.get $i) (i32.const 3))) (i32.const {length}))"
            " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
            f" (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))")
    if last is not None:
        at = IOVS + 8 * (n - 1)
        body += f"(i32.store (i32.const {at}) (i32.const {last[0]})) (i32.store (i32.const {at + 4}) (i32.const {last[1]}))"
    body += (f"(i32.store (i32.const {WRITTEN}) (i32.const 0))"
             f"(call $log_num {w.s('errno')} (call $fd_write (i32.const {fd}) (i32.const {IOVS}) (i32.const {n}) (i32.const {WRITTEN})))"
             f"(call $log_num {w.s('written')} (i32.load (i32.const {WRITTEN})))")
    return body


async def run_request(host, names=("f",)):
    s = host.stream(list(names), info())
    out = await asyncio.wait_for(s.request(REQ, None), 10)
    await s.finish(LogInfo(status=200))
    return out


async def measured(coro):
    """(result, peak bytes allocated by Python while it ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = await coro
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def stdout_lines(trace, name="f") -> list[str]:
    prefix = f'filter "{name}" stdout: '
    return [r.getMessage()[len(prefix):] for r in trace.records if r.getMessage().startswith(prefix)]


async def test_fd_write_8000_iovecs_over_one_block_stays_bounded(load, trace):
    # A 128 KiB guest names its first 64 KiB 8,000 times: 524,288,000 bytes claimed.
    w = Wat(pages=2)
    w.on("proxy_on_request_headers", iovec_flood(w, 8000, 0, 65536) + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    out, peak = await measured(run_request(host))
    assert isinstance(out, Forward)
    assert trace.lines("f")[1:3] == ["errno 0", f"written {8000 * 65536}"]
    # The host copied one log line's worth, not the claim (the unbounded gather peaked at ~1 GiB).
    assert peak < 1 << 20, peak
    [line] = stdout_lines(trace)
    assert line.endswith(f"… ({8000 * 65536} bytes)") and len(line) < MAX_LOG_BYTES + 64
    # The filter is unharmed: the next request runs on the same instance.
    assert isinstance(await run_request(host), Forward)
    assert host.filters["f"].failures == {} and host.filters["f"].rebuilds == 0


async def test_fd_write_checks_every_iovec_even_past_the_cap(load, trace):
    # The cap fills on the first iovec; the 5000th points outside memory: still FAULT.
    w = Wat(pages=2)
    w.on("proxy_on_request_headers", iovec_flood(w, 5000, 0, 65536, last=(0x1FFFF, 2)) + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 21", "written 0"]      # FAULT, nothing written
    assert stdout_lines(trace) == []


async def test_fd_write_claim_over_4_gib_is_inval(load, trace):
    w = Wat(pages=10)                   # room for a 65,537-entry list at IOVS
    w.on("proxy_on_request_headers", iovec_flood(w, 65537, 0, 65536) + "(i32.const 0)")
    host = await load(w, limits=FilterLimits(memory_bytes=16 << 20, callback_ms=2000))
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 28", "written 0"]      # INVAL: over u32


async def test_fd_write_small_lines_unchanged(load, trace):
    w = Wat(pages=2)
    text = b"hello from the guest\n"
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {IOVS}) {w.s(text).split(') (')[0]}))"
         f"(i32.store (i32.const {IOVS + 4}) (i32.const {len(text)}))"
         f"(call $log_num {w.s('errno')} (call $fd_write (i32.const 2) (i32.const {IOVS}) (i32.const 1) (i32.const {WRITTEN})))"
         f"(call $log_num {w.s('written')} (i32.load (i32.const {WRITTEN}))) (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await run_request(host)
    assert trace.lines("f")[1:3] == ["errno 0", f"written {len(text)}"]
    assert 'filter "f" stderr: hello from the guest' in trace.text()


async def test_proxy_log_reads_only_the_cap(load, trace):
    w = Wat(pages=64)                   # 4 MiB guest logging all of it
    size = 64 * 65536
    w.on("proxy_on_request_headers",
         f"(call $log_num {w.s('log')} (call $proxy_log (i32.const 2) (i32.const 0) (i32.const {size})))"
         f"(call $log_num {w.s('bad')} (call $proxy_log (i32.const 2) (i32.const 1) (i32.const {size})))"
         "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    _, peak = await measured(run_request(host))
    lines = trace.lines("f")
    assert lines[1].endswith(f"… ({size} bytes)") and len(lines[1]) < MAX_LOG_BYTES + 64
    assert lines[2:4] == ["log 0", "bad 6"]        # one byte past the end: INVALID_MEMORY_ACCESS
    assert peak < 1 << 20, peak
