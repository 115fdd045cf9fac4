"""YAML → validated, frozen Config.

Validation walks PyYAML's composed node tree (not the constructed dicts) so that every error
can name the file, the line and the field path: ``config.yaml:14 routes[2].cluster: no cluster
named "usrs"``. All errors are collected before ConfigError is raised, so ``wasmgate check``
shows every problem at once.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

from abi.api import CAPABILITIES, FilterLimits, FilterSpec, NodeInfo

from .fetch import (PULL_POLICIES, FetchSettings, FilterSource, RegistryCredential, default_cache_dir,
                    source_kind)
from .http1 import HttpError
from .paths import ESCAPED_SLASH_ACTIONS, PathPolicy, RedirectTo, normalize_path, routing_path
from .tls_files import (DEFAULT_HANDSHAKE_TIMEOUT_S, MIN_VERSIONS, TlsError, check_ca, check_ciphers,
                        check_pair, digest)


class ConfigError(Exception):
    """The config is invalid; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Certificate:
    cert: Path                        # PEM chain, leaf first
    key: Path                         # PEM private key, unencrypted
    server_names: tuple[str, ...] = ()   # lower-case; "*.example.com" matches one label


@dataclass(frozen=True)
class ListenerTls:
    certificates: tuple[Certificate, ...]   # [0] is the default: no SNI, or no name matched
    client_ca: Path | None = None
    require_client_cert: bool = False
    min_version: str = "TLSv1.2"            # TLSv1.2 | TLSv1.3
    ciphers: str | None = None              # TLS 1.2 OpenSSL cipher string; None = gateway/tls.py's
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    digest: str = ""                        # of the files' contents: a reload notices new files


@dataclass(frozen=True)
class UpstreamTls:
    sni: str | None = None                  # None: the endpoint's host (no SNI for an IP)
    ca: Path | None = None                  # None: the system trust store
    verify: bool = True                     # chain and host name (sni, else the endpoint host)
    cert: Path | None = None                # client certificate and key, both or neither
    key: Path | None = None
    digest: str = ""


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    tls: ListenerTls | None = None
    # HTTP/2 beside HTTP/1.1: h2c prior knowledge on a plain listener (Envoy's codec AUTO), the
    # "h2" ALPN protocol on a TLS one.
    http2: bool = True


@dataclass(frozen=True)
class Admin:
    address: str
    port: int
    # The bearer token every admin request but GET /ready must carry (from admin.token, or read
    # from admin.token_file at load); None = no token (allowed on a loopback address only).
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None              # resolved path, for GET /config
    allowed_hosts: tuple[str, ...] = ()        # Host names accepted besides IPs and localhost
    # Clients (CIDRs) whose `x-wasmgate-trace: 1` gets the filter trace back; () = nobody.
    trace_allowed_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tracing:
    """`tracing:` — W3C trace context upstream and optional OTLP/HTTP span export."""
    propagate: bool = True                     # traceparent/tracestate to the upstream
    otlp_endpoint: str | None = None           # http(s)://collector:4318; None = no export
    service_name: str = "wasmgate"


@dataclass(frozen=True)
class Limits:
    max_request_body_bytes: int = 104857600
    max_header_bytes: int = 65536
    drain_timeout_s: float = 10.0
    # Downstream time limits (nginx client_header_timeout / client_body_timeout / send_timeout /
    # keepalive_timeout; Envoy request_headers_timeout / stream_idle_timeout).
    request_header_timeout_s: float = 10.0      # whole request head, from its first byte → 408
    request_body_idle_timeout_s: float = 30.0   # between two reads of the request body → 408
    response_send_timeout_s: float = 30.0       # a write to the client that cannot drain → close
    keepalive_timeout_s: float = 60.0           # idle between requests → close
    max_idle_connections: int = 1024            # idle keep-alive connections per worker
    # Pipelined HTTP/1.1 requests one connection has served in a row, already read, before it
    # lets the other connections run (Envoy's http.max_requests_per_io_cycle). Unbounded, one
    # client pipelining requests the gateway answers itself starves every other connection.
    max_requests_per_io_cycle: int = 1
    # A slow client must not hold an upstream connection: bodies are buffered in memory up to
    # these sizes, and beyond them spooled to a temporary file up to spool_max_bytes.
    request_buffer_bytes: int = 65536
    response_buffer_bytes: int = 65536
    spool_max_bytes: int = 1073741824
    spool_dir: str | None = None                # None: the system's temporary directory
    max_buffered_body_bytes: int = FilterLimits.max_buffered_body_bytes   # per filter, overridable
    # HTTP/2 (gateway/client_h2.py): SETTINGS_MAX_CONCURRENT_STREAMS, and each stream's receive
    # window (how much of a request body a client may send ahead of the proxy reading it).
    http2_max_concurrent_streams: int = 100
    http2_stream_window_bytes: int = 65535
    # Streams one HTTP/2 connection starts per event-loop turn; the rest of what one read brought
    # waits for the next turns, so that one connection's burst cannot hold every other one up
    # (what Envoy's http.max_requests_per_io_cycle does for HTTP/2). Above HTTP/1.1's 1, since
    # multiplexing is HTTP/2's normal use: each turn a connection waits costs it a write.
    http2_max_streams_per_io_cycle: int = 8
    # A WebSocket (or other upgraded) connection with no byte either way this long is closed.
    upgrade_idle_timeout_s: float = 300.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout_ms: int = 1000
    request_timeout_ms: int = 15000
    max_connections: int = 256
    eject_ms: int = 5000
    response_idle_timeout_ms: int = 60000       # between reads of the response body
    tls: UpstreamTls | None = None
    # Envoy's filter_metadata: {namespace: {key: value}} (cluster_metadata.* properties).
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    # "http1": routes and http_call (HTTP/1.1); "grpc": filters' gRPC callouts only (HTTP/2,
    # h2c or TLS; gateway/grpc_clusters.py).
    protocol: str = "http1"


@dataclass(frozen=True)
class RedisCluster:
    """A `type: redis` cluster: a Redis server filters reach through the Redis call ABI.
    Endpoints are a failover list (the first one that is up serves every call)."""
    name: str
    endpoints: tuple[Endpoint, ...]
    username: str = ""
    password: str = field(default="", repr=False)
    database: int = 0
    connect_timeout_ms: int = 1000     # one connection attempt (the call's timeout_ms bounds it too)
    timeout_ms: int = 200           # a whole call: waiting for a connection, connecting, the reply
    max_connections: int = 64       # calls in flight per worker and endpoint (one pipelined connection)
    eject_ms: int = 1000            # an endpoint whose connect failed is skipped this long
    max_reply_bytes: int = 16 * 1024 * 1024     # one reply, held whole for the filter


@dataclass(frozen=True)
class RouteMatch:
    host: str | None = None           # lower-case, no port
    prefix: str | None = None
    path: str | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()   # lower-case names


@dataclass(frozen=True)
class Rewrite:
    prefix: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class Route:
    name: str
    match: RouteMatch
    cluster: str
    rewrite: Rewrite | None = None
    filters: tuple[str, ...] = ()
    upgrades: bool = True             # WebSocket and other HTTP/1.1 upgrades; False → 403 (Envoy)
    # Envoy's filter_metadata: {namespace: {key: value}} (route_metadata.* properties).
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Config:
    source: Path
    listeners: tuple[Listener, ...]
    admin: Admin | None
    limits: Limits
    access_log_path: str | None                # "-" = stdout, None = disabled
    clusters: tuple[Cluster, ...]
    routes: tuple[Route, ...]
    filters: tuple[FilterSpec, ...]
    shared_data_max_bytes: int = 16777216
    path_normalization: PathPolicy = PathPolicy()
    # Headers only the gateway (or its filters) may set: removed from every incoming request.
    internal_headers: frozenset[str] = frozenset({"x-auth-identity"})
    # Query parameters whose values the access log replaces with "[redacted]".
    access_log_redact: tuple[str, ...] = ("api_key", "access_token")
    redis_clusters: tuple[RedisCluster, ...] = ()
    access_log_filters: bool = True            # the access log's per-request `filters` field
    tracing: Tracing = Tracing()
    node: NodeInfo = NodeInfo()                 # the node.* properties
    # Where each filter's module comes from (gateway/fetch.py), and how remote ones are fetched.
    filter_sources: tuple[FilterSource, ...] = ()
    filter_fetch: FetchSettings = field(default_factory=FetchSettings)
    audit_log_path: str | None = None          # JSON lines of filter lifecycle events (gateway/audit.py)
    # The parsed YAML as written (for GET /config, after redaction).
    raw: Any = field(default=None, compare=False, repr=False)

    def cluster(self, name: str) -> Cluster:
        return next(c for c in self.clusters if c.name == name)

    @property
    def has_filters(self) -> bool:
        return any(r.filters for r in self.routes)

    def tls_files(self) -> list[Path]:
        """Every certificate, key and CA file the listeners and clusters name."""
        out: list[Path] = []
        for lst in self.listeners:
            if lst.tls is not None:
                out += [p for c in lst.tls.certificates for p in (c.cert, c.key)]
                out += [lst.tls.client_ca] if lst.tls.client_ca else []
        for c in self.clusters:
            if c.tls is not None:
                out += [p for p in (c.tls.ca, c.tls.cert, c.tls.key) if p is not None]
        return out


