"""CounterPage: counters that a successor process continues and other processes read."""
from __future__ import annotations

import multiprocessing
import os
import signal

from gateway.counter_page import HEADER, INITIAL_BYTES, CounterPage, read_page
from gateway.metrics import Counts, Metrics


def test_a_successor_continues_the_file_and_readers_see_every_record(tmp_path):
    path = tmp_path / "counters-0"
    page = CounterPage(path)
    a = page.slot(("r", "api", 200))
    h = page.slot(("l", "backend"), 16)
    page.values[a] += 5
    page.values[h + 3] += 2
    assert page.slot(("r", "api", 200)) == a                      # same key, same slot
    page.close()
    again = CounterPage(path)                                     # the restarted worker
    assert again.slot(("r", "api", 200)) == a
    again.values[a] += 1
    got = dict(read_page(path))
    assert got[("r", "api", 200)] == [6]
    assert got[("l", "backend")][3] == 2 and len(got[("l", "backend")]) == 16
    assert read_page(tmp_path / "absent") == []


def test_growing_past_the_first_mapping_keeps_every_count(tmp_path):
    path = tmp_path / "counters-0"
    page = CounterPage(path)
    n = INITIAL_BYTES // 16                                       # far more records than fit at first
    for i in range(n):
        k = page.slot(("r", f"route-{i}", 200))
        page.values[k] += i
    assert os.path.getsize(path) > INITIAL_BYTES
    got = dict(read_page(path))
    assert len(got) == n and all(got[("r", f"route-{i}", 200)] == [i] for i in range(n))


def test_a_record_left_half_written_by_a_killed_writer_is_not_seen_and_is_reused(tmp_path):
    path = tmp_path / "counters-0"
    page = CounterPage(path)
    page.values[page.slot(("e", "x"))] += 1
    used = page.values[1]
    # What a writer killed before its commit leaves: bytes past `used` (a long key, say).
    page._mm[used:used + 200] = b"\xff" * 200
    page.close()
    assert dict(read_page(path)) == {("e", "x"): [1]}
    again = CounterPage(path)
    k = again.slot(("r", "api", 200), 2)
    assert list(again.values[k:k + 2]) == [0, 0]                  # not the dead writer's bytes


def _count_then_die(path: str, n: int, ready) -> None:
    m = Metrics(CounterPage(path))
    for _ in range(n):
        m.request_done("api", 200, 3, 4)
    m.upstream("backend", 0.002)
    ready.send(True)
    os.kill(os.getpid(), signal.SIGKILL)                          # no flush, no exit handler


def test_counts_written_before_a_sigkill_are_all_there(tmp_path):
    path = str(tmp_path / "counters-0")
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_count_then_die, args=(path, 1000, send))
    proc.start()
    assert recv.poll(60) and recv.recv()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    c = Counts.from_page(read_page(path))
    assert c.requests == {("api", 200): 1000}
    assert (c.bytes_in, c.bytes_out) == (3000, 4000)
    assert c.upstream_latency["backend"].count == 1


def test_metrics_move_to_carries_what_was_counted_before(tmp_path):
    m = Metrics()
    m.request_done("api", 200, 1, 2)
    m.error("bad_request")
    successor_of = CounterPage(tmp_path / "counters-0")           # holds a dead predecessor's counts
    successor_of.values[successor_of.slot(("r", "api", 200))] += 10
    m.move_to(successor_of)
    m.request_done("api", 200, 1, 2)
    c = m.counts()
    assert c.requests == {("api", 200): 12} and c.errors == {"bad_request": 1}
    assert (c.bytes_in, c.bytes_out) == (2, 4)
    assert HEADER < successor_of.values[1] <= os.path.getsize(tmp_path / "counters-0")
