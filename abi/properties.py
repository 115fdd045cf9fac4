"""Properties (reference §4.2-§4.4) answered from a request's facts, in Envoy's encoding.

A path is NUL-joined segments. The first one or two segments name an attribute; further
segments index into a map (header name) or a list (decimal index). Values are encoded as
Envoy's ``serializeValue``: strings raw, int/uint/double/timestamp/duration as 8 bytes LE,
bool as 1 byte, maps/lists in the header-map pair layout, messages (route/cluster metadata,
node) as protobuf bytes (metadata.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from .seam import LogInfo, StreamInfo, TlsFacts
from .buffers import HeaderMap
from .limits import MAX_PROPERTY_BYTES
from .metadata import Metadata, Node, Walkable
from .pairs import serialize, to_bytes


class Uint(int):
    """An unsigned CEL value (encoded as u64)."""


class Timestamp(int):
    """Nanoseconds since the Unix epoch."""


class Duration(int):
    """Nanoseconds."""


class StreamFacts(Protocol):
    """What a stream offers to properties (the chain implements it)."""
    info: StreamInfo | None
    request_headers: HeaderMap | None
    response_headers: HeaderMap | None
    log: LogInfo | None
    custom: "CustomProperties"


class CustomProperties(dict):
    """proxy_set_property values (path → value) and their size in bytes (``nbytes``)."""
    nbytes = 0


@dataclass
class RootFacts:
    """A root context has no stream: only its own proxy_set_property values."""
    info: StreamInfo | None = None
    request_headers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    log: LogInfo | None = None
    custom: CustomProperties = field(default_factory=CustomProperties)


@dataclass
class PropertySource:
    """What one context can see: its filter's name and its stream's facts.

    For a stream, ``facts.custom`` (proxy_set_property values) is shared by the chain's
    filters, like Envoy's per-stream filter state.
    """
    plugin_name: str
    facts: StreamFacts
    root_id: str = ""
    vm_id: str = ""
    owner: Any = None           # the Filter: its services carry the gateway's node (node.*)


def encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return to_bytes(value)
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, Uint):
        return struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, int):
        return struct.pack("<q", value)
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, dict):
        return serialize([(encode(k), encode(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return serialize([(encode(v), b"") for v in value])
    raise TypeError(f"cannot encode property value of type {type(value).__name__}")


def _headers_map(h: HeaderMap | None) -> dict[str, str] | None:
    # Envoy: lower-case names, repeated headers joined with ",".
    if h is None:
        return None
    out: dict[str, str] = {}
    for k, v in h.items:
        out[k] = out[k] + "," + v if k in out else v
    return out


def _req(name: str) -> Callable[[PropertySource], Any]:
    def get(src: PropertySource) -> Any:
        return src.facts.request_headers.get(name) if src.facts.request_headers is not None else None
    return get


def _request_id(facts: StreamFacts) -> str | None:
    # Envoy's x-request-id, else the id the gateway gave the request.
    h = facts.request_headers
    return (h.get("x-request-id") if h is not None else None) or \
        (facts.info.request_id if facts.info is not None else None)


def _url(src: PropertySource):
    path = _req(":path")(src)
    return None if path is None else urlsplit(path)


def _addr(a: tuple[str, int]) -> str:
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _info(fn: Callable[[StreamInfo], Any]) -> Callable[[PropertySource], Any]:
    return lambda src: fn(src.facts.info) if src.facts.info is not None else None


def _tls(fn: Callable[[TlsFacts], Any]) -> Callable[[PropertySource], Any]:
    # Found only on a TLS connection (Envoy: the connection's ssl info), else NOT_FOUND.
    return lambda src: fn(src.facts.info.tls) if src.facts.info is not None and src.facts.info.tls is not None \
        else None


def _log(fn: Callable[[LogInfo], Any]) -> Callable[[PropertySource], Any]:
    return lambda src: fn(src.facts.log) if src.facts.log is not None else None


def _node(src: PropertySource) -> Node:
    # Envoy always has a node (LocalInfo); without `node:` in the config its fields are empty.
    info = getattr(getattr(src.owner, "services", None), "node", None)
    return Node() if info is None else Node(info.id, info.cluster, info.metadata)


def _response_code(src: PropertySource) -> Any:
    if src.facts.log is not None and src.facts.log.status:
        return src.facts.log.status
    h = src.facts.response_headers
    status = h.get(":status") if h is not None else None
    return int(status) if status and status.isdigit() else None


_ATTRIBUTES: dict[tuple[str, ...], Callable[[PropertySource], Any]] = {
    ("request", "path"): _req(":path"),
    ("request", "url_path"): lambda s: (u.path if (u := _url(s)) is not None else None),
    ("request", "query"): lambda s: (u.query if (u := _url(s)) is not None else None),
    ("request", "host"): _req(":authority"),
    ("request", "scheme"): _req(":scheme"),
    ("request", "method"): _req(":method"),
    ("request", "headers"): lambda s: _headers_map(s.facts.request_headers),
    ("request", "referer"): _req("referer"),
    ("request", "useragent"): _req("user-agent"),
    ("request", "id"): lambda s: _request_id(s.facts),
    ("request", "protocol"): _info(lambda i: i.protocol),
    ("request", "time"): _info(lambda i: Timestamp(i.start_time_ns)),
    ("request", "duration"): _log(lambda l: Duration(l.duration_ns)),
    ("request", "size"): _log(lambda l: l.bytes_in),
    ("request", "total_size"): _log(lambda l: l.bytes_in),
    ("response", "code"): _response_code,
    ("response", "headers"): lambda s: _headers_map(s.facts.response_headers),
    ("response", "size"): _log(lambda l: l.bytes_out),
    ("response", "total_size"): _log(lambda l: l.bytes_out),
    ("response", "flags"): _log(lambda l: 0),
    ("source", "address"): _info(lambda i: _addr(i.client_addr)),
    ("source", "port"): _info(lambda i: i.client_addr[1]),
    ("destination", "address"): _info(lambda i: _addr(i.local_addr)),
    ("destination", "port"): _info(lambda i: i.local_addr[1]),
    ("connection", "id"): _info(lambda i: Uint(i.connection_id)),
    # Envoy answers mtls and requested_server_name on plain connections too (false, "").
    ("connection", "mtls"): _info(lambda i: i.tls is not None and i.tls.mtls),
    ("connection", "requested_server_name"): _info(lambda i: i.tls.requested_server_name if i.tls else ""),
    ("connection", "tls_version"): _tls(lambda t: t.version),
    ("connection", "subject_local_certificate"): _tls(lambda t: t.subject_local_certificate),
    ("connection", "subject_peer_certificate"): _tls(lambda t: t.subject_peer_certificate),
    # SANs and the digest: found only when there is one (Envoy's extractSslInfo).
    ("connection", "dns_san_local_certificate"): _tls(lambda t: t.dns_san_local_certificate or None),
    ("connection", "dns_san_peer_certificate"): _tls(lambda t: t.dns_san_peer_certificate or None),
    ("connection", "uri_san_local_certificate"): _tls(lambda t: t.uri_san_local_certificate or None),
    ("connection", "uri_san_peer_certificate"): _tls(lambda t: t.uri_san_peer_certificate or None),
    ("connection", "sha256_peer_certificate_digest"): _tls(lambda t: t.sha256_peer_certificate_digest or None),
    ("upstream", "address"): _log(lambda l: l.upstream_address or None),
    ("xds", "route_name"): _info(lambda i: i.route_name),
    ("xds", "cluster_name"): _info(lambda i: i.cluster_name),
    ("route_name",): _info(lambda i: i.route_name),
    ("cluster_name",): _info(lambda i: i.cluster_name),
    # Envoy answers the route's metadata from the start of the request; the cluster's (which it
    # takes from the chosen upstream host) we answer from the route's cluster as well.
    ("route_metadata",): _info(lambda i: Metadata(i.route_metadata)),
    ("cluster_metadata",): _info(lambda i: Metadata(i.cluster_metadata)),
    ("xds", "route_metadata"): _info(lambda i: Metadata(i.route_metadata)),
    ("xds", "cluster_metadata"): _info(lambda i: Metadata(i.cluster_metadata)),
    ("node",): _node,
    ("xds", "node"): _node,
    ("plugin_name",): lambda s: s.plugin_name,
    ("plugin_root_id",): lambda s: s.root_id,
    ("plugin_vm_id",): lambda s: s.vm_id,
}


def _index(value: Any, segment: bytes) -> Any:
    if isinstance(value, Walkable):
        return value.index(segment)
    if isinstance(value, dict):
        return value.get(segment.decode("latin-1").lower())
    if isinstance(value, (list, tuple)) and segment.isdigit():
        i = int(segment)
        return value[i] if i < len(value) else None
    return None


def _normalize(path: bytes) -> bytes:
    # The C++ SDK terminates every segment, the last one too; Envoy ignores that final NUL.
    return path[:-1] if path.endswith(b"\0") else path


# path → (getter, depth) or (None, 0) for a custom property; guest-chosen, so bounded.
_PATHS: dict[bytes, tuple[Callable[[PropertySource], Any] | None, int]] = {}
_PATHS_MAX = 1024


def _resolve(path: bytes) -> tuple[Callable[[PropertySource], Any] | None, int]:
    segments = path.split(b"\0")
    names = tuple(s.decode("utf-8", "surrogateescape") for s in segments[:2])
    found: tuple[Callable[[PropertySource], Any] | None, int] = (None, 0)
    for depth in (2, 1):
        getter = _ATTRIBUTES.get(names[:depth]) if len(names) >= depth else None
        if getter is not None:
            found = (getter, depth)
            break
    if len(_PATHS) >= _PATHS_MAX:
        _PATHS.clear()
    _PATHS[path] = found
    return found


def get_property(src: PropertySource, path: bytes) -> bytes | None:
    """Encoded value of `path`, or None when not found."""
    if path.endswith(b"\0"):
        path = path[:-1]                 # _normalize
    entry = _PATHS.get(path)
    getter, depth = entry if entry is not None else _resolve(path)
    if getter is None:
        return src.facts.custom.get(path)
    value = getter(src)
    if value is None:
        return None
    if depth and path.count(b"\0") >= depth:
        for seg in path.split(b"\0")[depth:]:
            if value is None:
                break
            value = _index(value, seg)
        if value is None:
            return None
    if type(value) is str:
        return to_bytes(value)
    if isinstance(value, Walkable):
        return value.encode()
    return encode(value)


# The stream properties filters read on every request, answered from the stream's facts (an
# HTTP context's chain) in one step: path as the guest sends it (with or without the C++ SDK's
# final NUL) -> encoded value or None, exactly what get_property answers for it
# (tests/abi/test_units.py compares the two), without its lookup, getter and
# encoding layers.
def _stream_str(fn: Callable[[StreamFacts], str | None]) -> Callable[[StreamFacts], bytes | None]:
    def get(facts: StreamFacts) -> bytes | None:
        value = fn(facts)
        return None if value is None else to_bytes(value)
    return get


def _request_header(name: str) -> Callable[[StreamFacts], str | None]:
    return lambda facts: facts.request_headers.get(name) if facts.request_headers is not None else None


def _source_address(facts: StreamFacts) -> bytes | None:
    info = facts.info
    return None if info is None else to_bytes(_addr(info.client_addr))


STREAM_PROPERTIES: dict[bytes, Callable[[StreamFacts], bytes | None]] = {
    b"source\0address": _source_address,
    b"request\0id": _stream_str(_request_id),
    b"request\0path": _stream_str(_request_header(":path")),
    b"request\0method": _stream_str(_request_header(":method")),
    b"request\0host": _stream_str(_request_header(":authority")),
}
STREAM_PROPERTIES.update({path + b"\0": get for path, get in STREAM_PROPERTIES.items()})


def set_property(src: PropertySource, path: bytes, value: bytes) -> bool:
    """Store a custom property; False (nothing stored) when the source's properties would
    grow past MAX_PROPERTY_BYTES."""
    custom = src.facts.custom
    key = _normalize(path)
    old = custom.get(key)
    nbytes = custom.nbytes + len(value) - (len(old) if old is not None else -len(key))
    if nbytes > MAX_PROPERTY_BYTES and nbytes > custom.nbytes:
        return False
    custom[key] = value
    custom.nbytes = nbytes
    return True
