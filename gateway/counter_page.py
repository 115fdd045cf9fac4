"""Named u64 counters in a memory-mapped file, so that they outlive the process that counts.

A worker process killed with SIGKILL loses everything in its own memory, but not what it wrote
into a shared file mapping: the kernel keeps those pages (tmpfs, /dev/shm), and the worker
restarted in the same slot maps the same file and counts on. So the request path increments its
counters *in* the mapping — one aligned 8-byte store each, about as cheap as a dict increment —
and /metrics reads every worker's file. prometheus_client's multiprocess mode keeps its values
in per-process mmap'ed files for the same reason.

Layout (little-endian)::

    [0:8]   magic b"WGCOUNT1"
    [8:16]  used: end of the last committed record (u64)
    [64:]   records, each 8-byte aligned:
            u32 key length, u32 number of values, msgpack key (padded to 8), values (u64 each)

A record is written in full before ``used`` moves past it (one 8-byte store), so a reader — or
the successor of a writer killed half-way — never sees a half-written record. One writer per
file (its worker slot); any number of readers.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import msgpack

log = logging.getLogger("wasmgate.metrics")

MAGIC = b"WGCOUNT1"
HEADER = 64
INITIAL_BYTES = 64 * 1024
_USED = 1                                   # index of ``used`` in the u64 view
_REC = struct.Struct("<II")

Key = tuple[Any, ...]


class CounterPage:
    """Counters of one writer: in ``path`` (created or continued), or in private memory (None)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._fd = -1
        if self.path is None:
            self._mm = mmap.mmap(-1, INITIAL_BYTES)
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            size = max(os.fstat(self._fd).st_size, INITIAL_BYTES)
            # Back every page now: writing to a mapped page tmpfs cannot back is a SIGBUS.
            os.posix_fallocate(self._fd, 0, size)
            self._mm = mmap.mmap(self._fd, size)
        self.values = memoryview(self._mm).cast("Q")
        self._index: dict[Key, int] = {}
        if self._mm[:8] != MAGIC:
            self.values[_USED] = HEADER
            self._mm[:8] = MAGIC
        for key, base, _n in _records(self._mm, self.values):
            self._index[key] = base

    def slot(self, key: Key, n: int = 1) -> int:
        """Index in ``values`` of the first of ``key``'s ``n`` counters (created at 0 if new).

        ``values`` may be replaced by a larger mapping here: fetch it after calling this."""
        base = self._index.get(key)
        if base is not None:
            return base
        packed = msgpack.packb(list(key))
        at = self.values[_USED]
        start = at + _REC.size + _pad8(len(packed))
        end = start + 8 * n
        if end > len(self._mm):
            self._grow(end)
        _REC.pack_into(self._mm, at, len(packed), n)
        self._mm[at + _REC.size:at + _REC.size + len(packed)] = packed
        self._mm[start:end] = bytes(end - start)     # a killed predecessor may have left bytes here
        self.values[_USED] = end                     # commit
        self._index[key] = start // 8
        return start // 8

    def items(self) -> Iterator[tuple[Key, list[int]]]:
        """Every key with its values, as now."""
        for key, base, n in _records(self._mm, self.values):
            yield key, list(self.values[base:base + n])

    def _grow(self, need: int) -> None:
        size = len(self._mm)
        while size < need:
            size *= 2
        self.values.release()
        try:
            if self._fd >= 0:
                os.posix_fallocate(self._fd, 0, size)
            self._mm.resize(size)
        except OSError as e:
            # The file cannot grow (tmpfs full): keep counting in private memory. This worker's
            # /metrics stays right; its siblings see its file as it was until now.
            log.error("counters file %s cannot grow to %d bytes (%s); counting in process memory "
                      "from now on: a restart of this worker will lose them", self.path, size, e)
            private = mmap.mmap(-1, size)
            private[:len(self._mm)] = self._mm
            self._mm.close()
            self._mm, self.path = private, None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self.values = memoryview(self._mm).cast("Q")

    def close(self) -> None:
        self.values.release()
        self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_page(path: str | os.PathLike) -> list[tuple[Key, list[int]]]:
    """Another process's counters (empty if its file does not exist yet)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size
        if size < HEADER:
            return []
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            if mm[:8] != MAGIC:
                return []
            values = memoryview(mm).cast("Q")
            try:
                # Aligned 8-byte loads: a counter being incremented reads as before or after.
                return [(key, list(values[base:base + n])) for key, base, n in _records(mm, values)]
            finally:
                values.release()
    finally:
        os.close(fd)


def _records(mm: mmap.mmap, values: memoryview) -> Iterator[tuple[Key, int, int]]:
    """(key, index of its first value, number of values) of every committed record."""
    used = min(values[_USED], len(mm))             # grown since mapped: the rest next time
    at = HEADER
    while at + _REC.size <= used:
        klen, n = _REC.unpack_from(mm, at)
        start = at + _REC.size + _pad8(klen)
        end = start + 8 * n
        if end > used:
            return
        try:
            key = tuple(msgpack.unpackb(mm[at + _REC.size:at + _REC.size + klen]))
        except (ValueError, msgpack.UnpackException):
            return                                  # not (yet) visible to this reader
        yield key, start // 8, n
        at = end


def _pad8(n: int) -> int:
    return (n + 7) & ~7
