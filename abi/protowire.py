"""The two pieces of protobuf's wire format our hand-written encoders share: a varint and a
length-delimited field. Used by abi/metadata.py (Envoy's metadata/node properties) and, through
abi/api.py, by gateway/otlp_wire.py (OTLP spans, on the request path: hence the fast paths)."""
from __future__ import annotations

_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    """A non-negative int as a base-128 varint."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): its encoded tag, the length, the payload."""
    return tag + varint(len(payload)) + payload
