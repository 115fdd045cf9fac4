"""Root and HTTP context state: what the host functions act on (cpp-host ContextBase).

Host functions (hostcalls.py) unmarshal guest memory and call exactly one method here; the
behaviour of the host lives in these classes, the chain (chain.py) and the filter (filter.py).

The contexts call back on their filter and chain, which sit above this module (they build the
contexts): ``FilterView`` and ``ChainView`` below say what of them the contexts — and the host
functions, WASI, foreign functions and callouts, which take the filter — rely on, so none of
them imports filter.py or chain.py (nor does capabilities.py).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .seam import FilterSpec, HostServices, LocalReply
from .buffers import BodyBuffer, HeaderMap
from .engine import ContextCore
from .enums import BufferType, MapType, Status, StreamType
from .limits import MAX_HEADER_MAP_BYTES, MAX_PROPERTY_BYTES
from .properties import PropertySource, RootFacts, get_property, set_property
from .shared_store import VmStore

REQUEST = StreamType.HTTP_REQUEST
RESPONSE = StreamType.HTTP_RESPONSE


@dataclass
class CalloutData:
    """An HTTP-call response, readable (map 6/7, buffer 4) only during its callback."""
    headers: HeaderMap
    body: BodyBuffer
    trailers: HeaderMap


class Context:
    """Behaviour common to every context of one filter instance."""
    is_root = False
    failure: str | None = None      # how a callback on it failed (trap kind), for the trace
    chain: ChainView | None = None  # the request's chain (HTTP contexts; the header edits read it)

    def __init__(self, filter: FilterView, context_id: int, generation: int):
        self.filter = filter
        self.id = context_id
        self.generation = generation
        self.props: PropertySource

    @property
    def root(self) -> "RootContext":
        return self.filter.root

    @property
    def alive(self) -> bool:
        return self.generation == self.filter.generation

    # -- maps ----------------------------------------------------------------------------

    def get_map(self, map_type: int) -> HeaderMap | None:
        callout = self.filter.callout
        if callout is not None:
            if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
                return callout.headers
            if map_type == MapType.HTTP_CALL_RESPONSE_TRAILERS:
                return callout.trailers
        grpc_md = self.filter.grpc.metadata
        if grpc_md is not None and grpc_md[0] == map_type:
            return grpc_md[1]
        return None

    def writable_map(self, map_type: int) -> HeaderMap | None:
        return None

    # -- buffers ---------------------------------------------------------------------------

    def get_buffer(self, buffer_type: int) -> BodyBuffer | None:
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY and self.filter.callout is not None:
            return self.filter.callout.body
        if buffer_type == BufferType.GRPC_RECEIVE_BUFFER and self.filter.grpc.received is not None:
            return self.filter.grpc.buffer()
        if buffer_type == BufferType.REDIS_CALL_RESPONSE and self.filter.redis.response is not None:
            return BodyBuffer(writable=False, data=self.filter.redis.response)
        if buffer_type == BufferType.VM_CONFIGURATION:
            return BodyBuffer(writable=False, data=self.filter.spec.vm_configuration)
        if buffer_type == BufferType.PLUGIN_CONFIGURATION and self.filter.configuring:
            return BodyBuffer(writable=False, data=self.filter.spec.configuration)
        return None

    # -- properties ----------------------------------------------------------------------

    def get_property(self, path: bytes) -> bytes | None:
        return get_property(self.props, path)

    def set_property(self, path: bytes, value: bytes) -> int:
        if not set_property(self.props, path, value):
            return self.host_limit("proxy_set_property", f"properties past {MAX_PROPERTY_BYTES} bytes")
        return Status.OK

    def map_over_limit(self, call: str, map_type: int) -> int:
        return self.host_limit(call, f"header map {map_type} grown past {MAX_HEADER_MAP_BYTES} bytes")

    def host_limit(self, call: str, what: str) -> int:
        """An edit was refused: it would grow host state past a fixed bound (abi/limits.py).
        The guest gets OK (its SDK accepts nothing else); counted, logged once per context."""
        if not getattr(self, "limit_hit", False):
            self.limit_hit = True
            self.filter.record_soft_failure(call, "host_limit", what)
        return Status.OK

    # -- stream control (meaningful for HTTP contexts only) -------------------------------

    def continue_stream(self, stream_type: int) -> int:
        return Status.BAD_ARGUMENT if stream_type > StreamType.UPSTREAM else Status.OK

    def close_stream(self, stream_type: int) -> int:
        return Status.BAD_ARGUMENT if stream_type > StreamType.UPSTREAM else Status.OK

    def clear_route_cache(self) -> int:
        # No stream, no route (root context): nothing to clear, as on Envoy.
        return Status.OK

    def send_local_response(self, reply: LocalReply, grpc_status: int) -> int:
        # No stream to answer (root context): Envoy has no decoder callbacks and ignores it.
        self.filter.log.debug("filter %s: send_local_response outside a request ignored",
                              self.filter.name)
        return Status.OK


class VmContext(Context):
    """Context id 0: what host calls made during _initialize/_start act on."""

    def __init__(self, filter: FilterView, generation: int):
        super().__init__(filter, 0, generation)
        self.props = PropertySource(filter.name, RootFacts(), filter.spec.root_id, filter.spec.vm_id, filter)


class RootContext(Context):
    is_root = True

    def __init__(self, filter: FilterView, context_id: int, generation: int):
        super().__init__(filter, context_id, generation)
        self.props = PropertySource(filter.name, RootFacts(), filter.spec.root_id, filter.spec.vm_id, filter)


# Map types 0..3 → the chain attribute holding that map.
STREAM_MAPS = {MapType.HTTP_REQUEST_HEADERS: "request_headers",
                MapType.HTTP_RESPONSE_HEADERS: "response_headers",
                MapType.HTTP_REQUEST_TRAILERS: "request_trailers",
                MapType.HTTP_RESPONSE_TRAILERS: "response_trailers"}
LAST_STREAM_MAP = MapType.HTTP_RESPONSE_TRAILERS


class _ContextFields:
    """What an HttpContext is built with. _crossing.c's ContextCore does the same in C (no
    Python frame per request and filter): this is the reference, and the base without it."""

    def __init__(self, filter: FilterView, context_id: int, generation: int, chain: ChainView):
        self.filter = filter
        self.id = context_id
        self.generation = generation
        # Set to None when the context is released (Filter.finish_context): no chain ↔
        # context cycle is left, so a finished request is freed by reference counting instead
        # of the cyclic GC, and no host call can act on it any more (it is no longer current,
        # effective or findable by id).
        self.chain: ChainView | None = chain
        self.bodies: list[BodyBuffer | None] = [None, None]      # [request, response]
        self.resumed = [False, False]
        self.pending_calls: set[int] = set()


class HttpContext(ContextCore or _ContextFields, Context):     # type: ignore[misc]
    """One request through one filter.

    Built for every request and filter, so it is kept light: its fields are set in C
    (ContextCore, as _ContextFields does), the property view (``props``) is made on first use.
    """

    _props: PropertySource | None = None
    waiter: asyncio.Future[Any] | None = None    # set while the chain waits for a resume

    @property
    def props(self) -> PropertySource:              # type: ignore[override]
        src = self._props
        if src is None:
            f = self.filter
            src = self._props = PropertySource(f.name, self.chain, f.spec.root_id, f.spec.vm_id, f)
        return src

    def get_map(self, map_type: int) -> HeaderMap | None:
        if map_type <= LAST_STREAM_MAP:
            return getattr(self.chain, STREAM_MAPS[map_type])
        return super().get_map(map_type)

    edited = False                  # a header edit was asked for (the trace's m=h)

    def writable_map(self, map_type: int) -> HeaderMap | None:
        # Trailers exist only when the message has some (HTTP/1.1 chunked trailers).
        self.edited = True
        return getattr(self.chain, STREAM_MAPS[map_type]) if map_type <= LAST_STREAM_MAP else None

    def _stream_map(self, map_type: int) -> HeaderMap | None:
        return getattr(self.chain, STREAM_MAPS[map_type])

    def get_buffer(self, buffer_type: int) -> BodyBuffer | None:
        if buffer_type <= BufferType.HTTP_RESPONSE_BODY:
            return self.bodies[buffer_type]
        return super().get_buffer(buffer_type)

    def continue_stream(self, stream_type: int) -> int:
        if stream_type <= RESPONSE:
            self.resumed[stream_type] = True
            self.wake()
            return Status.OK
        return super().continue_stream(stream_type)

    def close_stream(self, stream_type: int) -> int:
        if stream_type <= RESPONSE:
            # The seam cannot reset a stream; the nearest equivalent is a reply that never
            # reaches the upstream (Envoy: resetStream, details "wasm_close_stream").
            self.chain.set_reply(LocalReply(503, [], b"", "wasm_close_stream"))
            self.wake()
            return Status.OK
        return super().close_stream(stream_type)

    def clear_route_cache(self) -> int:
        # Envoy's clearRouteCache: the gateway matches the route again after the request headers.
        self.chain.route_cache_cleared = True
        return Status.OK

    def send_local_response(self, reply: LocalReply, grpc_status: int) -> int:
        self.chain.set_reply(self.chain.shape_reply(reply, grpc_status))
        self.wake()
        return Status.OK

    def host_limit(self, call: str, what: str) -> int:
        self.chain.host_limit(self, call, what)
        self.wake()
        return Status.OK

    def body_over_limit(self, buffer_type: int) -> int:
        """set_buffer_bytes would grow a body past max_buffered_body_bytes: nothing is written
        and the stream ends as when the host's own buffering overflows (413 / 500). OK for the
        guest: the SDKs accept nothing else from set_buffer_bytes."""
        # Body buffer types 0 / 1 are the request / response, as the chain's directions.
        self.chain.set_reply(self.chain.too_large(self.filter, buffer_type))
        self.wake()
        return Status.OK

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


# -- what the contexts and host functions call back on -------------------------------------

class ChainView(Protocol):
    """The request's chain (chain.Chain) as its HTTP contexts call back on it."""
    route_cache_cleared: bool

    def set_reply(self, reply: LocalReply) -> None: ...
    def shape_reply(self, reply: LocalReply, grpc_status: int) -> LocalReply: ...
    def host_limit(self, ctx: HttpContext, call: str, what: str) -> None: ...
    def too_large(self, f: FilterView, direction: int) -> LocalReply: ...
    # filter i's headers callback, whole (Filter.headers hands it over)
    def _headers(self, i: int, f: FilterView, ctx: HttpContext, direction: int, eos: bool) -> int: ...


