"""Header maps and body buffers as the guest sees them (reference §4.1, §5.8).

Both are lazy: a header map serializes only when the guest asks for all pairs, a body
buffer joins its chunks only when the guest reads or rewrites it.
"""
from __future__ import annotations

import re
from operator import itemgetter

from .engine import HeaderMapCore
from .enums import Status
from .limits import MAX_HEADER_MAP_BYTES
from .pairs import serialize_str, to_bytes, to_str


_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9a-z]+")
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


GOOD_NAMES: set[str] = set()        # names that passed _NAME (filters set the same few)
_GOOD_NAMES_MAX = 4096


def valid_header(name: str, value: str) -> bool:
    """A lower-cased name that is an HTTP token (or a pseudo-header) and a value without
    control characters: what a filter sets must not be able to split a message on the wire."""
    if name not in GOOD_NAMES:
        if _NAME.fullmatch(name) is None:
            return False
        if len(GOOD_NAMES) >= _GOOD_NAMES_MAX:
            GOOD_NAMES.clear()
        GOOD_NAMES.add(name)
    return BAD_VALUE.search(value) is None


def lower_key(key: bytes) -> str:
    # Envoy lower-cases header names (LowerCaseString: ASCII only).
    return to_str(key.lower())


def _entry(name: str, value: str) -> int:
    return len(name) + len(value) + 10          # as serialized (§4.1): two sizes, two NULs


# The names of a map as a list, built in C: searching it (in, index, count) is C too, where a
# Python loop over the pairs costs ~1 µs for a 12-header request (replace runs for every edit).
_name = itemgetter(0)


class _HeaderMapFields:
    """What a HeaderMap is built with. _crossing.c's HeaderMapCore does the same in C (no Python
    frame, twice per request): this is the reference, and the base without it."""
    __slots__ = ("items", "_ser", "unsafe", "grown")

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        self._ser: bytes | None = None
        self.unsafe = False
        self.grown = 0


class HeaderMap(HeaderMapCore or _HeaderMapFields):    # type: ignore[misc]
    """Ordered (name, value) pairs with lower-case names; serialization cached.

    ``unsafe`` is set when a filter stored a header that must not reach the wire (CR/LF...);
    Envoy answers OK to such edits, so we do too and drop those entries in ``wire()``.
    ``grown``: serialized bytes the filters' edits added (net); add/replace/set_all refuse an
    edit (return False) that would take it past MAX_HEADER_MAP_BYTES. Counting what filters
    add, not the map's size, keeps a big request from a client from tripping a filter's edit.
    """
    __slots__ = ()                  # items, _ser, unsafe, grown: the base's

    def wire(self) -> list[tuple[str, str]]:
        """The items safe to send (all of them unless a filter stored an invalid header)."""
        if not self.unsafe:
            return self.items
        return [(k, v) for k, v in self.items if valid_header(k, v)]

    def __len__(self) -> int:
        return len(self.items)

    def serialized(self) -> bytes:
        ser = self._ser
        if ser is None:
            ser = self._ser = serialize_str(self.items)
        return ser

    def get(self, name: str) -> str | None:
        items = self.items
        names = list(map(_name, items))
        if name in names:
            return items[names.index(name)][1]
        return None

    def add(self, name: str, value: str) -> bool:
        grown = self.grown + len(name) + len(value) + 10       # _entry, inlined (hot path)
        if grown > MAX_HEADER_MAP_BYTES:
            return False
        self.grown = grown
        self._ser = None
        self.items.append((name, value))
        return True

    def replace(self, name: str, value: str) -> bool:
        """Envoy setCopy: the first occurrence takes the value, later ones go."""
        items = self.items
        names = list(map(_name, items))
        count = names.count(name)
        if count == 0:                   # a new header: most edits
            grown = self.grown + len(name) + len(value) + 10       # _entry, inlined
            if grown > MAX_HEADER_MAP_BYTES:
                return False
            self.grown = grown
            self._ser = None
            items.append((name, value))
            return True
        first = names.index(name)
        dropped = 0                      # serialized bytes of the later occurrences
        if count > 1:
            dropped = sum(_entry(k, v) for k, v in items[first + 1:] if k == name)
        delta = len(value) - len(items[first][1]) - dropped
        if delta > 0 and self.grown + delta > MAX_HEADER_MAP_BYTES:
            return False
        self.grown += delta
        self._ser = None
        if dropped:
            items[:] = [kv for j, kv in enumerate(items) if j <= first or kv[0] != name]
        items[first] = (name, value)
        return True

    def remove(self, name: str) -> None:
        items = self.items
        for kv in items:
            if kv[0] == name:
                self._ser = None
                self.grown -= sum(_entry(k, v) for k, v in items if k == name)
                items[:] = [kv for kv in items if kv[0] != name]
                return

    def set_all(self, pairs: list[tuple[str, str]]) -> bool:
        # The whole map now comes from the filter. (A serialized map the host accepts is at
        # most pairs.MAX_BYTES, the same bound, so this refuses nothing today.)
        size = sum(_entry(k, v) for k, v in pairs)
        if size > MAX_HEADER_MAP_BYTES:
            return False
        self.grown = size
        self._ser = None
        self.items[:] = pairs
        return True


class BodyBuffer:
    """Chunks buffered at one filter; joined only on demand.

    ``limit``: the most bytes a filter may grow it to with set_buffer_bytes (None: no limit,
    for buffers the host fills itself)."""
    __slots__ = ("chunks", "size", "writable", "limit", "edited")

    def __init__(self, writable: bool = True, data: bytes | None = None, limit: int | None = None):
        self.chunks: list[bytes] = [data] if data else []
        self.size = len(data) if data else 0
        self.writable = writable
        self.limit = limit
        self.edited = False         # a filter rewrote it (the per-request trace's m=b)

    def size_after_write(self, start: int, size: int, n: int) -> int:
        """The size write(start, size, <n bytes>) would leave (its own size when it is refused)."""
        if start == 0:
            return n + max(self.size - size, 0)
        return self.size + n if start >= self.size else self.size

    def append(self, chunk: bytes) -> None:
        if chunk:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def data(self) -> bytes:
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return b""
        joined = b"".join(chunks)
        self.chunks = [joined]
        return joined

    def take(self) -> bytes:
        data = self.data()
        self.chunks = []
        self.size = 0
        return data

    def read(self, start: int, max_size: int) -> bytes:
        if start >= self.size:
            return b""
        return self.data()[start:start + max_size]

    def write(self, start: int, size: int, data: bytes) -> int:
        """Envoy Buffer semantics: start 0 drains `size` bytes then prepends; start >= len
        appends; anything else is BAD_ARGUMENT."""
        if not self.writable:
            return Status.BAD_ARGUMENT
        self.edited = True
        if start == 0:
            rest = self.data()[size:]
            new = data + rest
        elif start >= self.size:
            new = self.data() + data
        else:
            return Status.BAD_ARGUMENT
        self.chunks = [new] if new else []
        self.size = len(new)
        return Status.OK


def header_bytes(items: list[tuple[str, str]]) -> int:
    return sum(len(to_bytes(k)) + len(to_bytes(v)) for k, v in items)