# --------------------------------------------------------------------------------------------
# Node-walking helpers. Each returns a value or None after recording an error.

_MISSING = object()
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _Checker:
    def __init__(self, filename: str, loader: yaml.SafeLoader):
        self.filename = filename
        self.loader = loader
        self.errors: list[str] = []

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.errors.append(f"{self.filename}:{line} {path}: {message}")

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, path: str, allowed: set[str],
                required: set[str] = frozenset()) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {_kind(node)}")
            return None
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.error(key_node, path, f"keys must be strings, got {_kind(key_node)}")
                continue
            child = f"{path}.{key}" if path else key
            if key in out:
                self.error(key_node, child, "duplicate key")
            elif key not in allowed:
                self.error(key_node, child, f"unknown key (allowed: {', '.join(sorted(allowed))})")
            else:
                out[key] = value_node
        for key in sorted(required - out.keys()):
            self.error(node, f"{path}.{key}" if path else key, "required")
        return out

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, f"expected a list, got {_kind(node)}")
            return None
        return list(node.value)

    def scalar(self, node: yaml.Node, path: str, types: tuple[type, ...], what: str) -> Any:
        if isinstance(node, yaml.ScalarNode):
            v = self.value(node)
            # bool is an int in Python; YAML `true` must not pass as a port number.
            if isinstance(v, types) and not (isinstance(v, bool) and bool not in types):
                return v
            shown = "null" if v is None else (repr(v) if isinstance(v, str) else node.value)
            self.error(node, path, f"expected {what}, got {shown}")
        else:
            self.error(node, path, f"expected {what}, got {_kind(node)}")
        return None

    def string(self, node: yaml.Node, path: str, *, nonempty: bool = True) -> str | None:
        v = self.scalar(node, path, (str,), "a string")
        if v is not None and nonempty and not v:
            self.error(node, path, "must not be empty")
            return None
        return v

    def integer(self, node: yaml.Node, path: str, lo: int, hi: int | None = None) -> int | None:
        v = self.scalar(node, path, (int,), "an integer")
        if v is None:
            return None
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            self.error(node, path, f"must be {rng}, got {v}")
            return None
        return v

    def number(self, node: yaml.Node, path: str, lo: float) -> float | None:
        v = self.scalar(node, path, (int, float), "a number")
        if v is None:
            return None
        if v < lo:
            self.error(node, path, f"must be >= {lo}, got {v}")
            return None
        return float(v)

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        return self.scalar(node, path, (bool,), "true or false")

    def string_map(self, node: yaml.Node, path: str, what: str,
                   key_ok: Callable[[str], Any] | None = None, bad_key: str = ""
                   ) -> list[tuple[str, str]] | None:
        """A mapping of names to scalar values (numbers kept as their text), in document order;
        None once any error in it was reported. ``key_ok`` refuses a name with ``bad_key``."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping of {what}, got {_kind(node)}")
            return None
        pairs: list[tuple[str, str]] | None = []
        for kn, vn in node.value:
            k = self.string(kn, path)
            if k is not None and key_ok is not None and not key_ok(k):
                self.error(kn, f"{path}.{k}", bad_key)
                k = None
            v = None if k is None else self.scalar(vn, f"{path}.{k}", (str, int, float), "a string")
            if v is None:
                pairs = None
            elif pairs is not None:
                pairs.append((k, str(v)))
        return pairs

    def metadata(self, node: yaml.Node, path: str) -> dict[str, dict[str, Any]] | None:
        """Envoy's filter_metadata: {namespace: {key: value}}; None once an error was reported."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping of namespaces, got {_kind(node)}")
            return None
        namespaces_ok = True
        for kn, vn in node.value:
            if not isinstance(vn, yaml.MappingNode):
                ns = kn.value if isinstance(kn, yaml.ScalarNode) else "?"
                self.error(vn, f"{path}.{ns}", f"expected a mapping of keys to values, got {_kind(vn)}")
                namespaces_ok = False
        out = self.struct(node, path)
        return out if namespaces_ok else None

    def struct(self, node: yaml.Node, path: str) -> dict[str, Any] | None:
        """A google.protobuf.Struct: string keys; values strings, numbers (kept as doubles, as
        Envoy's Struct does), booleans, lists and mappings; None once an error was reported."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {_kind(node)}")
            return None
        out: dict[str, Any] | None = {}
        for kn, vn in node.value:
            k = self.value(kn) if isinstance(kn, yaml.ScalarNode) else None
            if not isinstance(k, str):
                self.error(kn, path, f"keys must be strings, got {_kind(kn)}")
                out = None
                continue
            child = f"{path}.{k}"
            if out is not None and k in out:
                self.error(kn, child, "duplicate key")
                out = None
            v = self._struct_value(vn, child)
            if v is None:
                out = None
            elif out is not None:
                out[k] = v
        return out

    def _struct_value(self, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self.struct(node, path)
        if isinstance(node, yaml.SequenceNode):
            items = [self._struct_value(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
            return None if any(v is None for v in items) else items
        v = self.value(node)
        if isinstance(v, bool) or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return float(v)
        self.error(node, path, "expected a string, number, boolean, list or mapping"
                   + (" (null cannot be served to filters)" if v is None else f", got {node.value!r}"))
        return None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"scalar {node.value!r}" if node.value != "" else "nothing"


def _get(fields: dict[str, yaml.Node], key: str, path: str,
         read: Callable[[yaml.Node, str], Any], default: Any = None) -> Any:
    node = fields.get(key)
    if node is None:
        return default
    v = read(node, f"{path}.{key}" if path else key)
    return default if v is None else v


def _unique_names(ck: _Checker, items: list[tuple[str | None, yaml.Node]], path: str) -> None:
    seen: dict[str, int] = {}
    for i, (name, node) in enumerate(items):
        if name is None:
            continue
        if name in seen:
            ck.error(node, f"{path}[{i}].name", f'duplicate name "{name}" (also {path}[{seen[name]}])')
        else:
            seen[name] = i


# --------------------------------------------------------------------------------------------

def _address(ck: _Checker, node: yaml.Node, path: str) -> str | None:
    v = ck.string(node, path)
    if v is None:
        return None
    if v != "localhost":
        try:
            ipaddress.ip_address(v)
        except ValueError:
            ck.error(node, path, f'"{v}" is not an IP address')
            return None
    return v


def _listener(ck: _Checker, node: yaml.Node, path: str, base: Path) -> Listener | None:
    n0 = len(ck.errors)
    f = ck.mapping(node, path, {"name", "address", "port", "tls", "http2"}, {"name", "port"})
    if f is None:
        return None
    name = _get(f, "name", path, ck.string)
    if name is not None and not _NAME.match(name):
        ck.error(f["name"], f"{path}.name", f'"{name}" may contain only letters, digits, "_", "-", "."')
        name = None
    address = _get(f, "address", path, lambda n, p: _address(ck, n, p), "127.0.0.1")
    port = _get(f, "port", path, lambda n, p: ck.integer(n, p, 0, 65535))
    tls = _listener_tls(ck, f["tls"], f"{path}.tls", base) if "tls" in f and not _is_null(f["tls"]) else None
    http2 = _get(f, "http2", path, ck.boolean, True)
    if len(ck.errors) > n0:
        return None
    return Listener(name, address, port, tls, http2)


# A host name, lower-case (underscores allowed: internal names have them); "*." only for SNI choice.
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def _tls_file(ck: _Checker, f: dict[str, yaml.Node], key: str, path: str, base: Path) -> Path | None:
    v = _get(f, key, path, ck.string)
    return None if v is None else (base / v).resolve()


def _tls_error(ck: _Checker, f: dict[str, yaml.Node], path: str, e: Exception) -> None:
    field = getattr(e, "field", "")
    ck.error(f.get(field), f"{path}.{field}" if field in f else path, getattr(e, "message", str(e)))


def _pair(ck: _Checker, f: dict[str, yaml.Node], path: str, base: Path, parts: list[bytes]
          ) -> tuple[Path, Path] | None:
    """`cert` and `key` of a mapping, both or neither, checked together (they must match)."""
    cert, key = _tls_file(ck, f, "cert", path, base), _tls_file(ck, f, "key", path, base)
    for have, other in (("cert", "key"), ("key", "cert")):
        if have in f and other not in f:
            ck.error(f[have], f"{path}.{other}", f"required with {have}")
    if cert is None or key is None:
        return None
    missing = [k for k, p in (("cert", cert), ("key", key)) if not p.exists()]
    for k in missing:                        # both at once, not one per `wasmgate check` run
        ck.error(f[k], f"{path}.{k}", f"file not found: {cert if k == 'cert' else key}")
    if missing:
        return None
    try:
        parts.append(check_pair(cert, key))
    except TlsError as e:
        _tls_error(ck, f, path, e)
        return None
    return cert, key


def _ca_file(ck: _Checker, f: dict[str, yaml.Node], key: str, path: str, base: Path,
             parts: list[bytes]) -> Path | None:
    ca = _tls_file(ck, f, key, path, base)
    if ca is not None:
        try:
            parts.append(check_ca(ca, key))
        except TlsError as e:
            _tls_error(ck, f, path, e)
            return None
    return ca


def _listener_tls(ck: _Checker, node: yaml.Node, path: str, base: Path) -> ListenerTls | None:
    n0 = len(ck.errors)
    f = ck.mapping(node, path, {"cert", "key", "certificates", "client_ca", "require_client_cert",
                                "min_version", "ciphers", "handshake_timeout_s"})
    if f is None:
        return None
    parts: list[bytes] = []                  # every file's bytes, for the digest
    certs: list[Certificate] = []
    pair = _pair(ck, f, path, base, parts)
    if pair is not None:
        certs.append(Certificate(*pair))
    items = (ck.sequence(f["certificates"], f"{path}.certificates") or []) if "certificates" in f else []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        c = _sni_certificate(ck, item, f"{path}.certificates[{i}]", base, parts, seen)
        if c is not None:
            certs.append(c)
    if "cert" not in f and "key" not in f and not items:
        ck.error(node, path, "needs cert and key, or certificates")
    client_ca = _ca_file(ck, f, "client_ca", path, base, parts)
    require = _get(f, "require_client_cert", path, ck.boolean, False)
    if require and "client_ca" not in f:
        ck.error(f["require_client_cert"], f"{path}.require_client_cert",
                 "needs client_ca (the CAs that sign accepted client certificates)")
    min_version = _get(f, "min_version", path, ck.string, "TLSv1.2")
    if min_version not in MIN_VERSIONS:
        ck.error(f["min_version"], f"{path}.min_version",
                 f'must be {" or ".join(MIN_VERSIONS)}, got "{min_version}"')
    ciphers = _get(f, "ciphers", path, ck.string)
    if ciphers is not None:
        try:
            check_ciphers(ciphers)
        except TlsError as e:
            _tls_error(ck, f, path, e)
    timeout = _get(f, "handshake_timeout_s", path, lambda n, p: ck.number(n, p, 0.001),
                   DEFAULT_HANDSHAKE_TIMEOUT_S)
    if len(ck.errors) > n0:
        return None
    return ListenerTls(tuple(certs), client_ca, require, min_version, ciphers, timeout, digest(*parts))


def _sni_certificate(ck: _Checker, node: yaml.Node, path: str, base: Path, parts: list[bytes],
                     seen: dict[str, str]) -> Certificate | None:
    """One `certificates:` entry; ``seen`` maps each server name taken so far to its entry."""
    f = ck.mapping(node, path, {"server_names", "cert", "key"}, {"server_names", "cert", "key"})
    if f is None:
        return None
    names: list[str] = []
    items = (ck.sequence(f["server_names"], f"{path}.server_names") or []) if "server_names" in f else []
    if isinstance(f.get("server_names"), yaml.SequenceNode) and not items:
        ck.error(f["server_names"], f"{path}.server_names", "must list at least one name")
    for j, nn in enumerate(items):
        n = ck.string(nn, f"{path}.server_names[{j}]")
        if n is None:
            continue
        n = n.lower().rstrip(".")
        if not _HOST_NAME.match(n[2:] if n.startswith("*.") else n):
            ck.error(nn, f"{path}.server_names[{j}]", f'"{n}" is not a host name (or *.domain)')
        elif n in seen:
            ck.error(nn, f"{path}.server_names[{j}]", f'"{n}" is also listed by {seen[n]}')
        else:
            seen[n] = path
            names.append(n)
    pair = _pair(ck, f, path, base, parts)
    return Certificate(*pair, server_names=tuple(names)) if pair is not None else None


def _upstream_tls(ck: _Checker, node: yaml.Node, path: str, base: Path) -> tuple[bool, UpstreamTls | None]:
    """(ok, spec); spec None with ok when the block says `enabled: false`."""
    n0 = len(ck.errors)
    f = ck.mapping(node, path, {"enabled", "sni", "ca", "verify", "cert", "key"})
    if f is None:
        return False, None
    enabled = _get(f, "enabled", path, ck.boolean, True)
    sni = _get(f, "sni", path, ck.string)
    if sni is not None and not _HOST_NAME.match(sni.lower()):
        ck.error(f["sni"], f"{path}.sni", f'"{sni}" is not a host name')
    parts: list[bytes] = []
    ca = _ca_file(ck, f, "ca", path, base, parts)
    verify = _get(f, "verify", path, ck.boolean, True)
    pair = _pair(ck, f, path, base, parts)
    if len(ck.errors) > n0:
        return False, None
    if not enabled:
        return True, None
    cert, key = pair if pair is not None else (None, None)
    return True, UpstreamTls(sni.lower() if sni else None, ca, verify, cert, key, digest(*parts))


def _admin(ck: _Checker, node: yaml.Node, path: str, base: Path) -> Admin | None:
    n0 = len(ck.errors)
    f = ck.mapping(node, path, {"address", "port", "token", "token_file", "allowed_hosts", "trace_allowed_cidrs"},
                   {"port"})
    if f is None:
        return None
    address = _get(f, "address", path, lambda n, p: _address(ck, n, p), "127.0.0.1")
    port = _get(f, "port", path, lambda n, p: ck.integer(n, p, 0, 65535))
    token, token_file = _admin_token(ck, f, path, base)
    hosts = _get(f, "allowed_hosts", path, lambda n, p: _host_names(ck, n, p), ())
    cidrs = _get(f, "trace_allowed_cidrs", path, lambda n, p: _cidrs(ck, n, p), ())
    if address is not None and token is None and len(ck.errors) == n0 and not is_loopback(address):
        ck.error(f["address"], f"{path}.address",
                 f"{address} is not a loopback address: set admin.token or admin.token_file, or anyone "
                 f"who reaches it can read the config and reload the gateway")
    if len(ck.errors) > n0:
        return None
    return Admin(address, port, token, token_file, hosts, cidrs)


def _cidrs(ck: _Checker, node: yaml.Node, path: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(ck.sequence(node, path) or []):
        text = ck.string(item, f"{path}[{i}]")
        if text is None:
            continue
        try:
            out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            ck.error(item, f"{path}[{i}]", f'"{text}" is not an IP network (write 10.0.0.0/8, 127.0.0.1 or ::1/128)')
    return tuple(out)


def _tracing(ck: _Checker, node: yaml.Node, path: str) -> Tracing | None:
    f = ck.mapping(node, path, {"propagate", "otlp_endpoint", "service_name"})
    if f is None:
        return None
    propagate = _get(f, "propagate", path, ck.boolean, True)
    endpoint = None
    if "otlp_endpoint" in f and not _is_null(f["otlp_endpoint"]):
        endpoint = ck.string(f["otlp_endpoint"], f"{path}.otlp_endpoint")
        parts = urlsplit(endpoint) if endpoint is not None else None
        if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            ck.error(f["otlp_endpoint"], f"{path}.otlp_endpoint",
                     f'"{endpoint}" is not an http:// or https:// URL (the OTLP/HTTP collector, e.g. '
                     f'http://127.0.0.1:4318)')
            endpoint = None
    service = _get(f, "service_name", path, lambda n, p: ck.string(n, p), "wasmgate")
    if service is not None and not service.strip():
        ck.error(f["service_name"], f"{path}.service_name", "must not be empty")
    return Tracing(propagate=bool(propagate), otlp_endpoint=endpoint, service_name=service or "wasmgate")


def _admin_token(ck: _Checker, f: dict[str, yaml.Node], path: str, base: Path) -> tuple[str | None, str | None]:
    """(token, resolved token_file) from admin.token or admin.token_file (read now)."""
    if "token" in f and "token_file" in f:
        ck.error(f["token_file"], f"{path}.token_file", "use either token or token_file, not both")
        return None, None
    if "token" in f:
        return _bearer(ck, f["token"], f"{path}.token", ck.string(f["token"], f"{path}.token")), None
    if "token_file" not in f:
        return None, None
    node, where = f["token_file"], f"{path}.token_file"
    name = ck.string(node, where)
    if name is None:
        return None, None
    file = str((base / name).resolve())
    try:
        text = Path(file).read_text(encoding="utf-8").strip()   # a trailing newline is not the token's
    except OSError as e:
        ck.error(node, where, f"cannot read {file}: {e.strerror or e}")
        return None, file
    except UnicodeDecodeError as e:
        ck.error(node, where, f"{file} is not UTF-8 text: {e.reason}")
        return None, file
    return _bearer(ck, node, where, text, f" in {file}"), file


def _host_names(ck: _Checker, node: yaml.Node, path: str) -> tuple[str, ...] | None:
    names = []
    for i, item in enumerate(ck.sequence(node, path) or []):
        name = ck.string(item, f"{path}[{i}]")
        if name is not None and not _HOSTNAME.match(name):
            ck.error(item, f"{path}[{i}]", f'"{name}" is not a host name (write it without scheme or port)')
        elif name is not None:
            names.append(name.lower().rstrip("."))
    return tuple(names)


# RFC 6750 §2.1 b64token: what a client can put after "Bearer " without quoting.
_BEARER = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.?$")
MIN_ADMIN_TOKEN = 16


def _bearer(ck: _Checker, node: yaml.Node, path: str, token: str | None, where: str = "") -> str | None:
    if token is None:
        return None
    if not _BEARER.match(token):
        ck.error(node, path, f"the token{where} may contain only letters, digits and -._~+/ (then =), "
                             f"as a bearer token (RFC 6750)")
        return None
    if len(token) < MIN_ADMIN_TOKEN:
        ck.error(node, path, f"the token{where} is {len(token)} characters; use at least {MIN_ADMIN_TOKEN} "
                             f"(e.g. `openssl rand -hex 32`)")
        return None
    return token


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if address == "localhost":
        return True
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)      # ::ffff:127.0.0.1 (3.11 does not call it loopback)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _limits(ck: _Checker, node: yaml.Node, path: str, base_dir: Path) -> Limits:
    d = Limits()
    f = ck.mapping(node, path, set(Limits.__dataclass_fields__))
    if f is None:
        return d
    size = lambda lo: (lambda n, p: ck.integer(n, p, lo))  # noqa: E731
    secs = lambda n, p: ck.number(n, p, 0.001)  # noqa: E731
    readers: dict[str, Callable[[yaml.Node, str], Any]] = {
        "max_request_body_bytes": size(0), "max_header_bytes": size(256),
        "drain_timeout_s": lambda n, p: ck.number(n, p, 0),
        "request_header_timeout_s": secs, "request_body_idle_timeout_s": secs,
        "response_send_timeout_s": secs, "keepalive_timeout_s": secs,
        "max_idle_connections": size(0), "max_requests_per_io_cycle": size(1),
        "request_buffer_bytes": size(0),
        "response_buffer_bytes": size(0), "spool_max_bytes": size(0),
        "spool_dir": ck.string, "max_buffered_body_bytes": lambda n, p: _u32(ck, n, p),
        # RFC 9113 §6.5.2: 2^31-1 is the largest window; a stream limit under 1 would refuse all.
        "http2_max_concurrent_streams": lambda n, p: ck.integer(n, p, 1, 2**31 - 1),
        "http2_stream_window_bytes": lambda n, p: ck.integer(n, p, 65535, 2**31 - 1),
        "http2_max_streams_per_io_cycle": size(1),
        "upgrade_idle_timeout_s": secs,
    }
    values = {k: _get(f, k, path, read, getattr(d, k)) for k, read in readers.items()}
    if values["spool_dir"] is not None:
        values["spool_dir"] = str((base_dir / values["spool_dir"]).resolve())
        if not Path(values["spool_dir"]).is_dir():
            ck.error(f["spool_dir"], f"{path}.spool_dir", f"directory does not exist: {values['spool_dir']}")
    return Limits(**values)


def _path_normalization(ck: _Checker, node: yaml.Node, path: str) -> PathPolicy:
    d = PathPolicy()
    f = ck.mapping(node, path, {"merge_slashes", "escaped_slashes"})
    if f is None:
        return d
    action = _get(f, "escaped_slashes", path, ck.string, d.escaped_slashes)
    if action not in ESCAPED_SLASH_ACTIONS:
        ck.error(f["escaped_slashes"], f"{path}.escaped_slashes",
                 f'must be one of {", ".join(ESCAPED_SLASH_ACTIONS)}, got "{action}"')
        action = d.escaped_slashes
    return PathPolicy(merge_slashes=_get(f, "merge_slashes", path, ck.boolean, d.merge_slashes),
                      escaped_slashes=action)


def _name_list(ck: _Checker, node: yaml.Node, path: str, pattern: re.Pattern, what: str) -> list[str] | None:
    """A list of names matching ``pattern``, lower-cased; None after reporting an error."""
    items = ck.sequence(node, path)
    if items is None:
        return None
    names: list[str] = []
    for i, item in enumerate(items):
        v = ck.string(item, f"{path}[{i}]")
        if v is None:
            return None
        if not pattern.match(v):
            ck.error(item, f"{path}[{i}]", f'"{v}" is not {what}')
            return None
        names.append(v.lower())
    return names


def _u32(ck: _Checker, node: yaml.Node, path: str) -> int | None:
    # Body and callout sizes reach filters as u32 (callback arguments).
    return ck.integer(node, path, 0, 0xFFFFFFFF)


def _endpoint(ck: _Checker, node: yaml.Node, path: str) -> Endpoint | None:
    v = ck.string(node, path)
    if v is None:
        return None
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", v) or re.match(r"^([^:\[\]\s]+):(\d+)$", v)
    if not m:
        ck.error(node, path, f'"{v}" is not host:port (IPv6 as [addr]:port)')
        return None
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        ck.error(node, path, f'"{v}": port must be 1..65535')
        return None
    return Endpoint(m.group(1), port)


def _endpoints(ck: _Checker, f: dict[str, yaml.Node], path: str) -> tuple[Endpoint, ...] | None:
    if "endpoints" not in f:
        return None
    items = ck.sequence(f["endpoints"], f"{path}.endpoints")
    if items is not None and not items:
        ck.error(f["endpoints"], f"{path}.endpoints", "needs at least one endpoint")
        return None
    eps = [_endpoint(ck, item, f"{path}.endpoints[{i}]") for i, item in enumerate(items or [])]
    return None if items is None or None in eps else tuple(eps)


def _cluster(ck: _Checker, node: yaml.Node, path: str, base: Path) -> Cluster | RedisCluster | None:
    if _type_of(ck, node) == "redis":
        return _redis_cluster(ck, node, path, base)
    f = ck.mapping(node, path, {"name", "type", "endpoints", "connect_timeout_ms", "request_timeout_ms",
                                "max_connections", "eject_ms", "response_idle_timeout_ms", "tls",
                                "metadata", "protocol"},
                     {"name", "endpoints"})
    if f is None:
        return None
    kind = _get(f, "type", path, ck.string, "http")
    if kind != "http":
        ck.error(f["type"], f"{path}.type", f'must be http or redis, got "{kind}"')
        return None
    name = _get(f, "name", path, ck.string)
    endpoints = _endpoints(ck, f, path)
    tls, tls_ok = None, True
    if "tls" in f and not _is_null(f["tls"]):
        tls_ok, tls = _upstream_tls(ck, f["tls"], f"{path}.tls", base)
    d = Cluster("", ())
    n_errors = len(ck.errors)
    ms = lambda lo: (lambda n, p: ck.integer(n, p, lo))  # noqa: E731
    cluster = Cluster(
        name=name or "", endpoints=endpoints or (),
        connect_timeout_ms=_get(f, "connect_timeout_ms", path, ms(1), d.connect_timeout_ms),
        request_timeout_ms=_get(f, "request_timeout_ms", path, ms(1), d.request_timeout_ms),
        max_connections=_get(f, "max_connections", path, ms(1), d.max_connections),
        eject_ms=_get(f, "eject_ms", path, ms(0), d.eject_ms),
        response_idle_timeout_ms=_get(f, "response_idle_timeout_ms", path, ms(1), d.response_idle_timeout_ms),
        tls=tls,
        metadata=_get(f, "metadata", path, ck.metadata, {}),
        protocol=_protocol(ck, f, path, endpoints, tls),
    )
    return cluster if name and endpoints and tls_ok and len(ck.errors) == n_errors and cluster.protocol else None


def _protocol(ck: _Checker, f: dict[str, yaml.Node], path: str,
              endpoints: tuple[Endpoint, ...] | None, tls: UpstreamTls | None) -> str:
    """A cluster's `protocol:` ("" after reporting an error)."""
    proto = _get(f, "protocol", path, ck.string, "http1")
    if proto not in ("http1", "grpc"):
        ck.error(f["protocol"], f"{path}.protocol", f'must be http1 or grpc, got "{proto}"')
        return ""
    if proto == "grpc":
        if tls is not None and not tls.verify:
            # gRPC's TLS (its own BoringSSL) always verifies the server: say so rather than
            # silently verifying what the operator asked us not to.
            ck.error(f["tls"], f"{path}.tls.verify", "verify: false is not supported with protocol: grpc")
            return ""
        if endpoints and len(endpoints) > 1 and not all(_is_ip(e.host) for e in endpoints):
            ck.error(f["endpoints"], f"{path}.endpoints",
                     "a grpc cluster with more than one endpoint needs IP addresses (gRPC balances "
                     "over an address list; one host name is resolved by gRPC itself)")
            return ""
    return proto


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _redis_cluster(ck: _Checker, node: yaml.Node, path: str, base: Path) -> RedisCluster | None:
    n0 = len(ck.errors)
    f = ck.mapping(node, path, {"name", "type", "endpoints", "username", "password", "password_file",
                                "database", "connect_timeout_ms", "timeout_ms", "max_connections",
                                "eject_ms", "max_reply_bytes"}, {"name", "endpoints"})
    if f is None:
        return None
    name = _get(f, "name", path, ck.string)
    endpoints = _endpoints(ck, f, path)
    username = _get(f, "username", path, ck.string, "")
    password = _get(f, "password", path, lambda n, p: ck.string(n, p, nonempty=False), "")
    if "password_file" in f:
        if "password" in f:
            ck.error(f["password_file"], f"{path}.password_file", "use either password or password_file, not both")
        else:
            password = _secret_file(ck, f["password_file"], f"{path}.password_file", base)
    if username and not password and "password_file" not in f:
        ck.error(f["username"], f"{path}.username", "needs a password (or password_file)")
    d = RedisCluster("", ())
    ms = lambda lo: (lambda n, p: ck.integer(n, p, lo))  # noqa: E731
    cluster = RedisCluster(
        name=name or "", endpoints=endpoints or (), username=username, password=password or "",
        database=_get(f, "database", path, ms(0), d.database),
        connect_timeout_ms=_get(f, "connect_timeout_ms", path, ms(1), d.connect_timeout_ms),
        timeout_ms=_get(f, "timeout_ms", path, ms(1), d.timeout_ms),
        max_connections=_get(f, "max_connections", path, ms(1), d.max_connections),
        eject_ms=_get(f, "eject_ms", path, ms(0), d.eject_ms),
        max_reply_bytes=_get(f, "max_reply_bytes", path, ms(16), d.max_reply_bytes),
    )
    return cluster if len(ck.errors) == n0 and name and endpoints else None