class FilterView(Protocol):
    """One filter instance (filter.Filter) as its contexts, the host functions (hostcalls.py,
    wasi.py, foreign.py) and its callouts (grpc_call.py, redis_call.py) use it."""
    spec: FilterSpec
    name: str
    services: HostServices
    log: logging.Logger
    store: VmStore
    loop: asyncio.AbstractEventLoop
    generation: int
    root: RootContext | None
    callout: CalloutData | None
    call_status: tuple[int, str]
    abi_010: bool
    configuring: bool
    starting: bool
    closed: bool
    has: Callable[[str], bool]                  # does the module export this callback?
    now_ns: Callable[[], int]
    grpc: Any                                   # grpc_call.GrpcCalls (which imports this module)
    redis: Any                                  # redis_call.RedisCalls (likewise)
    _held: list[Callable[[], None]]             # loop actions waiting for a build's swap

    @property
    def ctx(self) -> Context: ...               # the context a host call acts on
    # what ctx() reads, for the header edits, which inline it (each frame counts there)
    _effective: Context | None
    _current: Context | None
    _vm_ctx: Context
    _mem: Any                                   # engine.Memory once the instance is built
    # guest memory
    def read(self, ptr: int, size: int) -> bytes: ...
    def read_prefix(self, ptr: int, size: int, cap: int) -> bytes: ...
    def write(self, ptr: int, data: bytes) -> None: ...
    def write_u32(self, ptr: int, value: int) -> None: ...
    def write_u64(self, ptr: int, value: int) -> None: ...
    def check_out(self, ptr: int, size: int) -> None: ...
    def write_result(self, data: bytes, ret_pp: int, ret_size_p: int) -> int: ...
    # logging and failures
    def guest_log(self, level: int, message: bytes, total: int) -> None: ...
    def guest_stdio(self, fd: int, data: bytes, total: int) -> None: ...
    def host_error(self, name: str, e: Exception) -> None: ...
    def record_soft_failure(self, callback: str, kind: str, message: str) -> None: ...
    def capability_denied(self, what: str, group: str) -> None: ...
    # the instance's own state and its calls out
    def set_effective_context(self, context_id: int) -> int: ...
    def proxy_done(self, ctx: Context) -> int: ...
    def set_tick_period(self, period_ms: int) -> None: ...
    def http_call(self, ctx: Context, cluster: str, headers: list[tuple[str, str]], body: bytes,
                  timeout_ms: int) -> tuple[int, int]: ...
    def track_callout(self, ctx: Context, token: int) -> None: ...
    def untrack_callout(self, origin_id: int, token: int) -> None: ...
    def register_queue(self, name: str) -> int: ...
    def on_loop(self, action: Callable[[], None]) -> None: ...
    def notify_root(self, name: str, *args: int) -> None: ...
