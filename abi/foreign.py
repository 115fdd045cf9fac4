"""Foreign functions (``proxy_call_foreign_function``, reference §1.2 #39): the ones Envoy
registers that filters call (``compress``, ``uncompress``, ``clear_route_cache``, as Envoy's
``source/extensions/common/wasm/foreign.cc``) and wasmgate's own host extension. An unknown
name answers NOT_FOUND on every host, so a filter can probe for an extension and fall back.

``compress`` — zlib's ``compress()`` of the arguments (zlib format, Z_DEFAULT_COMPRESSION,
15-bit window, default memLevel and strategy: what Python's ``zlib.compress(data)`` does with
the same zlib). ``uncompress`` — zlib's ``uncompress()``: one zlib stream, bytes after its end
ignored; a truncated or corrupt stream (and empty arguments) answers SERIALIZATION_FAILURE as
on Envoy. Output the filter's memory could not hold (over its ``memory_bytes``) answers
INTERNAL_FAILURE (Envoy doubles its buffer until the allocation fails).

``clear_route_cache`` — the request is to be re-matched against the routes after the current
phase (Envoy: ``clearRouteCache()``): sets ``route_cache_cleared`` on the request's chain
(abi/chain.py), which the gateway's re-routing reads. OK; outside a request a no-op.

``wasmgate.set_shared_data_ttl`` — ``proxy_set_shared_data`` with an expiry, so entries a
filter knows to be worthless after some time (a rate-limit bucket once it is full again) do not
fill ``shared_data.max_bytes`` for ever. Arguments, little-endian as the ABI::

    cas u32 | ttl_ns u64 | key_size u32 | key | value

Result: OK, and 4 bytes (u32 LE) holding the status of the write, as ``proxy_set_shared_data``
would return it: OK, CAS_MISMATCH or INTERNAL_FAILURE (no room). It is carried in the result
rather than as the call's status because the official Rust SDK panics on a CAS_MISMATCH from
``call_foreign_function``. BAD_ARGUMENT when the arguments are malformed. ``ttl_ns`` 0 deletes
the key (if the cas matches). Semantics of expiring entries: abi/shared_store.py. It writes
shared data, so a filter needs capability ``shared_data`` as well as ``foreign_functions``;
without it the result holds INTERNAL_FAILURE, what a denied ``proxy_set_shared_data`` answers.
"""
from __future__ import annotations

import struct
import zlib
from typing import Callable

from . import capabilities
from .enums import Status
from .context import FilterView

SET_SHARED_DATA_TTL = "wasmgate.set_shared_data_ttl"
# Foreign functions that do another capability group's work: granted only with that group as
# well as "foreign_functions", or ``foreign_functions`` alone would reopen what the group
# closes. Each checks its group itself; abi/filter.py links no C shortcut past the check for a
# filter that lacks one.
GROUPS: dict[str, str] = {SET_SHARED_DATA_TTL: "shared_data"}
_SET_HEAD = struct.Struct("<IQI")
_STATUS = struct.Struct("<I")
_TTL_GROUP = GROUPS[SET_SHARED_DATA_TTL]


def set_shared_data_ttl(f: FilterView, args: bytes) -> tuple[int, bytes]:
    if not capabilities.grants(f.spec.capabilities, _TTL_GROUP):
        f.capability_denied(SET_SHARED_DATA_TTL, _TTL_GROUP)
        return Status.OK, _STATUS.pack(Status.INTERNAL_FAILURE)
    if len(args) < _SET_HEAD.size:
        return Status.BAD_ARGUMENT, b""
    cas, ttl_ns, key_size = _SET_HEAD.unpack_from(args)
    start = _SET_HEAD.size
    if start + key_size > len(args):
        return Status.BAD_ARGUMENT, b""
    key, value = args[start:start + key_size], args[start + key_size:]
    return Status.OK, _STATUS.pack(f.store.set(key, value, cas, ttl_ns))


def compress(f: FilterView, args: bytes) -> tuple[int, bytes]:
    return Status.OK, zlib.compress(args)       # zlib's compress(): Z_DEFAULT_COMPRESSION


def uncompress(f: FilterView, args: bytes) -> tuple[int, bytes]:
    limit = f.spec.limits.memory_bytes
    d = zlib.decompressobj()
    try:
        out = d.decompress(args, limit + 1)
    except zlib.error:
        return Status.SERIALIZATION_FAILURE, b""
    if len(out) > limit:
        return Status.INTERNAL_FAILURE, b""
    if not d.eof:                               # zlib's uncompress(): Z_DATA_ERROR
        return Status.SERIALIZATION_FAILURE, b""
    return Status.OK, out


def clear_route_cache(f: FilterView, args: bytes) -> tuple[int, bytes]:
    f.ctx().clear_route_cache()
    return Status.OK, b""


FUNCTIONS: dict[str, Callable[[FilterView, bytes], tuple[int, bytes]]] = {
    "compress": compress,
    "uncompress": uncompress,
    "clear_route_cache": clear_route_cache,
    SET_SHARED_DATA_TTL: set_shared_data_ttl,
}


_BY_NAME = {name.encode(): fn for name, fn in FUNCTIONS.items()}


def call(f: FilterView, name: bytes, args: bytes) -> tuple[int, bytes]:
    """(status of the call, result bytes) — NOT_FOUND for a name we do not define. ``name``:
    the bytes the guest sent (a name matches when they are its UTF-8)."""
    fn = _BY_NAME.get(name)
    if fn is None:
        return Status.NOT_FOUND, b""
    return fn(f, args)
