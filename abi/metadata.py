"""Route, cluster and node metadata as Envoy's ``getProperty`` serves them (reference §4.2-§4.3).

Envoy answers ``route_metadata``, ``cluster_metadata`` and ``node`` with protobuf messages
(``envoy.config.core.v3.Metadata`` / ``Node``) and walks further path segments into their
fields (``Context::getProperty``):

- a path that ends on a message (``route_metadata``, ``node``) gets the message's protobuf
  bytes (``SerializeToString``);
- ``filter_metadata`` is a map<string, Struct>, and a ``google.protobuf.Struct`` is a CEL map:
  a path ending on either gets the §4.1 pair serialization, values serialized recursively
  (``serializeValue``'s kMap; a ListValue is kList: items as keys, empty values);
- leaves as CEL sees a ``google.protobuf.Value``: a string → its UTF-8 bytes, a number →
  8-byte little-endian double (Struct numbers are always doubles, also ``3`` in the YAML),
  a bool → one byte.

The values are the plain ``dict``/``list``/``str``/``float``/``bool`` trees the gateway
validated (gateway/config.py); nothing here copies them until a filter asks.
"""
from __future__ import annotations

import struct
from typing import Any, Mapping, Sequence

from .pairs import serialize
from .protowire import length_delimited, varint

_DOUBLE = struct.Struct("<d")


class Walkable:
    """A property value a path can go on into (``index``) or end on (``encode``)."""

    def index(self, segment: bytes) -> Any:
        """The value under one more path segment, or None (NOT_FOUND)."""
        raise NotImplementedError

    def encode(self) -> bytes:
        raise NotImplementedError


class Struct(Walkable):
    """A google.protobuf.Struct (or the filter_metadata map): a CEL map, keys case-sensitive."""
    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, Any]):
        self.fields = fields

    def index(self, segment: bytes) -> Any:
        key = segment.decode("utf-8", "surrogateescape")
        return wrap(self.fields[key]) if key in self.fields else None

    def encode(self) -> bytes:
        return serialize([(k.encode(), value_bytes(v)) for k, v in self.fields.items()])


class ListValue(Walkable):
    """A google.protobuf.ListValue: a CEL list, indexed by decimal position."""
    __slots__ = ("items",)

    def __init__(self, items: Sequence[Any]):
        self.items = items

    def index(self, segment: bytes) -> Any:
        if not segment.isdigit():
            return None
        i = int(segment)
        return wrap(self.items[i]) if i < len(self.items) else None

    def encode(self) -> bytes:
        return serialize([(value_bytes(v), b"") for v in self.items])


def wrap(value: Any) -> Any:
    """A metadata value as a path step finds it: containers walkable, leaves as their bytes."""
    if isinstance(value, Mapping):
        return Struct(value)
    if isinstance(value, (list, tuple)):
        return ListValue(value)
    return value_bytes(value)


def value_bytes(value: Any) -> bytes:
    """serializeValue of a google.protobuf.Value as CEL sees it."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, (int, float)):
        return _DOUBLE.pack(float(value))
    if isinstance(value, Mapping):
        return Struct(value).encode()
    if isinstance(value, (list, tuple)):
        return ListValue(value).encode()
    raise TypeError(f"cannot encode a metadata value of type {type(value).__name__}")


class Metadata(Walkable):
    """envoy.config.core.v3.Metadata: ``filter_metadata`` (field 1) only."""
    __slots__ = ("filter_metadata",)

    def __init__(self, filter_metadata: Mapping[str, Mapping[str, Any]] | None):
        self.filter_metadata = filter_metadata or {}

    def index(self, segment: bytes) -> Any:
        return Struct(self.filter_metadata) if segment == b"filter_metadata" else None

    def encode(self) -> bytes:
        return b"".join(_field(1, _field(1, ns.encode()) + _field(2, _pb_struct(fields)))
                        for ns, fields in self.filter_metadata.items())


class Node(Walkable):
    """envoy.config.core.v3.Node: ``id`` (1), ``cluster`` (2), ``metadata`` (3, a Struct)."""
    __slots__ = ("id", "cluster", "metadata")

    def __init__(self, id: str = "", cluster: str = "", metadata: Mapping[str, Any] | None = None):
        self.id = id
        self.cluster = cluster
        self.metadata = metadata or {}

    def index(self, segment: bytes) -> Any:
        if segment == b"id":
            return self.id.encode()
        if segment == b"cluster":
            return self.cluster.encode()
        if segment == b"metadata":
            return Struct(self.metadata)
        return None

    def encode(self) -> bytes:
        # proto3: unset (empty) singular fields are not written.
        out = _field(1, self.id.encode()) if self.id else b""
        if self.cluster:
            out += _field(2, self.cluster.encode())
        if self.metadata:
            out += _field(3, _pb_struct(self.metadata))
        return out


# -- protobuf wire format (only what Struct, Metadata and Node need) ---------------------------

def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return length_delimited(varint(number << 3 | 2), payload)


def _pb_value(value: Any) -> bytes:
    # google.protobuf.Value: a oneof, so a set member is written even when it is 0 / "" / false.
    if isinstance(value, str):
        return _field(3, value.encode("utf-8", "surrogateescape"))
    if isinstance(value, bool):
        return bytes((4 << 3, 1 if value else 0))
    if isinstance(value, (int, float)):
        return bytes((2 << 3 | 1,)) + _DOUBLE.pack(float(value))
    if isinstance(value, Mapping):
        return _field(5, _pb_struct(value))
    if isinstance(value, (list, tuple)):
        return _field(6, b"".join(_field(1, _pb_value(v)) for v in value))
    raise TypeError(f"cannot encode a metadata value of type {type(value).__name__}")


def _pb_struct(fields: Mapping[str, Any]) -> bytes:
    # map<string, Value> fields = 1: one entry message per key, key (1) and value (2) both written.
    return b"".join(_field(1, _field(1, k.encode()) + _field(2, _pb_value(v))) for k, v in fields.items())