def _secret_file(ck: _Checker, node: yaml.Node, path: str, base: Path) -> str | None:
    """A password kept in a file (relative to the config file), without its trailing newline."""
    name = ck.string(node, path)
    if name is None:
        return None
    file = (base / name).resolve()
    try:
        text = file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        ck.error(node, path, f"cannot read {file}: {getattr(e, 'strerror', None) or e}")
        return None
    if not text:
        ck.error(node, path, f"{file} is empty")
        return None
    return text


def _route(ck: _Checker, node: yaml.Node, path: str, clusters: set[str], filters: set[str] | None,
           paths: PathPolicy = PathPolicy(), redis: set[str] = frozenset(),
           grpc: set[str] = frozenset()) -> tuple[str | None, Route | None]:
    f = ck.mapping(node, path, {"name", "match", "cluster", "rewrite", "filters", "upgrades", "metadata"},
                   {"name", "cluster"})
    if f is None:
        return None, None
    ok = True
    name = _get(f, "name", path, ck.string)
    cluster = _get(f, "cluster", path, ck.string)
    if cluster is not None and cluster in redis:
        ck.error(f["cluster"], f"{path}.cluster",
                 f'"{cluster}" is a redis cluster (type: redis); a route needs an HTTP cluster')
        ok = False
    elif cluster is not None and cluster in grpc:
        ck.error(f["cluster"], f"{path}.cluster",
                 f'"{cluster}" is a grpc cluster (protocol: grpc), for filters\' gRPC callouts; '
                 f'a route needs an http1 cluster')
        ok = False
    elif cluster is not None and cluster not in clusters:
        ck.error(f["cluster"], f"{path}.cluster", f'no cluster named "{cluster}"')
        ok = False
    match = RouteMatch()
    if "match" in f:
        match = _match(ck, f["match"], f"{path}.match", paths)
        ok = ok and match is not None
    rewrite = None
    if "rewrite" in f:
        rewrite = _rewrite(ck, f["rewrite"], f"{path}.rewrite", match)
        ok = ok and rewrite is not None
    names: list[str] = []
    if "filters" in f:
        items = ck.sequence(f["filters"], f"{path}.filters")
        ok = ok and items is not None
        for i, item in enumerate(items or []):
            fname = ck.string(item, f"{path}.filters[{i}]")
            if fname is None:
                ok = False
            elif filters is not None and fname not in filters:
                ck.error(item, f"{path}.filters[{i}]", f'no filter named "{fname}"')
                ok = False
            elif fname in names:
                ck.error(item, f"{path}.filters[{i}]", f'filter "{fname}" listed twice')
                ok = False
            else:
                names.append(fname)
    upgrades = _get(f, "upgrades", path, ck.boolean, True)
    n_errors = len(ck.errors)
    metadata = _get(f, "metadata", path, ck.metadata, {})
    if not (ok and name and cluster) or len(ck.errors) > n_errors:
        return name, None
    return name, Route(name, match, cluster, rewrite, tuple(names), upgrades, metadata)


