"""A deadline per connection that costs a float store to move.

Every read and write of a request may set a new deadline, so a timer per operation (create,
cancel) would sit on the hot path. Here the timer is created once and fires at most every
``period`` seconds while a deadline is set; moving the deadline only stores a number. No deadline
is ever missed: the pending timer is never later than ``now + period`` and a new deadline is never
earlier than that (``period`` is the shortest timeout the owner uses).
"""
from __future__ import annotations

import asyncio
from typing import Callable


class Watchdog:
    __slots__ = ("loop", "period", "deadline", "handle", "on_expire")

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float, on_expire: Callable[[], None]):
        self.loop = loop
        self.period = period
        self.deadline: float | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.on_expire = on_expire

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now unless re-armed or disarmed first."""
        now = self.loop.time()
        deadline = self.deadline = now + seconds
        handle = self.handle
        if handle is None:
            self.handle = self.loop.call_at(now + min(seconds, self.period), self._fire)
        elif seconds < self.period and handle.when() > deadline:
            # Shorter than the owner said it would ever use (a reload lowered a limit).
            handle.cancel()
            self.handle = self.loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        self.deadline = None

    def close(self) -> None:
        self.deadline = None
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        deadline = self.deadline
        if deadline is None:
            return
        now = self.loop.time()
        if now >= deadline:
            self.deadline = None
            self.on_expire()
        else:
            self.handle = self.loop.call_at(min(deadline, now + self.period), self._fire)
