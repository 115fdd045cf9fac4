"""The seam types between gateway/ and abi/: dataclasses, protocols and exceptions, nothing else.

The bottom of abi/: it imports no other abi module, so every abi module (and the facade
abi/api.py, the only module gateway/ imports) can take its types from here without a circle.

Headers cross as ``list[tuple[str, str]]`` (lower-case names, pseudo-headers first);
bodies as async iterators, so a chain that never touches a body hands it back untouched.

Trailers (optional, backward compatible): a body iterator may carry ``trailers`` (Headers or
None), read once the iterator is exhausted — set it in the de-chunker when the message had
HTTP/1.1 chunked trailers. The body the chain hands back carries the trailers after the
filters (``on_*_trailers``) the same way: read ``getattr(fwd.body, "trailers", None)`` after
iterating it and send them as chunked trailers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence

Headers = list[tuple[str, str]]
Body = AsyncIterator[bytes]


@dataclass(frozen=True)
class FilterLimits:
    memory_bytes: int = 64 * 1024 * 1024
    callback_ms: int = 100
    # Body bytes one filter may make the host hold while it pauses a body (Envoy's buffer
    # limit): over it the request gets 413, the response 500 (the gateway-wide default is
    # config limits.max_buffered_body_bytes).
    max_buffered_body_bytes: int = 1024 * 1024
    # Bytes of proxy_http_call callouts in flight per instance: request headers and bodies
    # until the call ends, plus response bodies being read and delivered.
    max_callout_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class FilterSpec:
    """One `filters:` entry of the config, resolved and encoded."""
    name: str
    wasm_path: Path
    configuration: bytes = b""
    vm_configuration: bytes = b""
    failure_policy: str = "fail_closed"          # "fail_closed" | "fail_open"
    limits: FilterLimits = field(default_factory=FilterLimits)
    environment: tuple[tuple[str, str], ...] = ()
    deliver_body_while_paused: bool = False       # False: Envoy (Pause in headers stops the body)
    root_id: str = ""                             # Envoy plugin root_id (property plugin_root_id);
                                                  # C++/AssemblyScript SDKs pick their root context by it
    vm_id: str = ""                               # Envoy vm_id (property plugin_vm_id): filters with
                                                  # the same one share shared data and queues; "" is
                                                  # the gateway-wide default VM
    # Host-function groups granted (names: abi/capabilities.py ALL, api.CAPABILITIES); None: all of them.
    capabilities: frozenset[str] | None = None
    strict_capabilities: bool = False             # refuse at load a module importing a denied function
    readable_properties: tuple[str, ...] | None = None   # property path prefixes it may read; None: all


@dataclass
class CallResponse:
    status: int
    headers: Headers
    body: bytes
    trailers: Headers = field(default_factory=list)


class CallFailed(Exception):
    """An HTTP callout failed: refused, reset or timed out. ``reason`` is short text."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RedisOptions:
    """What a filter's ``proxy_redis_init`` chose for one Redis cluster; an empty / 0 / None
    field keeps the cluster's own setting from the config."""
    username: str = ""
    password: str = field(default="", repr=False)
    database: int | None = None
    timeout_ms: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """The config's top-level ``node:`` (Envoy's bootstrap node): the ``node.*`` properties.
    ``metadata`` is a JSON-like tree (str, float, bool, list, dict; no null)."""
    id: str = ""
    cluster: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class GrpcReply:
    """How a unary gRPC call ended: its gRPC status code (0 OK, 4 DEADLINE_EXCEEDED,
    14 UNAVAILABLE, ...), the status message, and the response message (OK only)."""
    code: int
    message: str = ""
    response: bytes = b""


class GrpcStream(Protocol):
    """One open gRPC stream (HostServices.grpc_stream). ``events()`` yields, in order:
    ("initial", Headers) unless the call failed before the server answered, ("message", bytes)
    per message, ("trailing", Headers), then ("close", code, message) — always last."""

    def send(self, message: bytes, end_stream: bool) -> None: ...

    def close(self) -> None:
        """Half-close: no more messages from us; the server's keep coming."""
        ...

    def cancel(self) -> None:
        """Reset the stream; ``events()`` ends without a close event."""
        ...

    def events(self) -> AsyncIterator[tuple]: ...


class HostServices(Protocol):
    """What the gateway provides to the ABI host.

    The Redis and gRPC methods are optional: services without them have no Redis / gRPC
    clusters (every ``proxy_redis_*`` / ``proxy_grpc_*`` call then answers as for an unknown
    cluster). ``node`` is optional too (absent: ``node.id`` and ``node.cluster`` are "",
    ``node.metadata`` empty)."""
    log: logging.Logger
    node: NodeInfo

    def has_cluster(self, name: str) -> bool: ...

    async def http_call(self, cluster: str, method: str, path: str, authority: str,
                        headers: Headers, body: bytes, timeout_s: float | None,
                        reserve: Callable[[int], bool] | None = None) -> CallResponse:
        """Raise CallFailed on refuse/reset/timeout.

        ``reserve(n)`` is asked before each response body chunk of n bytes is kept; False
        (the filter's callout bytes would pass max_callout_bytes) → stop reading and raise
        CallFailed: the response is too large to deliver."""
        ...

    def has_redis_cluster(self, name: str) -> bool: ...

    def redis_call(self, cluster: str, query: bytes, options: RedisOptions) -> Awaitable[bytes]:
        """Send one RESP-encoded command; a future (or coroutine) of Redis's reply as it was on
        the wire (an error reply is a reply). It raises CallFailed on refuse/reset/timeout (the
        cluster's or ``options.timeout_ms``). A future spares the host a task per call."""
        ...

    # gRPC callouts (optional, like the Redis methods: without them no cluster is a gRPC one).

    def has_grpc_cluster(self, name: str) -> bool: ...

    async def grpc_call(self, cluster: str, path: str, metadata: Headers, message: bytes,
                        timeout_s: float | None) -> GrpcReply:
        """One unary call to ``path`` ("/package.Service/Method"); every failure (refused,
        timeout, error status) is a GrpcReply with its code, never an exception."""
        ...

    def grpc_stream(self, cluster: str, path: str, metadata: Headers) -> GrpcStream: ...


