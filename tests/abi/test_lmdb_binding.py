"""abi/_lmdb.c, the shared store's C binding of LMDB, against py-lmdb (the fallback).

Two things are checked: the py-lmdb subset abi/shared_store_shm.py uses behaves the same on
both, and the store's request path in C (get_entry, set_entry) leaves the very records the
Python path (ShmStore._set_txn over py-lmdb) leaves, byte for byte, on random operations with
expiry, eviction, long keys and CAS.
"""
from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from abi import shared_store_shm as S

from abi_helpers import CREATE_IF_ABSENT, STORE_OPS, store_op

pytestmark = pytest.mark.skipif(S._c_lmdb is None, reason="abi/_lmdb.c is not built")
BINDINGS = {"c": S._c_lmdb, "py-lmdb": S._py_lmdb}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=list(BINDINGS))
def env(request, tmp_path):
    lib = BINDINGS[request.param]
    e = lib.open(str(tmp_path / "db"), map_size=1 << 20, subdir=True, max_dbs=0, max_readers=8,
                 max_spare_txns=1, sync=False, metasync=False, writemap=True, readahead=False,
                 meminit=False, lock=True, create=True)
    yield lib, e
    e.close()


def test_transactions_cursors_and_errors_behave_as_py_lmdb(env):
    lib, e = env
    with e.begin(write=True) as txn:
        for k in (b"a1", b"a2", b"b1", b"c1"):
            assert txn.put(k, k.upper()) is True
    with e.begin() as txn:
        assert txn.get(b"a2") == b"A2" and txn.get(b"zz") is None and txn.get(b"zz", 7) == 7
        cur = txn.cursor()
        assert cur.set_range(b"b") and cur.key() == b"b1" and cur.value() == b"B1"
        assert list(cur) == [(b"b1", b"B1"), (b"c1", b"C1")]     # from the current position
        assert list(txn.cursor()) == [(k, k.upper()) for k in (b"a1", b"a2", b"b1", b"c1")]
        assert not txn.cursor().set_range(b"d")
    txn = e.begin(write=True)
    assert txn.pop(b"a1") == b"A1" and txn.pop(b"a1") is None
    assert txn.delete(b"b1") is True and txn.delete(b"b1") is False
    txn.abort()                                                 # nothing of it happened
    with e.begin() as txn:
        assert txn.get(b"a1") == b"A1" and txn.get(b"b1") == b"B1"
    with pytest.raises(ZeroDivisionError):
        with e.begin(write=True) as txn:
            txn.put(b"x", b"1")
            1 / 0                                               # an exception aborts
    with e.begin() as txn:
        assert txn.get(b"x") is None
    assert issubclass(lib.MapFullError, lib.Error)
    assert e.reader_check() == 0 and e.info()["last_pgno"] > 0
    with pytest.raises(lib.Error):
        lib.open("/nonexistent/wasmgate-db", create=False)


def test_a_full_map_raises_map_full(env):
    lib, e = env
    with pytest.raises(lib.MapFullError):
        with e.begin(write=True) as txn:
            for i in range(100_000):
                txn.put(b"%08d" % i, b"v" * 200)
    with e.begin(write=True) as txn:                            # the failed txn left nothing
        assert txn.get(b"00000000") is None and txn.put(b"k", b"v")


def test_a_used_cursor_after_its_transaction_ends_raises(env):
    lib, e = env
    txn = e.begin(write=True)
    txn.put(b"k", b"v")
    cur = txn.cursor()
    txn.commit()
    with pytest.raises(lib.Error):
        cur.set_range(b"k")
    with pytest.raises(lib.Error):
        txn.get(b"k")


# ------------------------------------------------------------------ the request path in C

def _pair():
    """The same store twice, on the C binding and on py-lmdb, sharing one hand-driven clock."""
    clock = Clock()
    stores = []
    for lib in (S._c_lmdb, S._py_lmdb):
        saved, S.binding = S.binding, lib
        try:
            name = f"test-{uuid.uuid4().hex[:12]}"
            s = S.create(name, S.MIN_MAX_BYTES)
        finally:
            S.binding = saved
        s.clock = clock
        stores.append((s, name))
    return clock, stores


def _records(s: S.ShmStore) -> list:
    with s._ensure_env().begin() as txn:
        return list(txn.cursor())


KEYS = [b"k%d" % i for i in range(6)] + [b"L" * 500, b"L" * 501]   # two hashed (long) keys


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(STORE_OPS + ["tick"]),
                              st.integers(0, len(KEYS) - 1), st.integers(0, 600)), max_size=80))
def test_c_request_path_writes_what_the_python_path_writes(ops):
    clock, stores = _pair()
    (c, _), (py, _) = stores
    budget = 9 * (S.ENTRY_OVERHEAD + 200)                  # small: writes evict
    c.max_bytes = py.max_bytes = budget
    last_cas: dict = {}
    try:
        for op, i, n in ops:
            key, val = KEYS[i], b"v" * (n % 300)
            if op == "tick":
                clock.now += n
                continue
            res = [store_op(s, op, key, val, n, last_cas.get(i, 1)) for s in (c, py)]
            if res[0] is not None and not isinstance(res[0], int):
                last_cas[i] = res[0][1]
            assert res[0] == res[1], (op, i, n, res)
            assert _records(c) == _records(py), (op, i, n)
        assert c.verify() == [] and py.verify() == []
    finally:
        for s, name in stores:
            s.close()
            S.remove(name)