def _match(ck: _Checker, node: yaml.Node, path: str, paths: PathPolicy) -> RouteMatch | None:
    f = ck.mapping(node, path, {"host", "prefix", "path", "methods", "headers"})
    if f is None:
        return None
    ok = True
    host = _get(f, "host", path, ck.string)
    if host is not None:
        host = host.lower()
        if ":" in host and not host.startswith("["):
            host = host.rsplit(":", 1)[0]     # port is ignored when matching
    prefix = _get(f, "prefix", path, ck.string)
    exact = _get(f, "path", path, ck.string)
    for key, v in (("prefix", prefix), ("path", exact)):
        if v is not None and not v.startswith("/"):
            ck.error(f[key], f"{path}.{key}", f'must start with "/", got "{v}"')
            ok = False
        elif v is not None and (problem := _not_normal(v, paths)):
            ck.error(f[key], f"{path}.{key}", problem)
            ok = False
    if prefix is not None and exact is not None:
        ck.error(f["path"], f"{path}.path", "use either prefix or path, not both")
        ok = False
    methods = None
    if "methods" in f:
        items = ck.sequence(f["methods"], f"{path}.methods")
        if items is not None and not items:
            ck.error(f["methods"], f"{path}.methods", "must list at least one method")
            ok = False
        ms: set[str] = set()
        for i, item in enumerate(items or []):
            m = ck.string(item, f"{path}.methods[{i}]")
            if m is None or not _TOKEN.match(m):
                if m is not None:
                    ck.error(item, f"{path}.methods[{i}]", f'"{m}" is not an HTTP method')
                ok = False
            else:
                ms.add(m.upper())
        methods = frozenset(ms)
        ok = ok and items is not None
    headers: list[tuple[str, str]] = []
    if "headers" in f:
        pairs = ck.string_map(f["headers"], f"{path}.headers", "header name to value",
                              _TOKEN.match, "not a valid header name")
        if pairs is None:
            ok = False
        else:
            headers = [(k.lower(), v) for k, v in pairs]
    return RouteMatch(host, prefix, exact, methods, tuple(headers)) if ok else None