class HostObserver(Protocol):
    """Opt-in instrumentation for `wasmgate try` and the pytest plugin (wasmgate/harness.py):
    a HostServices with an ``observer`` attribute gets every host call and guest callback of
    its filters reported. The wrapping happens when a filter links its instance, so a gateway
    (no observer) pays nothing per call.

    ``manual_ticks``: the tick timer never fires by itself; ``FilterHost.tick(name)`` delivers
    one. ``now_ns``: the clock the filters read (proxy_get_current_time_nanoseconds)."""
    manual_ticks: bool

    def now_ns(self) -> int: ...

    def host_call(self, filter_name: str, name: str, result: int | None, ns: int) -> None: ...

    def guest_call(self, filter_name: str, name: str, ns: int) -> None: ...


class TlsFacts(Protocol):
    """A downstream TLS connection, for the connection.* properties (Envoy's names and meanings).
    Strings are "" when there is nothing to say (no SNI, no client certificate, no SAN)."""
    version: str                          # "TLSv1.2" | "TLSv1.3"
    requested_server_name: str            # SNI as the client sent it
    mtls: bool                            # the client presented a certificate (verified by client_ca)
    subject_local_certificate: str        # RFC 2253, as Envoy prints it: "CN=a,O=b"
    subject_peer_certificate: str
    dns_san_local_certificate: str        # the first DNS SAN
    dns_san_peer_certificate: str
    uri_san_local_certificate: str        # the first URI SAN
    uri_san_peer_certificate: str
    sha256_peer_certificate_digest: str   # lower-case hex of the peer certificate's DER


@dataclass
class StreamInfo:
    """Facts about one request, from which properties (§4.4) are answered."""
    request_id: str
    route_name: str
    cluster_name: str
    client_addr: tuple[str, int]
    local_addr: tuple[str, int]
    connection_id: int
    scheme: str = "http"
    protocol: str = "HTTP/1.1"
    start_time_ns: int = 0
    tls: TlsFacts | None = None           # None on a plain connection
    trace: bool = False                   # record the per-request filter trace (abi/trace.py);
                                          # the stream's trace_summary() formats it
    # The route's and its cluster's `metadata:` ({namespace: {key: value}}, Envoy's
    # filter_metadata), for the route_metadata / cluster_metadata properties. The gateway
    # updates these four route fields in place when it re-matches the route after the
    # request headers (HttpStream.route_cache_cleared, or a filter changed what routes match on).
    route_metadata: Mapping[str, Mapping[str, Any]] | None = None
    cluster_metadata: Mapping[str, Mapping[str, Any]] | None = None


@dataclass
class LogInfo:
    """Facts known when the request is over (for response.* properties and on_log)."""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ns: int = 0
    upstream_address: str = ""


@dataclass
class LocalReply:
    """A filter answered the request itself, or failed closed."""
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    details: str = ""


@dataclass
class Forward:
    """Go on with these headers and this body.

    Iterating ``body`` may raise LocalReplyInterrupt: on the request side abort the upstream
    request and send the reply; on the response side send it if nothing went downstream yet,
    else close the client connection.
    """
    headers: Headers
    body: Body | None


class LocalReplyInterrupt(Exception):
    def __init__(self, reply: LocalReply):
        super().__init__(f"local reply {reply.status}")
        self.reply = reply


class FilterLoadError(Exception):
    """A filter could not be loaded; the message names the filter, its file and the cause."""

    def __init__(self, filter_name: str, message: str):
        super().__init__(f'filter "{filter_name}": {message}')
        self.filter_name = filter_name
        self.message = message


@dataclass
class MetricSample:
    """One Prometheus sample: ``name{labels} value`` with its type for # TYPE lines."""
    name: str
    kind: str                      # "counter" | "gauge" | "histogram"
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    help: str = ""


class HttpStream(Protocol):
    # Set by proxy_clear_route_cache (ABI 0.1.0) or the foreign function clear_route_cache
    # during the request phase (Envoy's clearRouteCache): the gateway re-matches the route once the request headers passed the
    # chain, even when no header that routes match on changed.
    route_cache_cleared: bool

    async def request(self, headers: Headers, body: Body | None) -> Forward | LocalReply: ...
    async def response(self, status: int, headers: Headers, body: Body | None) -> Forward | LocalReply: ...
    async def finish(self, log: LogInfo) -> None: ...
    # StreamInfo.trace: the per-filter summary (abi/trace.py's format), "" when not traced;
    # and (filter, phase, action, calls, first start, last end in perf_counter_ns) per phase.
    def trace_summary(self) -> str: ...
    def trace_phases(self) -> list[tuple[str, str, str, int, int, int]]: ...


class FilterHostProtocol(Protocol):
    def stream(self, filter_names: Sequence[str], info: StreamInfo) -> HttpStream: ...   # a route's tuple as is
    def metrics(self) -> list[MetricSample]: ...
    def tick(self, filter_name: str) -> bool: ...   # one proxy_on_tick now (HostObserver.manual_ticks)
    async def close(self) -> None: ...
