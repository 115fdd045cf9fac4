"""LocalStore's CAS values: the create-if-absent sentinel (0xFFFFFFFF) is never handed out,
so a filter can create a key atomically within §5.4's rules (the ratelimit filter does)."""
import pytest

from abi.shared_store import LocalStore

from abi_helpers import on_threads

pytestmark = pytest.mark.usefixtures("local_store_impl")

OK, CAS_MISMATCH, SENTINEL = 0, 8, 0xFFFFFFFF


def test_sentinel_cas_creates_an_absent_key_and_never_overwrites():
    s = LocalStore()
    assert s.set(b"k", b"first", SENTINEL) == OK
    assert s.set(b"k", b"second", SENTINEL) == CAS_MISMATCH
    assert s.get(b"k")[0] == b"first"


def test_cas_counter_wraps_past_the_sentinel_and_zero():
    s = LocalStore()
    s._next_cas = 0xFFFFFFFE
    s.set(b"a", b"1", 0)
    assert s.get(b"a")[1] == 0xFFFFFFFE
    s.set(b"a", b"2", 0)
    assert s.get(b"a")[1] == 1


def test_cas_increments_from_two_threads_lose_nothing():
    """A start sequence may write shared data on a build thread while the event loop does too:
    CAS read-modify-write loops from both must not lose an update."""
    s = LocalStore()
    s.set(b"n", b"0", 0)
    n = 3000

    def bump():
        for _ in range(n):
            while True:
                value, cas = s.get(b"n")
                if s.set(b"n", str(int(value) + 1).encode(), cas) == OK:
                    break

    on_threads(bump, 2)
    assert s.get(b"n")[0] == str(2 * n).encode()