def _not_normal(path: str, paths: PathPolicy) -> str | None:
    """Why a route's path could never match a (normalised) request path, or None."""
    try:
        normal = routing_path(normalize_path(path, PathPolicy(paths.merge_slashes, "keep")))
    except (HttpError, RedirectTo) as e:
        return f'"{path}": {e}'
    return None if normal == path else f'"{path}" is not a normalised path; requests are matched as "{normal}"'


def _rewrite(ck: _Checker, node: yaml.Node, path: str, match: RouteMatch | None) -> Rewrite | None:
    f = ck.mapping(node, path, {"prefix", "host"})
    if f is None:
        return None
    prefix = _get(f, "prefix", path, lambda n, p: ck.string(n, p, nonempty=False))
    host = _get(f, "host", path, ck.string)
    ok = True
    if prefix is not None and match is not None and match.prefix is None and match.path is None:
        ck.error(f["prefix"], f"{path}.prefix", "needs match.prefix or match.path to know what to replace")
        ok = False
    if prefix and not prefix.startswith("/"):
        ck.error(f["prefix"], f"{path}.prefix", f'must start with "/", got "{prefix}"')
        ok = False
    return Rewrite(prefix, host) if ok else None


_SECRETS = ("secret", "password", "passwd", "key", "token", "credential", "auth")


