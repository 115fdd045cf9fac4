"""The OTLP protobuf encoding of our spans (``ExportTraceServiceRequest``), written directly.

The OpenTelemetry SDK's encoder (``encode_spans``) builds a protobuf message object per span,
attribute and value from ``ReadableSpan`` objects: 25–45 µs per span here, which alone is more
than the 15 % of a request's CPU the issue allows OTLP export (``python -m bench.otel_cost``).
Our spans have one fixed shape (a few fixed fields, string/int attributes), so they are written
as the wire format's bytes: fixed fields by ``struct``, and a child span's name, kind and
attributes — the same for every request of a (filter, phase, action, calls) — encoded once and
reused. tests/gateway/test_otlp_export.py checks the bytes parse to exactly what the SDK's encoder
makes of the same spans.

Field numbers: opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto,
collector/trace/v1/trace_service.proto (opentelemetry-proto 1.x).
"""
from __future__ import annotations

import struct
from typing import Iterable, Union

from abi.api import length_delimited, varint

Value = Union[str, bool, int, float]

# Span.flags (field 16): the SDK's SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE / _IS_REMOTE bits.
FLAGS_LOCAL_PARENT = 0x100
FLAGS_REMOTE_PARENT = 0x300
KIND_INTERNAL = 1
KIND_SERVER = 2
_STATUS_ERROR = 2
_TIMES = struct.Struct("<BQBQ")           # Span.start_time_unix_nano (7), end (8): fixed64
_FLAGS = struct.Struct("<2sI")           # Span.flags (16): fixed32
_FLAGS_TAG = b"\x85\x01"
_DOUBLE = struct.Struct("<d")
_CACHE_MAX = 4096                        # entries of each of Encoder's caches


_field = length_delimited                # tag (pre-encoded bytes), length, payload


def _any_value(v: Value) -> bytes:
    if isinstance(v, str):
        return _field(b"\x0a", v.encode())
    if isinstance(v, bool):                                    # before int: bool is an int
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + varint(v & 0xFFFFFFFFFFFFFFFF)       # int64: two's complement
    return b"\x21" + _DOUBLE.pack(v)


def key_value(key: str, v: Value) -> bytes:
    """One ``KeyValue`` message (without the tag of the field holding it)."""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(v))


def attributes(attrs: Iterable[tuple[str, Value]]) -> bytes:
    """Span.attributes (field 9) entries."""
    return b"".join(_field(b"\x4a", key_value(k, v)) for k, v in attrs)


def status_error(message: str | None) -> bytes:
    """Span.status (field 15) with code ERROR and an optional message."""
    body = (_field(b"\x12", message.encode()) if message else b"") + b"\x18" + varint(_STATUS_ERROR)
    return _field(b"\x7a", body)


def span(trace_id: bytes, span_id: bytes, state: str | None, parent_id: bytes, name_kind: bytes,
         start: int, end: int, attrs: bytes, status: bytes, flags: int) -> bytes:
    """One ``Span`` message. ``name_kind``: the name (5) and kind (6) fields (``name_and_kind``);
    ``attrs``/``status``: as ``attributes``/``status_error`` make them (b"" when none)."""
    return b"".join((
        b"\x0a\x10", trace_id, b"\x12\x08", span_id,
        _field(b"\x1a", state.encode()) if state else b"",
        b"\x22\x08" + parent_id if parent_id else b"",
        name_kind, _TIMES.pack(0x39, start, 0x41, end), attrs, status, _FLAGS.pack(_FLAGS_TAG, flags)))


def child_span(head: bytes, span_id: bytes, parent: bytes, parts: tuple[bytes, bytes], start: int, end: int
               ) -> bytes:
    """``span`` for an INTERNAL child, from the pieces its request's spans share: ``head`` =
    ``child_head(trace_id)``, ``parent`` = ``parent_field(the request span's id)``, ``parts`` =
    ``Encoder.child_parts``."""
    return b"".join((head, span_id, parent, parts[0], _TIMES.pack(0x39, start, 0x41, end), parts[1]))


def child_head(trace_id: bytes) -> bytes:
    return b"\x0a\x10" + trace_id + b"\x12\x08"


def parent_field(parent_id: bytes) -> bytes:
    return b"\x22\x08" + parent_id


def name_and_kind(name: str, kind: int) -> bytes:
    return _field(b"\x2a", name.encode()) + b"\x30" + varint(kind)


def attribute_key(key: str) -> bytes:
    """The key field of a ``KeyValue``, for ``string_attribute``."""
    return _field(b"\x0a", key.encode())


def string_attribute(key_field: bytes, value: str) -> bytes:
    """One Span.attributes entry with a string value; ``key_field`` from ``attribute_key``."""
    b = value.encode()
    any_value = b"\x0a" + varint(len(b)) + b
    kv = key_field + b"\x12" + varint(len(any_value)) + any_value
    return b"\x4a" + varint(len(kv)) + kv


class Encoder:
    """Makes ``ExportTraceServiceRequest`` bodies for one resource and instrumentation scope,
    and keeps what recurs from request to request encoded (bounded)."""

    def __init__(self, resource: Iterable[tuple[str, Value]], scope_name: str, scope_version: str = ""):
        self.resource = _field(b"\x0a", b"".join(_field(b"\x0a", key_value(k, v)) for k, v in resource))
        scope = _field(b"\x0a", scope_name.encode()) + (_field(b"\x12", scope_version.encode())
                                                        if scope_version else b"")
        self.scope = _field(b"\x0a", scope)
        self.children: dict[tuple, tuple[bytes, bytes]] = {}
        self._attrs: dict[tuple, bytes] = {}

    def child_parts(self, key: tuple, name: str, attrs: list[tuple[str, Value]], error: bool
                    ) -> tuple[bytes, bytes]:
        """What ``child_span`` writes before and after the times of an INTERNAL span with a local
        parent: (name+kind, attributes+status+flags), encoded and kept under ``key`` (look in
        ``children`` first: this is the miss)."""
        parts = (name_and_kind(name, KIND_INTERNAL), attributes(attrs) + (status_error(None) if error else b"")
                 + _FLAGS.pack(_FLAGS_TAG, FLAGS_LOCAL_PARENT))
        if len(self.children) >= _CACHE_MAX:
            self.children.clear()
        self.children[key] = parts
        return parts

    def attributes(self, attrs: tuple[tuple[str, Value], ...]) -> bytes:
        """``attributes(attrs)``, kept: for the attributes most requests share (method, route...)."""
        b = self._attrs.get(attrs)
        if b is None:
            b = attributes(attrs)
            if len(self._attrs) >= _CACHE_MAX:
                self._attrs.clear()
            self._attrs[attrs] = b
        return b

    def request(self, spans: list[bytes]) -> bytes:
        """The body of one export: every span under this encoder's resource and scope."""
        scope_spans = self.scope + b"".join(b"\x12" + varint(len(s)) + s for s in spans)
        resource_spans = self.resource + _field(b"\x12", scope_spans)
        return _field(b"\x0a", resource_spans)
