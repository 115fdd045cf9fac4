"""random_ids.py: ids drawn from a buffered CSPRNG are well-formed, never repeat, not even in a fork."""
from __future__ import annotations

import os
import re

from gateway import random_ids
from gateway.random_ids import random_hex
from gateway.request_head import new_request_id, valid_request_id


def test_ids_are_hex_of_the_asked_size_and_never_repeat_across_refills():
    # Several times the 2 KiB batch: refills in the middle of an id must not repeat or cut one.
    ids = [new_request_id() for _ in range(1000)] + [random_hex(8) for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:1000])
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids[1000:])
    assert len(set(ids)) == len(ids)
    assert all(valid_request_id(i) for i in ids[:1000])
    assert len(random_hex(3000)) == 6000            # larger than a batch


def test_a_forked_child_does_not_repeat_its_parents_next_ids():
    random_hex(1)                                   # the pool holds unused digits now
    assert random_ids._pool.digits
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: its next id, then exit at once
        try:
            os.write(w, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert new_request_id() != child