def _encode(ck: _Checker, node: yaml.Node, path: str, encoding: str) -> bytes | None:
    """A filter configuration: string as is, mapping/list → JSON or msgpack."""
    if isinstance(node, yaml.ScalarNode):
        v = ck.value(node)
        if v is None:
            return b""
        if isinstance(v, str):
            return v.encode()
        ck.error(node, path, f"expected a string, mapping or list, got {v!r}")
        return None
    v = ck.value(node)
    try:
        if encoding == "msgpack":
            import msgpack
            return msgpack.packb(v, use_bin_type=True, datetime=False)
        return json.dumps(v, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        ck.error(node, path, f"cannot encode as {encoding}: {e}")
        return None


def _node(ck: _Checker, node: yaml.Node, path: str) -> NodeInfo:
    """The top-level `node:` (Envoy's bootstrap node): the node.* properties filters read."""
    f = ck.mapping(node, path, {"id", "cluster", "metadata"})
    if f is None:
        return NodeInfo()
    return NodeInfo(id=_get(f, "id", path, lambda n, p: ck.string(n, p, nonempty=False), ""),
                    cluster=_get(f, "cluster", path, lambda n, p: ck.string(n, p, nonempty=False), ""),
                    metadata=_get(f, "metadata", path, ck.struct, {}))


def _filter(ck: _Checker, node: yaml.Node, path: str, base: Path, gateway_limits: Limits,
            fetch: FetchSettings, default_caps: frozenset[str] | None) -> tuple[FilterSpec, FilterSource] | None:
    f = ck.mapping(node, path, {"name", "wasm", "sha256", "pull_policy", "config", "encoding", "vm_config",
                                "failure_policy", "limits", "environment", "deliver_body_while_paused",
                                "root_id", "capabilities", "strict_capabilities", "readable_properties",
                                "vm_id"},
                     {"name", "wasm"})
    if f is None:
        return None
    ok = True
    name = _get(f, "name", path, ck.string)
    source = _filter_source(ck, f, path, base, name or "")
    wasm_path = None
    if source is None:
        ok = False
    elif source.remote:
        wasm_path = fetch.blob_path(source.sha256)      # fetch_filters puts the verified module there
    else:
        wasm_path = Path(source.location)
    encoding = _get(f, "encoding", path, ck.string, "json")
    if encoding not in ("json", "msgpack"):
        ck.error(f["encoding"], f"{path}.encoding", f'must be json or msgpack, got "{encoding}"')
        ok, encoding = False, "json"
    configuration = _encode(ck, f["config"], f"{path}.config", encoding) if "config" in f else b""
    vm_configuration = _encode(ck, f["vm_config"], f"{path}.vm_config", encoding) if "vm_config" in f else b""
    policy = _get(f, "failure_policy", path, ck.string, "fail_closed")
    if policy not in ("fail_closed", "fail_open"):
        ck.error(f["failure_policy"], f"{path}.failure_policy", f'must be fail_closed or fail_open, got "{policy}"')
        ok = False
    d = FilterLimits(max_buffered_body_bytes=gateway_limits.max_buffered_body_bytes)
    limits = d
    if "limits" in f:
        lf = ck.mapping(f["limits"], f"{path}.limits", {"memory_mb", "callback_ms", "max_buffered_body_bytes",
                                                        "max_callout_bytes"})
        if lf is None:
            ok = False
        else:
            at = f"{path}.limits"
            mem = _get(lf, "memory_mb", at, lambda n, p: ck.integer(n, p, 1, 4096), None)
            cb = _get(lf, "callback_ms", at, lambda n, p: ck.integer(n, p, 1), None)
            buffered = _get(lf, "max_buffered_body_bytes", at, lambda n, p: _u32(ck, n, p), None)
            callouts = _get(lf, "max_callout_bytes", at, lambda n, p: _u32(ck, n, p), None)
            limits = FilterLimits(memory_bytes=(mem * 1024 * 1024) if mem else d.memory_bytes,
                                  callback_ms=cb or d.callback_ms,
                                  max_buffered_body_bytes=d.max_buffered_body_bytes if buffered is None else buffered,
                                  max_callout_bytes=d.max_callout_bytes if callouts is None else callouts)
    env: list[tuple[str, str]] = []
    if "environment" in f:
        pairs = ck.string_map(f["environment"], f"{path}.environment", "string to string")
        if pairs is None:
            ok = False
        else:
            env = pairs
    deliver = _get(f, "deliver_body_while_paused", path, ck.boolean, False)
    # C++ and AssemblyScript SDK filters pick their root context by the plugin_root_id property.
    root_id = _get(f, "root_id", path, lambda n, p: ck.string(n, p, nonempty=False), "")
    # Filters with the same vm_id share shared data and queues (plugin_vm_id); none: the default VM.
    vm_id = _get(f, "vm_id", path, ck.string, "")
    if "\0" in vm_id:
        ck.error(f["vm_id"], f"{path}.vm_id", "must not contain NUL")
        ok = False
    caps = _capabilities(ck, f["capabilities"], f"{path}.capabilities") if "capabilities" in f else default_caps
    strict = _get(f, "strict_capabilities", path, ck.boolean, False)
    readable = None
    if "readable_properties" in f:
        readable = _name_list(ck, f["readable_properties"], f"{path}.readable_properties",
                              re.compile(r"^[A-Za-z0-9_]+(\.[^.\s]+)*$"), "a property path (request.headers, connection)")
        ok = ok and readable is not None
    if not ok or name is None or wasm_path is None or configuration is None or vm_configuration is None:
        return None
    return FilterSpec(name=name, wasm_path=wasm_path, configuration=configuration,
                      vm_configuration=vm_configuration, failure_policy=policy, limits=limits,
                      environment=tuple(env), deliver_body_while_paused=deliver,
                      root_id=root_id or "", vm_id=vm_id, capabilities=caps, strict_capabilities=strict,
                      readable_properties=None if readable is None else tuple(readable)), source


def _capabilities(ck: _Checker, node: yaml.Node, path: str) -> frozenset[str] | None:
    """A list of host-function groups (abi/capabilities.py); None once an error was reported."""
    out = set()
    for i, item in enumerate(ck.sequence(node, path) or []):
        group = ck.string(item, f"{path}[{i}]")
        if group is not None and group not in CAPABILITIES:
            ck.error(item, f"{path}[{i}]", f'unknown capability "{group}" (known: {", ".join(sorted(CAPABILITIES))})')
        elif group is not None:
            out.add(group)
    return frozenset(out)


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _filter_source(ck: _Checker, f: dict[str, yaml.Node], path: str, base: Path,
                   name: str) -> FilterSource | None:
    """`wasm:` (a path, https://, http:// or oci://), its `sha256:` pin and `pull_policy:`."""
    wasm = _get(f, "wasm", path, ck.string)
    if wasm is None:
        return None
    kind = source_kind(wasm)
    ok = True
    pin = None
    if "sha256" in f:
        # The scalar's text: an all-digit digest would otherwise load as a YAML integer.
        node = f["sha256"]
        pin = node.value if isinstance(node, yaml.ScalarNode) and node.value else ck.string(node, f"{path}.sha256")
        if pin is not None:
            pin = pin.lower().removeprefix("sha256:")
            if not _SHA256_HEX.match(pin):
                ck.error(f["sha256"], f"{path}.sha256", "expected 64 hex digits (the sha256 of the .wasm file)")
                ok = False
        else:
            ok = False
    policy = _get(f, "pull_policy", path, ck.string, "if_not_present")
    if policy not in PULL_POLICIES:
        ck.error(f["pull_policy"], f"{path}.pull_policy", f'must be {" or ".join(PULL_POLICIES)}, got "{policy}"')
        ok = False
    if kind == "file":
        location = str((base / wasm).resolve())
        if not Path(location).is_file():
            ck.error(f["wasm"], f"{path}.wasm", f"file not found: {location}")
            ok = False
    else:
        location = wasm
        if "sha256" not in f:
            ck.error(f["wasm"], f"{path}.wasm", f"a remote module ({kind}://) needs a sha256: pin beside it "
                     "(the hex sha256 of the .wasm; `sha256sum plugin.wasm`)")
            ok = False
        if not _remote_location_ok(ck, f["wasm"], f"{path}.wasm", kind, wasm):
            ok = False
    if not ok:
        return None
    return FilterSource(name, location, kind, pin, policy)


def _remote_location_ok(ck: _Checker, node: yaml.Node, path: str, kind: str, wasm: str) -> bool:
    if kind == "oci":
        from .oci import Reference
        try:
            Reference.parse(wasm)
        except ValueError as e:
            ck.error(node, path, str(e))
            return False
        return True
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(wasm)
        parts.port                           # noqa: B018  (raises on a bad port)
    except ValueError as e:
        ck.error(node, path, f"not a URL: {e}")
        return False
    if not parts.hostname:
        ck.error(node, path, "the URL has no host")
        return False
    return True


def _audit_log(ck: _Checker, node: yaml.Node, base: Path) -> str | None:
    if _is_null(node):
        return None
    f = ck.mapping(node, "audit_log", {"path"}, {"path"})
    if f is None or _is_null(f["path"]):
        return None
    name = ck.string(f["path"], "audit_log.path")
    if name is None:
        return None
    path = (base / name).resolve()
    if not path.parent.is_dir():
        ck.error(f["path"], "audit_log.path", f"directory does not exist: {path.parent}")
    return str(path)


def _filter_fetch(ck: _Checker, node: yaml.Node, path: str, base: Path) -> FetchSettings:
    d = FetchSettings()
    f = ck.mapping(node, path, {"cache_dir", "timeout_s", "max_bytes", "ca", "plain_http_registries",
                                "credentials"})
    if f is None:
        return d
    cache = _get(f, "cache_dir", path, ck.string)
    timeout = _get(f, "timeout_s", path, lambda n, p: ck.number(n, p, 0.001), d.timeout_s)
    max_bytes = _get(f, "max_bytes", path, lambda n, p: ck.integer(n, p, 1), d.max_bytes)
    ca = None
    if "ca" in f and (name := ck.string(f["ca"], f"{path}.ca")) is not None:
        ca = (base / name).resolve()
        try:
            check_ca(ca)
        except TlsError as e:
            ck.error(f["ca"], f"{path}.ca", e.message)
    plain = ()
    if "plain_http_registries" in f:
        items = ck.sequence(f["plain_http_registries"], f"{path}.plain_http_registries") or []
        plain = tuple(v.lower() for i, n in enumerate(items)
                      if (v := ck.string(n, f"{path}.plain_http_registries[{i}]")) is not None)
    creds = []
    if "credentials" in f:
        for i, item in enumerate(ck.sequence(f["credentials"], f"{path}.credentials") or []):
            c = _credential(ck, item, f"{path}.credentials[{i}]", base)
            if c is not None:
                creds.append(c)
    return FetchSettings(cache_dir=(base / cache).resolve() if cache else default_cache_dir(),
                         timeout_s=timeout, max_bytes=max_bytes, ca=ca, plain_http_registries=plain,
                         credentials=tuple(creds))


def _credential(ck: _Checker, node: yaml.Node, path: str, base: Path) -> RegistryCredential | None:
    """host + username + a password, or a token, each from `*_env` (a variable's name) or
    `*_file` (a file's path): never the secret itself in the config."""
    f = ck.mapping(node, path, {"host", "username", "password_env", "password_file", "token_env",
                                "token_file"}, {"host"})
    if f is None:
        return None
    host = _get(f, "host", path, ck.string)
    username = _get(f, "username", path, ck.string, "")
    password = _secret(ck, f, path, base, "password")
    token = _secret(ck, f, path, base, "token")
    if password is not None and not username:
        ck.error(node, path, "a password needs a username")
    if token is None and password is None:
        ck.error(node, path, "needs password_env / password_file (with username) or token_env / token_file")
    if host is None or (token is None and (password is None or not username)):
        return None
    return RegistryCredential(host.lower(), username, password or "", token or "")


def _secret(ck: _Checker, f: dict[str, yaml.Node], path: str, base: Path, what: str) -> str | None:
    env_key, file_key = f"{what}_env", f"{what}_file"
    if env_key in f and file_key in f:
        ck.error(f[file_key], f"{path}.{file_key}", f"use either {env_key} or {file_key}, not both")
        return None
    if env_key in f:
        var = ck.string(f[env_key], f"{path}.{env_key}")
        if var is None:
            return None
        value = os.environ.get(var)
        if not value:
            ck.error(f[env_key], f"{path}.{env_key}", f"environment variable {var} is not set")
        return value or None
    if file_key in f:
        name = ck.string(f[file_key], f"{path}.{file_key}")
        if name is None:
            return None
        file = (base / name).resolve()
        try:
            return file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as e:
            ck.error(f[file_key], f"{path}.{file_key}", f"cannot read {file}: {getattr(e, 'strerror', None) or e}")
    return None


_TOP = {"listeners", "admin", "limits", "access_log", "clusters", "routes", "filters", "shared_data",
        "internal_headers", "path_normalization", "filter_fetch", "default_capabilities", "audit_log",
        "node", "tracing"}


def parse_config(text: str, filename: str, base_dir: Path) -> Config:
    """Validate YAML text; raise ConfigError listing every problem."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError([f"{filename}:{line} invalid YAML: {problem}"]) from None
        ck = _Checker(filename, loader)
        if root is None:
            raise ConfigError([f"{filename}:1 the file is empty"])
        return _build(ck, root, base_dir)
    finally:
        loader.dispose()


def _build(ck: _Checker, root: yaml.Node, base_dir: Path) -> Config:
    top = ck.mapping(root, "", _TOP, {"listeners", "clusters", "routes"})
    if top is None:
        raise ConfigError(ck.errors)

    listeners: list[Listener] = []
    if "listeners" in top:
        items = ck.sequence(top["listeners"], "listeners") or []
        if isinstance(top["listeners"], yaml.SequenceNode) and not items:
            ck.error(top["listeners"], "listeners", "needs at least one listener")
        names = []
        for i, item in enumerate(items):
            lst = _listener(ck, item, f"listeners[{i}]", base_dir)
            names.append((_name_of(ck, item), item))
            if lst:
                listeners.append(lst)
        _unique_names(ck, names, "listeners")
        _unique_ports(ck, listeners, items)

    admin = _admin(ck, top["admin"], "admin", base_dir) if "admin" in top and not _is_null(top["admin"]) else None
    limits = _limits(ck, top["limits"], "limits", base_dir) if "limits" in top else Limits()

    access_log: str | None = "-"
    access_log_filters = True
    redact_params = Config.__dataclass_fields__["access_log_redact"].default
    if "access_log" in top:
        node = top["access_log"]
        if _is_null(node):
            access_log = None
        else:
            f = ck.mapping(node, "access_log", {"path", "redact_query_params", "filters"}, {"path"})
            if f is not None:
                access_log_filters = _get(f, "filters", "access_log", ck.boolean, True)
            if f is not None and "redact_query_params" in f:
                names = _name_list(ck, f["redact_query_params"], "access_log.redact_query_params",
                                   re.compile(r"^[^&=#\s]+$"), "a query parameter name")
                if names is not None:
                    redact_params = tuple(names)
            if f is not None and "path" in f:
                access_log = None if _is_null(f["path"]) else ck.string(f["path"], "access_log.path")
                if access_log not in (None, "-"):
                    access_log = str((base_dir / access_log).resolve())
                    if not Path(access_log).parent.is_dir():
                        ck.error(f["path"], "access_log.path", f"directory does not exist: {Path(access_log).parent}")

    clusters: list[Cluster] = []
    redis_clusters: list[RedisCluster] = []
    cluster_names: set[str] = set()
    redis_names: set[str] = set()
    if "clusters" in top:
        items = ck.sequence(top["clusters"], "clusters") or []
        names = []
        for i, item in enumerate(items):
            c = _cluster(ck, item, f"clusters[{i}]", base_dir)
            nm = _name_of(ck, item)
            names.append((nm, item))
            if nm:
                (redis_names if _type_of(ck, item) == "redis" else cluster_names).add(nm)
            if isinstance(c, RedisCluster):
                redis_clusters.append(c)
            elif c:
                clusters.append(c)
        _unique_names(ck, names, "clusters")

    audit_log = _audit_log(ck, top["audit_log"], base_dir) if "audit_log" in top else None
    default_caps = (_capabilities(ck, top["default_capabilities"], "default_capabilities")
                    if "default_capabilities" in top else None)
    fetch = _filter_fetch(ck, top["filter_fetch"], "filter_fetch", base_dir) if "filter_fetch" in top else FetchSettings()
    filters: list[FilterSpec] = []
    sources: list[FilterSource] = []
    filter_names: set[str] = set()
    if "filters" in top and not _is_null(top["filters"]):
        items = ck.sequence(top["filters"], "filters") or []
        names = []
        for i, item in enumerate(items):
            got = _filter(ck, item, f"filters[{i}]", base_dir, limits, fetch, default_caps)
            nm = _name_of(ck, item)
            names.append((nm, item))
            if nm:
                filter_names.add(nm)
            if got:
                filters.append(got[0])
                sources.append(got[1])
        _unique_names(ck, names, "filters")

    paths = PathPolicy()
    if "path_normalization" in top:
        paths = _path_normalization(ck, top["path_normalization"], "path_normalization")

    routes: list[Route] = []
    if "routes" in top:
        items = ck.sequence(top["routes"], "routes") or []
        if isinstance(top["routes"], yaml.SequenceNode) and not items:
            ck.error(top["routes"], "routes", "needs at least one route")
        names = []
        for i, item in enumerate(items):
            nm, r = _route(ck, item, f"routes[{i}]", cluster_names, filter_names, paths, redis_names,
                           {c.name for c in clusters if c.protocol == "grpc"})
            names.append((nm, item))
            if r:
                routes.append(r)
        _unique_names(ck, names, "routes")

    shared_max = 16777216
    if "shared_data" in top:
        f = ck.mapping(top["shared_data"], "shared_data", {"max_bytes"})
        if f:
            shared_max = _get(f, "max_bytes", "shared_data", lambda n, p: ck.integer(n, p, 0), shared_max)

    tracing = _tracing(ck, top["tracing"], "tracing") if "tracing" in top and not _is_null(top["tracing"]) \
        else Tracing()

    internal = Config.__dataclass_fields__["internal_headers"].default
    if "internal_headers" in top:
        names = _name_list(ck, top["internal_headers"], "internal_headers", _TOKEN, "a header name")
        if names is not None:
            internal = frozenset(names)
    node = _node(ck, top["node"], "node") if "node" in top and not _is_null(top["node"]) else NodeInfo()
    if ck.errors:
        raise ConfigError(ck.errors)
    raw = ck.value(root)
    return Config(source=Path(ck.filename), listeners=tuple(listeners), admin=admin, limits=limits,
                  access_log_path=access_log, clusters=tuple(clusters), routes=tuple(routes),
                  filters=tuple(filters), shared_data_max_bytes=shared_max, path_normalization=paths,
                  internal_headers=internal, access_log_redact=redact_params,
                  redis_clusters=tuple(redis_clusters), access_log_filters=access_log_filters,
                  tracing=tracing or Tracing(), node=node, filter_sources=tuple(sources),
                  filter_fetch=fetch, audit_log_path=audit_log, raw=raw)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _name_of(ck: _Checker, node: yaml.Node, key: str = "name") -> str | None:
    """The `name:` (or another string key) of a list item without reporting errors (used for
    reference checks)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.ScalarNode):
                val = ck.value(v)
                return val if isinstance(val, str) and val else None
    return None


