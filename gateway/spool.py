"""Read a body ahead of whoever consumes it, so a slow client never holds an upstream connection.

As nginx's ``proxy_request_buffering`` / ``proxy_buffering``: chunks go to memory up to
``memory`` bytes, then to an unlinked temporary file up to ``disk`` bytes; past both the source
is read only as fast as it is consumed (the upstream connection is held, as without buffering).

Two ways to use it:

- ``await spool.fill()`` reads the source until it ends or the buffers are full (a request body,
  before an upstream connection is taken); iterating then yields what was buffered and goes on
  reading the source directly.
- ``spool.start()`` reads the source in a task as fast as it delivers while the consumer iterates
  at its own pace (a response body: the upstream is released as soon as it has sent everything,
  while a slow client is still reading).

Either way the spool iterates like the body it wraps, including ``trailers`` once exhausted. An
exception from the source is raised to the consumer after the data that preceded it.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
from collections import deque
from typing import AsyncIterator, Callable

_READ = 262144


class Spool:
    __slots__ = ("_source", "_memory", "_disk", "_dir", "_chunks", "_mem_bytes", "_fd", "_file_read",
                 "_file_write", "_ended", "_error", "_task", "_data_ready", "_space_ready", "_on_end",
                 "trailers", "size")

    def __init__(self, source: AsyncIterator[bytes], memory: int, disk: int, directory: str | None,
                 on_end: Callable[[], None] | None = None):
        self._source = source.__aiter__()
        self._memory = memory
        self._disk = disk
        self._dir = directory
        self._chunks: deque[bytes] = deque()
        self._mem_bytes = 0
        self._fd = -1
        self._file_read = 0
        self._file_write = 0
        self._ended = False
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._data_ready: asyncio.Future | None = None
        self._space_ready: asyncio.Future | None = None
        self._on_end = on_end           # called once the source is exhausted (release the upstream)
        self.trailers = None
        self.size = 0                   # bytes read from the source so far

    @property
    def complete(self) -> bool:
        """The whole body is buffered (``size`` is its length)."""
        return self._ended and self._error is None

    # -- producer side ------------------------------------------------------------------------

    def _has_room(self) -> bool:
        if self._file_read < self._file_write:          # order: new data goes behind the file's
            return self._file_write < self._disk
        return self._mem_bytes < self._memory or self._disk > 0 and self._file_write < self._disk

    async def _pull(self) -> bool:
        """Move one chunk from the source into the buffers; False once the source is done."""
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            return False
        except asyncio.CancelledError:
            raise
        except BaseException as e:          # noqa: BLE001 — handed to the consumer in order
            self._finish(e)
            return False
        if chunk:
            self.size += len(chunk)
            if self._disk > 0 and (self._file_read < self._file_write or
                                   (self._mem_bytes >= self._memory and self._chunks)):
                self._to_file(chunk)
            else:
                self._chunks.append(chunk)
                self._mem_bytes += len(chunk)
            self._wake_consumer()
        return True

    def _to_file(self, chunk: bytes) -> None:
        if self._fd < 0:
            f = tempfile.TemporaryFile(dir=self._dir, prefix="wasmgate-spool-")
            self._fd = os.dup(f.fileno())
            f.close()
        os.pwrite(self._fd, chunk, self._file_write)
        self._file_write += len(chunk)

    def _finish(self, error: BaseException | None) -> None:
        self._ended = True
        self._error = error
        if error is None:
            self.trailers = getattr(self._source, "trailers", None)
        self._wake_consumer()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    async def fill(self) -> None:
        """Buffer until the source ends or memory and disk are full."""
        while not self._ended and self._has_room():
            await self._pull()

    def raise_failure(self) -> None:
        """Raise now what made the source fail while filling (before anything is sent on)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def start(self) -> None:
        """Read the source in a task, as fast as it delivers and as far as the buffers allow."""
        self._task = asyncio.ensure_future(self._produce())

    async def _produce(self) -> None:
        while not self._ended:
            if not self._has_room():
                self._space_ready = asyncio.get_running_loop().create_future()
                try:
                    await self._space_ready
                finally:
                    self._space_ready = None
                continue
            await self._pull()

    def _wake_consumer(self) -> None:
        fut = self._data_ready
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- consumer side ------------------------------------------------------------------------

    def __aiter__(self) -> "Spool":
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._mem_bytes -= len(chunk)
                self._wake_producer()
                return chunk
            if self._file_read < self._file_write:
                return self._from_file()
            if self._ended:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            if self._task is None:
                await self._pull()          # buffers drained: read the source directly
            else:
                self._data_ready = asyncio.get_running_loop().create_future()
                try:
                    await self._data_ready
                finally:
                    self._data_ready = None

    def _from_file(self) -> bytes:
        n = min(_READ, self._file_write - self._file_read)
        data = os.pread(self._fd, n, self._file_read)
        self._file_read += len(data)
        if self._file_read >= self._file_write:
            # Caught up: start the file over so it never grows past what is unread.
            self._file_read = self._file_write = 0
            os.ftruncate(self._fd, 0)
        self._wake_producer()
        return data

    def _wake_producer(self) -> None:
        fut = self._space_ready
        if fut is not None and not fut.done():
            fut.set_result(None)

    def close(self) -> None:
        """Stop reading the source and free the file; safe to call more than once."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._chunks.clear()
        self._mem_bytes = 0
