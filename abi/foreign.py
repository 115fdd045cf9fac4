"""Foreign functions (``proxy_call_foreign_function``, reference §1.2 #39): wasmgate's host
extensions. Envoy defines its own (``compress``, ``declare_property``, …); an unknown name
answers NOT_FOUND on every host, so a filter can probe for an extension and fall back.

``wasmgate.set_shared_data_ttl`` — ``proxy_set_shared_data`` with an expiry, so entries a
filter knows to be worthless after some time (a rate-limit bucket once it is full again) do not
fill ``shared_data.max_bytes`` for ever. Arguments, little-endian as the ABI::

    cas u32 | ttl_ns u64 | key_size u32 | key | value

Result: OK, and 4 bytes (u32 LE) holding the status of the write, as ``proxy_set_shared_data``
would return it: OK, CAS_MISMATCH or INTERNAL_FAILURE (no room). It is carried in the result
rather than as the call's status because the official Rust SDK panics on a CAS_MISMATCH from
``call_foreign_function``. BAD_ARGUMENT when the arguments are malformed. ``ttl_ns`` 0 deletes
the key (if the cas matches). Semantics of expiring entries: abi/shared_store.py.
"""
from __future__ import annotations

import struct
from typing import Callable

from .enums import Status
from .shared_store import SharedStore

SET_SHARED_DATA_TTL = "wasmgate.set_shared_data_ttl"
_SET_HEAD = struct.Struct("<IQI")
_STATUS = struct.Struct("<I")


def set_shared_data_ttl(store: SharedStore, args: bytes) -> tuple[int, bytes]:
    if len(args) < _SET_HEAD.size:
        return Status.BAD_ARGUMENT, b""
    cas, ttl_ns, key_size = _SET_HEAD.unpack_from(args)
    start = _SET_HEAD.size
    if start + key_size > len(args):
        return Status.BAD_ARGUMENT, b""
    key, value = args[start:start + key_size], args[start + key_size:]
    return Status.OK, _STATUS.pack(store.set(key, value, cas, ttl_ns))


FUNCTIONS: dict[str, Callable[[SharedStore, bytes], tuple[int, bytes]]] = {
    SET_SHARED_DATA_TTL: set_shared_data_ttl,
}


def call(store: SharedStore, name: str, args: bytes) -> tuple[int, bytes]:
    """(status of the call, result bytes) — NOT_FOUND for a name we do not define."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        return Status.NOT_FOUND, b""
    return fn(store, args)
