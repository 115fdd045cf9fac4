"""abi/_local_store.c's LocalStore.set against the Python _set it mirrors: on random writes
(expiring and not, CAS current, stale and create-if-absent, expire-at-once deletes, writes that
must evict, enough rewrites to compact the deadline heap, the clock moving) both leave the same
store, field for field; a rate limiter's writes never reach the Python _set."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from abi import shared_store
from abi.shared_store import ENTRY_OVERHEAD, LocalStore

from abi_helpers import CREATE_IF_ABSENT, STORE_OPS, store_op

pytestmark = pytest.mark.skipif(shared_store._StoreBase is object,
                                reason="abi/_local_store.c is not built (no C compiler at install?)")

OK, CAS_MISMATCH, INTERNAL_FAILURE = 0, 8, 10
KEYS = [b"k%d" % i for i in range(6)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def _pair(max_bytes: int) -> tuple[Clock, LocalStore, LocalStore]:
    clock = Clock()
    c, py = LocalStore(max_bytes=max_bytes, clock=clock), LocalStore(max_bytes=max_bytes, clock=clock)
    c._pure, py._pure = False, True
    return clock, c, py


def _state(s: LocalStore) -> tuple:
    return (dict(s._data), dict(s._deadlines), list(s._by_deadline), s._bytes, s._evictable,
            s._next_cas, s.expired, s.evicted)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(STORE_OPS + ["rewrites", "tick"]),
                              st.integers(0, len(KEYS) - 1), st.integers(0, 600)), max_size=60))
def test_c_set_leaves_what_the_python_set_leaves(ops):
    clock, c, py = _pair(max_bytes=5 * (ENTRY_OVERHEAD + 120))      # small: writes evict
    last_cas: dict = {}
    for op, i, n in ops:
        key, val = KEYS[i], b"v" * (n % 250)
        if op == "tick":
            clock.now += n
            continue
        if op == "rewrites":                      # stale heap items pile up: _compact runs
            res = [[s.set(key, b"r", 0, ttl_ns=10_000 + n) for _ in range(70)] for s in (c, py)]
        else:
            res = [store_op(s, op, key, val, n, last_cas.get(i, 1)) for s in (c, py)]
        if isinstance(res[0], tuple):
            last_cas[i] = res[0][1]
        assert res[0] == res[1], (op, i, n, res)
        assert _state(c) == _state(py), (op, i, n)


def test_a_rate_limiter_never_reaches_the_python_set(monkeypatch):
    """A token bucket per client: get, then set with a short expiry (or create-if-absent);
    expired buckets read absent and are overwritten; each write pops the bucket's previous
    deadline. All of it in C: LocalStore._set never runs. A write that must evict calls
    _fits, still without _set."""
    calls = []
    real = LocalStore._set
    monkeypatch.setattr(LocalStore, "_set", lambda self, *a: calls.append(a) or real(self, *a))
    clock, c, _py = _pair(max_bytes=4 * (ENTRY_OVERHEAD + 40))
    for step in range(300):
        key = b"bucket:%d" % (step % 3)
        cur = c.get(key)
        assert c.set(key, b"t" * 30, cur[1] if cur else CREATE_IF_ABSENT, 10) == OK
        clock.now += 7
    assert c.set(b"other", b"x" * 40, 0, 1_000_000) == OK     # needs room: evicts an expiring bucket
    assert calls == []
    assert c.evicted + c.expired > 0 and len(c._by_deadline) <= 2 * len(c._deadlines) + 64


def test_arguments_the_host_never_passes_take_the_python_set(monkeypatch):
    calls = []
    real = LocalStore._set
    monkeypatch.setattr(LocalStore, "_set", lambda self, *a: calls.append(a) or real(self, *a))
    s = LocalStore()
    s._pure = False
    assert s.set(b"k", bytearray(b"v"), 0) == OK          # not bytes
    assert s.set(b"k", b"v", 1 << 40) == CAS_MISMATCH     # not a u32 cas
    assert s.set(b"k", b"v", 0, ttl_ns=-1) == OK          # not a u64 ttl
    assert len(calls) == 3
    with pytest.raises(TypeError):
        s.set(b"k", b"v")
    with pytest.raises(TypeError):
        s.set(b"k", b"v", 0, ttl=5)


def test_a_store_without_room_fails_the_write_and_changes_nothing():
    clock, c, py = _pair(max_bytes=ENTRY_OVERHEAD + 10)
    for s in (c, py):
        assert s.set(b"a", b"12345", 0) == OK              # plain: never evicted
        before = _state(s)
        assert s.set(b"b", b"x", 0, 100) == INTERNAL_FAILURE
        assert _state(s) == before


def test_a_due_write_pops_stale_deadlines_as_far_as_the_python_reap_does():
    # Under the top (stale, due): another stale item not yet due, then live entries. _reap's
    # _earliest pops both stale items before it finds a live one; so must the C path.
    clock, c, py = _pair(max_bytes=1 << 20)
    for s in (c, py):
        s.set(b"a", b"1", 0, 10)           # a@+10 ...
        s.set(b"a", b"1", 0, 5_000)        # ... stale from here
        s.set(b"b", b"1", 0, 500)          # b@+500 ...
        s.set(b"b", b"1", 0, 9_000)        # ... stale from here
    clock.now += 20                        # a's old item due, b's old one not
    assert c.set(b"c", b"1", 0, 10_000) == py.set(b"c", b"1", 0, 10_000) == OK
    assert _state(c) == _state(py)
    assert len(c._by_deadline) == 3        # a, b, c: both stale items gone