def test_a_rate_limiter_never_leaves_the_c_path(monkeypatch):
    """What a token bucket does per request — get; set with a short expiry or create-if-absent;
    expired buckets read absent and are overwritten; a full bucket is deleted (ttl 0); old
    deadlines are reaped — runs whole in set_entry: ShmStore._set_txn (Python) never runs.
    Only a write that must evict leaves it."""
    calls = []
    real = S.ShmStore._set_txn
    monkeypatch.setattr(S.ShmStore, "_set_txn", lambda self, txn, dk, *a: calls.append(dk) or real(self, txn, dk, *a))
    clock, stores = _pair()
    (s, _), (py, _) = stores
    try:
        for r in range(2000):
            key = b"ratelimit:ns:per_client:9:10.0.0.%d" % (r % 7)
            cur = s.get(key)
            ttl = 0 if r % 11 == 0 else 10 + r % 50
            cas = cur[1] if cur else CREATE_IF_ABSENT
            assert s.set(key, b"%016d" % r, cas, ttl) == S.OK
            clock.now += 17
        u = s.usage()
        assert u["expired"] > 100 and u["evictable"] > 0 and s.verify() == []
        assert calls == []
        s.max_bytes = u["used"]                              # no room left: the next write evicts
        assert s.set(b"new-key", b"x" * 64, 0, 1000) == S.OK
        assert calls == [b"knew-key"] and s.usage()["evicted"] > 0
    finally:
        for st_, name in stores:
            st_.close()
            S.remove(name)


def _closing(stores):
    for s, name in stores:
        s.close()
        S.remove(name)


@pytest.mark.parametrize("ttl", [None, 0, 1, 10**9, (1 << 64) - 1, (1 << 64) + 3, 1 << 70])
def test_the_c_path_derives_keys_cas_and_deadlines_as_python_does(ttl):
    """set_entry takes the key, cas and ttl as ShmStore.set does and derives the rest in C:
    the data key, the cas mod 2**32, the deadline capped at 2**64 - 1 (a clock near the top),
    ttl 0 as a delete. Same statuses and records as the Python path, for keys either side of
    the hashed-key length and for keys and values that are not bytes."""
    clock, stores = _pair()
    (c, _), (py, _) = stores
    clock.now = (1 << 64) - 1000
    try:
        for key in (b"a", b"k" * (S.LONG_KEY - 1), b"k" * S.LONG_KEY, bytearray(b"ba")):
            for value, cas in ((b"v1", 0), (memoryview(b"v2"), None), (b"v3", (1 << 32) + 7)):
                res = []
                for s in (c, py):
                    cur = s.get(key)
                    res.append((cur, s.set(key, value, cur[1] if cas is None and cur else cas or 0, ttl)))
                assert res[0] == res[1], (key[:8], value, cas, ttl)
                assert _records(c) == _records(py)
                clock.now += 1
        assert c.verify() == [] and py.verify() == []
    finally:
        _closing(stores)


def test_the_c_path_reads_the_clock_python_reads():
    """With the default clock, get_entry and set_entry read CLOCK_MONOTONIC in C: a deadline
    lands between time.monotonic_ns() taken before and after the write, plus the ttl."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    saved, S.binding = S.binding, S._c_lmdb
    try:
        s = S.create(name, S.MIN_MAX_BYTES)
    finally:
        S.binding = saved
    try:
        assert s.clock is time.monotonic_ns
        before = time.monotonic_ns()
        assert s.set(b"bucket", b"x", 0, 10**9) == S.OK
        after = time.monotonic_ns()
        due = {k: v for k, v in _records(s)}[b"kbucket"]
        assert before + 10**9 <= S._REC.unpack_from(due)[1] <= after + 10**9
        assert s.get(b"bucket")[0] == b"x"
        assert s.set(b"gone", b"x", 0, 1) == S.OK            # due 1 ns later: already past
        assert s.get(b"gone") is None
    finally:
        s.close()
        S.remove(name)


def test_short_keys_never_reach_the_python_path(monkeypatch):
    """A short key's get and set are get_entry and set_entry alone: the Python that derives
    the data key never runs for them on the C binding (it does on py-lmdb)."""
    calls = []
    real = S._data_key
    monkeypatch.setattr(S, "_data_key", lambda key: calls.append(key) or real(key))
    clock, stores = _pair()
    (c, _), (py, _) = stores
    try:
        for s in (c, py):
            calls.clear()
            for r in range(50):
                cur = s.get(b"ratelimit:%d" % (r % 3))
                assert s.set(b"ratelimit:%d" % (r % 3), b"%d" % r,
                             cur[1] if cur else CREATE_IF_ABSENT, 10 + r) == S.OK
                clock.now += 3
            assert (len(calls) == 0) == (s is c), len(calls)
    finally:
        _closing(stores)
