"""Expiring shared-data entries (wasmgate's extension, abi/foreign.py) in both backends:
abi/shared_store.py's LocalStore (one process) and abi/shared_store_shm.py's ShmStore (LMDB
shared by worker processes) must behave the same — same statuses, same values, same cas, same
entries dropped — which the differential test at the end checks on random operation sequences.

The stores read a monotonic clock; here each gets a hand-driven one, so expiry is tested
without sleeping.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from abi import shared_store_shm as S
from abi.shared_store import ENTRY_OVERHEAD, LocalStore, entry_cost

OK, CAS_MISMATCH, FULL = 0, 8, 10
CREATE_IF_ABSENT = 0xFFFFFFFF
FORK = mp.get_context("fork")
#: every test on both LMDB bindings (abi/_lmdb.c and py-lmdb; tests/abi/conftest.py)
pytestmark = pytest.mark.usefixtures("lmdb_binding")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def _entry(key: bytes, value: bytes) -> int:
    return entry_cost(key, value)


@pytest.fixture(params=["local", "local-py", "shm"])
def make(request):
    """make(max_bytes) → a fresh store of the parametrized kind with a hand-driven clock
    (local: LocalStore.set in C where abi/_local_store.c is built; local-py: its Python _set)."""
    made = []

    def factory(max_bytes: int):
        clock = Clock()
        if request.param.startswith("local"):
            s = LocalStore(max_bytes=max_bytes, clock=clock)
            s._pure = s._pure or request.param == "local-py"
        else:
            name = f"test-{uuid.uuid4().hex[:12]}"
            s = S.create(name, max(max_bytes, S.MIN_MAX_BYTES))
            s.max_bytes = max_bytes            # the same budget as LocalStore (below the shm minimum)
            s.clock = clock
            made.append((s, name))
        return s, clock

    yield factory
    for s, name in made:
        assert s.verify() == []
        s.close()
        S.remove(name)


def test_expired_entry_reads_absent_and_is_created_anew(make):
    s, clock = make(1 << 20)
    assert s.set(b"b", b"v1", 0, 100) == OK
    v, cas = s.get(b"b")
    assert v == b"v1"
    clock.now += 99
    assert s.get(b"b") == (b"v1", cas)
    clock.now += 1
    assert s.get(b"b") is None                          # deadline reached: absent
    # the create-if-absent cas (ratelimit) creates it again; a stale cas does too (absent key)
    assert s.set(b"b", b"v2", CREATE_IF_ABSENT, 100) == OK
    assert s.set(b"b", b"v3", CREATE_IF_ABSENT, 100) == CAS_MISMATCH
    clock.now += 100
    assert s.set(b"b", b"v4", cas, 100) == OK
    assert s.get(b"b")[0] == b"v4"
    assert s.usage()["used"] == _entry(b"b", b"v4")     # one entry, whatever was overwritten


def test_plain_set_keeps_an_entry_forever(make):
    s, clock = make(1 << 20)
    s.set(b"k", b"x", 0, 10)
    assert s.set(b"k", b"y", s.get(b"k")[1]) == OK      # plain set (what every SDK sends)
    clock.now += 10**15
    assert s.get(b"k")[0] == b"y"
    assert s.usage()["evictable"] == 0


def test_ttl_zero_is_a_cas_guarded_delete(make):
    s, _ = make(1 << 20)
    s.set(b"k", b"x", 0, 1000)
    cas = s.get(b"k")[1]
    assert s.set(b"k", b"", cas + 1, 0) == CAS_MISMATCH
    assert s.get(b"k")[0] == b"x"
    assert s.set(b"k", b"", cas, 0) == OK
    assert s.get(b"k") is None
    assert s.set(b"nothing", b"", 0, 0) == OK
    u = s.usage()
    assert (u["used"], u["evictable"], u["expired"], u["evicted"]) == (0, 0, 0, 0)   # a delete, not an eviction


def test_plain_entries_are_never_dropped(make):
    per = _entry(b"p0", b"v" * 10)
    s, clock = make(3 * per)
    for i in range(3):
        assert s.set(b"p%d" % i, b"v" * 10, 0) == OK
    assert s.set(b"p3", b"v" * 10, 0) == FULL
    assert s.set(b"e", b"v" * 10, 0, 5) == FULL
    clock.now += 10**12
    assert [s.get(b"p%d" % i)[0] for i in range(3)] == [b"v" * 10] * 3
    assert s.usage()["evicted"] == s.usage()["expired"] == 0


def test_room_comes_from_the_earliest_deadline(make):
    per = _entry(b"e0", b"v" * 10)                      # every entry here costs `per`
    s, clock = make(4 * per)
    s.set(b"pl", b"v" * 10, 0)                          # plain: never a candidate
    for i, ttl in enumerate([300, 100, 200]):
        assert s.set(b"e%d" % i, b"v" * 10, 0, ttl) == OK
    assert s.set(b"n0", b"v" * 10, 0, 50) == OK         # the store is full: e1 (deadline 100) goes
    assert s.get(b"e1") is None and s.get(b"e0") and s.get(b"e2") and s.get(b"pl")
    assert s.usage()["evicted"] == 1 and s.usage()["expired"] == 0
    # the entry being written is never its own victim, even with the earliest deadline
    assert s.set(b"n0", b"v" * (10 + per), s.get(b"n0")[1], 50) == OK
    assert s.get(b"n0") and s.get(b"e2") is None and s.get(b"e0")
    # once deadlines pass, the victims count as expired, not evicted
    clock.now += 1000
    assert s.set(b"l0", b"v" * 10, 0) == OK             # a plain write may use that room too
    assert s.get(b"n0") is None and s.get(b"e0") is None   # (n0 freed enough; e0 merely expired)
    assert s.usage()["expired"] == 1 and s.usage()["evicted"] == 2
    assert s.usage()["used"] == 3 * per


def test_rewritten_entries_are_evicted_by_their_latest_deadline():
    """LocalStore keeps deadlines in a heap with lazy deletion: an entry rewritten (a rate-limit
    bucket on every request) leaves stale items behind, which must neither decide the eviction
    order nor pile up."""
    clock = Clock()
    s = LocalStore(max_bytes=3 * _entry(b"a", b"v"), clock=clock)
    assert s.set(b"a", b"v", 0, 100) == OK
    assert s.set(b"b", b"v", 0, 200) == OK
    for i in range(1000):                 # a's deadline keeps moving past b's
        assert s.set(b"a", b"v", s.get(b"a")[1], 300 + i) == OK
    assert len(s._by_deadline) <= 2 * 2 + 64
    assert s.set(b"c", b"v", 0, 5000) == OK             # fits
    assert s.set(b"d", b"v", 0, 5000) == OK             # room from the earliest: b (200)
    assert s.get(b"b") is None and s.get(b"a") is not None
    assert s.usage()["evicted"] == 1
    clock.now += 1299                                   # a's last deadline (300 + 999)
    assert s.set(b"e", b"v", 0, 5000) == OK             # reaps a, then fits
    assert s.get(b"a") is None and s.usage()["expired"] == 1


def test_not_enough_evictable_room_changes_nothing(make):
    per = _entry(b"e0", b"v" * 10)
    s, _ = make(3 * per)
    s.set(b"e0", b"v" * 10, 0, 100)
    s.set(b"p1", b"v" * 10, 0)
    s.set(b"p2", b"v" * 10, 0)
    before = s.usage()
    assert s.set(b"big", b"v" * (2 * per), 0, 100) == FULL     # e0 alone frees too little
    assert s.get(b"e0")[0] == b"v" * 10 and s.usage() == before


def test_each_expiring_write_reclaims_two_expired_entries(make):
    s, clock = make(1 << 20)
    for i in range(10):
        s.set(b"old%d" % i, b"v", 0, 10 + i)
    clock.now += 100
    s.set(b"fresh", b"v", 0, 1000)
    assert s.usage()["expired"] == 2                    # bounded work: two per write
    assert s.usage()["used"] == 8 * _entry(b"old0", b"v") + _entry(b"fresh", b"v")
    for i in range(3):
        s.set(b"more%d" % i, b"v", 0, 1000)
    assert s.usage()["expired"] == 8
    s.set(b"plain", b"v", 0)                            # plain writes do not reap
    assert s.usage()["expired"] == 8


def test_making_room_drops_only_what_is_needed(make):
    per = _entry(b"k00000", b"v" * 16)
    s, _ = make(1000 * per)
    for i in range(1000):
        assert s.set(b"k%05d" % i, b"v" * 16, 0, 10**9 + i) == OK
    for i in range(1000, 1100):                         # each new key drops exactly one
        assert s.set(b"k%05d" % i, b"v" * 16, 0, 10**9 + i) == OK
        assert s.usage()["evicted"] == i - 999
    assert s.get(b"k00099") is None and s.get(b"k00100")   # the 100 earliest deadlines went
    assert s.usage()["used"] == 1000 * per


def test_shm_queue_and_metric_writes_make_room_too():
    name = f"test-{uuid.uuid4().hex[:12]}"
    s = S.create(name, S.MIN_MAX_BYTES)
    try:
        qid = s.register_queue("q")
        i = 0
        while s.usage()["evicted"] == 0:                # full of expiring entries
            assert s.set(b"e%d" % i, b"v" * 100, 0, 10**12) == OK
            i += 1
        assert s.enqueue(qid, b"x" * 500) == OK and s.usage()["evicted"] >= 4
        s.define_metric(S.COUNTER, "m" * 300)
        assert s.usage()["evicted"] >= 6
        assert s.usage()["used"] <= s.max_bytes and s.verify() == []
    finally:
        s.close()
        S.remove(name)


# ------------------------------------------------------------------ shm across processes

def _churn(name: str, wid: int) -> None:
    """Fresh expiring keys as fast as possible, in a store far too small for them."""
    s = S.open(name)
    i = 0
    while True:
        st_ = s.set(b"w%d-%d" % (wid, i), b"v" * (i % 40), 0, 10**12 - i)
        assert st_ == OK, st_
        cur = s.get(b"shared")                          # and the ratelimit's create-if-absent
        s.set(b"shared", b"x", cur[1] if cur else CREATE_IF_ABSENT, 10**12)
        i += 1


def test_shm_eviction_survives_killed_workers():
    name = f"test-{uuid.uuid4().hex[:12]}"
    s = S.create(name, 64 * 1024)
    try:
        for r in range(4):
            procs = [FORK.Process(target=_churn, args=(name, 2 * r + w), daemon=True) for w in range(2)]
            for p in procs:
                p.start()
            target = s.usage()["evicted"] + 2000
            for _ in range(100_000):                    # until both have evicted a lot, then kill -9
                if s.usage()["evicted"] >= target or not all(p.is_alive() for p in procs):
                    break
                os.sched_yield()
            assert all(p.is_alive() for p in procs), "a churn worker failed"
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
            s.check_readers()
            assert s.verify() == []
        u = s.usage()
        assert u["evicted"] >= 8000 and u["used"] <= u["max_bytes"]
        assert s.set(b"after", b"ok", 0, 10**9) == OK and s.get(b"after")[0] == b"ok"
        assert s.verify() == []
    finally:
        s.close()
        S.remove(name)


# ------------------------------------------------------------------ both backends agree

@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["get", "set", "set_ttl", "set_cas_ttl", "create",
                                               "delete", "tick"]),
                              st.integers(0, 7), st.integers(0, 120)), max_size=80))
def test_same_results_as_local_store_under_pressure(ops):
    budget = 6 * _entry(b"key0", b"v" * 60)
    clock = Clock()
    local = LocalStore(max_bytes=budget, clock=clock)
    name = f"test-{uuid.uuid4().hex[:12]}"
    shm = S.create(name, S.MIN_MAX_BYTES)
    shm.max_bytes = budget
    shm.clock = clock
    try:
        for op, i, n in ops:
            key, val = b"key%d" % i, b"v" * n
            if op == "tick":
                clock.now += n
                continue
            res = []
            for s in (local, shm):
                cur = s.get(key)
                if op == "get":
                    res.append(cur)
                elif op == "set":
                    res.append(s.set(key, val, 0))
                elif op == "set_ttl":
                    res.append(s.set(key, val, 0, n))
                elif op == "set_cas_ttl":
                    res.append(s.set(key, val, cur[1] if cur else 0, 1 + n % 50))
                elif op == "create":
                    res.append(s.set(key, val, CREATE_IF_ABSENT, 1 + n))
                else:
                    res.append(s.set(key, b"", cur[1] if cur else 0, 0))
            assert res[0] == res[1], (op, i, n, res)
            assert local.usage() == {k: shm.usage()[k] for k in local.usage()}
            assert local.usage()["used"] <= budget
        assert shm.verify() == []
        assert [local.get(b"key%d" % i) for i in range(8)] == [shm.get(b"key%d" % i) for i in range(8)]
    finally:
        shm.close()
        S.remove(name)


def test_entry_overhead_is_shared():
    assert S.ENTRY_OVERHEAD == ENTRY_OVERHEAD == 64


def test_shm_reap_hint_follows_the_earliest_deadline():
    """ShmStore keeps a lower bound of the earliest deadline (meta[7]) so an expiring write opens
    the deadline index only once something may be due; the bound must never pass a deadline."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s = S.create(name, 1 << 20)
    s.clock = clock = Clock()
    t0 = clock.now

    def hint() -> int:
        with s._ensure_env().begin() as txn:
            return s._meta(txn)[7]

    try:
        assert hint() == S._U64                          # empty index
        s.set(b"a", b"v", 0, 500)
        s.set(b"b", b"v", 0, 100)
        assert hint() == t0 + 100                        # lowered by the earlier deadline
        s.set(b"b", b"v", 0, 1000)                       # b moves later: the bound may stay low
        assert hint() <= t0 + 500
        clock.now += 200                                 # passes the stale bound, not a deadline
        s.set(b"c", b"v", 0, 1000)
        assert hint() == t0 + 500 and s.usage()["expired"] == 0   # made exact by the look
        clock.now += 400                                 # a is due now
        s.set(b"d", b"v", 0, 1000)
        assert s.get(b"a") is None and s.usage()["expired"] == 1
        assert hint() == t0 + 1000                       # b's deadline, the earliest left
        for k in (b"b", b"c", b"d"):
            s.set(k, b"", 0, 0)                          # expire now: deletes
        assert hint() == S._U64 and s.usage()["evictable"] == 0
        assert s.verify() == []
    finally:
        s.close()
        S.remove(name)
