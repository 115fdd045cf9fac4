"""Header-map (de)serialization, reference §4.1 (cpp-host pairs_util.cc).

Layout: u32 N, N x (u32 key_len, u32 value_len), N x (key, NUL, value, NUL).
An empty map serializes to b"" so the host hands (0, 0) to the guest, never the
1-byte form that the Rust SDK cannot parse.
"""
from __future__ import annotations

import struct
from itertools import chain

from .engine import serialize_pairs as _c_serialize    # None without the C build

MAX_BYTES = 1 << 20        # cpp-host PROXY_WASM_HOST_PAIRS_MAX_BYTES
MAX_COUNT = 1024           # cpp-host PROXY_WASM_HOST_PAIRS_MAX_COUNT

_U32 = struct.Struct("<I")


def to_bytes(s: str) -> bytes:
    # Headers cross the seam as latin-1 str (one char per wire byte, as the gateway's HTTP/1
    # codec decodes them), so obs-text bytes reach the filter unchanged.
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:           # a str that did not come off the wire
        return s.encode("utf-8", "surrogateescape")


def to_str(b: bytes) -> str:
    return b.decode("latin-1")


def to_text(b: bytes) -> str:
    """Names the filter chooses (clusters, queues, metrics): UTF-8, lossless."""
    return b.decode("utf-8", "surrogateescape")


def serialize(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Serialize byte pairs; an empty list gives b""."""
    n = len(pairs)
    if n == 0:
        return b""
    sizes = []
    data = []
    for k, v in pairs:
        sizes.append(len(k))
        sizes.append(len(v))
        data.append(k)
        data.append(v)
    head = struct.pack(f"<{2 * n + 1}I", n, *sizes)
    return head + b"\0".join(data) + b"\0"


def serialize_str(pairs: list[tuple[str, str]]) -> bytes:
    """serialize() of the latin-1 bytes of each str: in C when built (abi/engine/_crossing.c
    serialize_pairs, ~10x faster), else _serialize_str."""
    if _c_serialize is not None:
        data = _c_serialize(pairs)
        if data is not None:
            return data
    return _serialize_str(pairs)


def _serialize_str(pairs: list[tuple[str, str]]) -> bytes:
    """One join and one encode for the whole map (a str's length is its latin-1 byte count),
    not two encodes per header; a str outside latin-1 goes through to_bytes."""
    n = len(pairs)
    if n == 0:
        return b""
    flat = list(chain.from_iterable(pairs))
    try:
        data = "\0".join(flat).encode("latin-1")
    except UnicodeEncodeError:           # a str that did not come off the wire: see to_bytes
        return serialize([(to_bytes(k), to_bytes(v)) for k, v in pairs])
    head = _HEADS.get(n)
    if head is None:
        head = struct.Struct(f"<{2 * n + 1}I")
        if n <= _HEADS_MAX:
            _HEADS[n] = head
    return head.pack(n, *map(len, flat)) + data + b"\0"


# The header of a serialized map of n pairs, by n (maps of up to _HEADS_MAX pairs).
_HEADS: dict[int, struct.Struct] = {}
_HEADS_MAX = 128


def deserialize(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Parse a serialized map; None when malformed (same checks as cpp-host toPairs)."""
    size = len(data)
    if size == 0:
        return []
    if size < 4 or size > MAX_BYTES:
        return None
    n = _U32.unpack_from(data, 0)[0]
    if n > MAX_COUNT:
        return None
    pos = 4 + 8 * n
    if pos > size:
        return None
    sizes = struct.unpack_from(f"<{2 * n}I", data, 4)
    out = []
    for i in range(n):
        klen, vlen = sizes[2 * i], sizes[2 * i + 1]
        kend = pos + klen
        vstart = kend + 1
        vend = vstart + vlen
        if vend + 1 > size or data[kend] != 0 or data[vend] != 0:
            return None
        out.append((data[pos:kend], data[vstart:vend]))
        pos = vend + 1
    if pos != size:
        return None
    return out


def deserialize_str(data: bytes) -> list[tuple[str, str]] | None:
    pairs = deserialize(data)
    if pairs is None:
        return None
    return [(to_str(k), to_str(v)) for k, v in pairs]
