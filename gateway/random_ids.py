"""Random ids (request ids, W3C trace and span ids): bits from the OS CSPRNG, as unpredictable
as one ``os.urandom`` per id, but drawn 2 KiB at a time — one getrandom syscall every ~50
requests instead of three per request (request id, trace id, span id)."""
from __future__ import annotations

import os

_BATCH = 2048                       # random bytes per syscall


class _Pool:
    __slots__ = ("digits", "pos")

    def __init__(self) -> None:
        self.digits = ""            # hex digits not handed out yet start at ``pos``
        self.pos = 0

    def reset(self) -> None:
        self.digits, self.pos = "", 0


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.reset)    # a forked child never repeats its parent's ids


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as 2 * nbytes lower-case hex digits (never reused)."""
    pool = _pool
    n = 2 * nbytes
    pos = pool.pos
    end = pos + n
    if end > len(pool.digits):
        pool.digits = os.urandom(max(_BATCH, nbytes)).hex()
        pos, end = 0, n
    pool.pos = end
    return pool.digits[pos:end]