def _type_of(ck: _Checker, node: yaml.Node) -> str:
    """A cluster's `type:` without reporting errors (the cluster's own check reports them)."""
    return _name_of(ck, node, "type") or "http"


def _unique_ports(ck: _Checker, listeners: list[Listener], items: list[yaml.Node]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for lst, item in zip(listeners, items):
        if lst.port == 0:
            continue          # port 0: the OS picks distinct ports
        key = (lst.address, lst.port)
        if key in seen:
            ck.error(item, f"listeners.{lst.name}.port", f'{lst.address}:{lst.port} is also used by listener "{seen[key]}"')
        seen[key] = lst.name


def load_config(path: str | Path, *, base_dir: Path | None = None) -> Config:
    """Read and validate a config file. Relative paths in it resolve against its directory."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text: {e.reason}"]) from None
    return parse_config(text, str(path), base_dir if base_dir is not None else p.resolve().parent)


def redact(value: Any, secret_context: bool = False) -> Any:
    """A copy of parsed YAML with values under secret-looking keys replaced by "[redacted]"."""
    if isinstance(value, dict):
        return {k: ("[redacted]" if _looks_secret(k) and not isinstance(v, (dict, list)) else redact(v, _looks_secret(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secret_context) for v in value]
    return "[redacted]" if secret_context else value


def _looks_secret(key: Any) -> bool:
    k = str(key).lower()
    return any(s in k for s in _SECRETS)
