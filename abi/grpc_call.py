"""gRPC callouts (reference §1.2 rows 21-25): ``proxy_grpc_call`` / ``_stream`` / ``_send`` /
``_close`` / ``_cancel`` and the callbacks ``proxy_on_grpc_receive_initial_metadata``,
``proxy_on_grpc_receive``, ``proxy_on_grpc_receive_trailing_metadata``, ``proxy_on_grpc_close``
— as Envoy's wasm ``Context`` (source/extensions/common/wasm/context.cc) behaves:

- calls and streams belong to the ROOT context (cpp-host ``grpc_call`` uses
  ``contextOrEffectiveContext()->root_context()``): every callback is ``(root_id, token, n)``;
- ``grpc_service`` is a serialized ``envoy.config.core.v3.GrpcService`` or, as the SDKs pass
  it, a cluster name (Envoy parses the proto and falls back to the name); an unknown cluster is
  PARSE_FAILURE;
- a unary call ends with ``on_grpc_receive(size)`` (OK: the response is buffer 5) or with
  ``on_grpc_close(code)`` (anything else: ``proxy_get_status`` gives code and message) — never
  both, and no metadata callbacks (Envoy's ``GrpcCallClientHandler`` has none);
- a stream delivers initial metadata (map 4), each message (buffer 5), trailing metadata
  (map 5) and ``on_grpc_close(code)``, each readable only during its callback;
- a timeout is DEADLINE_EXCEEDED (4), a refused connection UNAVAILABLE (14), both via
  ``on_grpc_close``, as any error status the server sent;
- ``grpc_send`` on a unary token is BAD_ARGUMENT; ``grpc_close`` cancels a call and half-closes
  a stream (its answers keep coming); ``grpc_cancel`` resets either, with no callback after.
  Unknown tokens: NOT_FOUND.

Tokens carry the callout type in their low 2 bits as cpp-host's ``CalloutType`` (call 1,
stream 2; HTTP callouts 0, Higress Redis calls 3), so no two callouts of an instance share one.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from . import limits
from .seam import GrpcReply, GrpcStream, Headers
from .buffers import BodyBuffer, HeaderMap
from .enums import MapType, Status
from .context import Context, FilterView

CALL, STREAM = 1, 2              # token & 3
INTERNAL, UNAVAILABLE = 13, 14   # gRPC status codes the host itself reports
_U32 = 0xFFFFFFFF


@dataclass
class _Callout:
    origin: int                               # context id that dispatched it
    generation: int
    task: asyncio.Task | None = None
    stream: GrpcStream | None = None
    local_closed: bool = False
    early: list[tuple[bytes | None, bool]] = field(default_factory=list)   # sent before the stream opened


def _fields(data: bytes) -> dict[int, list[bytes | int]] | None:
    """The fields of one protobuf message (wire types 0, 1, 2, 5); None if it is not one."""
    out: dict[int, list[bytes | int]] = {}
    pos, end = 0, len(data)

    def varint() -> int | None:
        nonlocal pos
        shift = value = 0
        while pos < end and shift < 64:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
        return None

    while pos < end:
        key = varint()
        if key is None or key >> 3 == 0:
            return None
        kind = key & 7
        if kind == 0:
            value = varint()
        elif kind == 2:
            size = varint()
            if size is None or pos + size > end:
                return None
            value, pos = data[pos:pos + size], pos + size
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            if pos + width > end:
                return None
            value, pos = data[pos:pos + width], pos + width
        else:
            return None
        if value is None:
            return None
        out.setdefault(key >> 3, []).append(value)
    return out


def service_target(grpc_service: bytes, known) -> tuple[str, Headers, float | None] | None:
    """(cluster, initial metadata, timeout) named by proxy_grpc_call's ``grpc_service``: a
    cluster name, or a serialized GrpcService {envoy_grpc = 1 {cluster_name = 1}, timeout = 3
    {seconds = 1, nanos = 2}, initial_metadata = 5 {key = 1, value = 2}}. None: neither names
    a gRPC cluster (Envoy: PARSE_FAILURE)."""
    name = grpc_service.decode("utf-8", "replace")
    if known(name):
        return name, [], None
    top = _fields(grpc_service)
    envoy = top.get(1) if top else None
    inner = _fields(envoy[0]) if envoy and isinstance(envoy[0], bytes) else None
    cluster = inner.get(1) if inner else None
    if not cluster or not isinstance(cluster[0], bytes):
        return None
    name = cluster[0].decode("utf-8", "replace")
    if not known(name):
        return None
    metadata: Headers = []
    for item in top.get(5, []):
        kv = _fields(item) if isinstance(item, bytes) else None
        if kv and isinstance(kv.get(1, [0])[0], bytes):
            metadata.append((kv[1][0].decode("latin-1").lower(),
                             kv.get(2, [b""])[0].decode("latin-1") if isinstance(kv.get(2, [b""])[0], bytes) else ""))
    timeout = None
    duration = _fields(top[3][0]) if 3 in top and isinstance(top[3][0], bytes) else None
    if duration:
        seconds = duration.get(1, [0])[0]
        nanos = duration.get(2, [0])[0]
        if isinstance(seconds, int) and isinstance(nanos, int) and (seconds or nanos):
            timeout = seconds + nanos / 1e9
    return name, metadata, timeout


def _lower(metadata: Headers) -> Headers:
    return [(k.lower(), v) for k, v in metadata]


class GrpcCalls:
    """One filter instance's gRPC calls and streams, and what their callbacks may read."""

    def __init__(self, f: FilterView):
        self.f = f
        self.pending: dict[int, _Callout] = {}
        self.received: bytes | None = None                   # buffer 5 during on_grpc_receive
        self.metadata: tuple[int, HeaderMap] | None = None    # (map type 4 | 5, map) during its callback
        self._next = 1

    def _known(self, name: str) -> bool:
        # (services change on a config reload: looked up each time)
        has = getattr(self.f.services, "has_grpc_cluster", None)
        return has is not None and has(name)

    def _token(self, kind: int) -> int:
        while True:
            n = self._next
            self._next = (n + 1) & (_U32 >> 2) or 1
            token = (n << 2) | kind
            if token not in self.pending:
                return token

    def _open(self, ctx: Context, grpc_service: bytes, kind: int) -> tuple[int, int, tuple | None]:
        """Common checks of grpc_call / grpc_stream: (status, token, target)."""
        f = self.f
        if f.closed:
            return Status.INTERNAL_FAILURE, 0, None
        target = service_target(grpc_service, self._known)
        if target is None:
            return Status.PARSE_FAILURE, 0, None
        if len(self.pending) + len(f._held) >= limits.MAX_PENDING_CALLS:
            return Status.INTERNAL_FAILURE, 0, None      # a filter dispatching in a loop
        token = self._token(kind)
        self.pending[token] = _Callout(ctx.id, f.generation)
        f.track_callout(ctx, token)
        return Status.OK, token, target

    def call(self, ctx: Context, grpc_service: bytes, service: str, method: str,
             metadata: Headers, message: bytes, timeout_ms: int) -> tuple[int, int]:
        """proxy_grpc_call: (status, token); the answer comes later, to the root context."""
        status, token, target = self._open(ctx, grpc_service, CALL)
        if status != Status.OK:
            return status, 0
        cluster, extra, service_timeout = target
        timeout = timeout_ms / 1000 if timeout_ms else service_timeout
        path = f"/{service}/{method}"
        entry = self.pending[token]

        def start() -> None:             # (from a start sequence: at the swap, see Filter.on_loop)
            if self.pending.get(token) is entry:
                entry.task = self.f.loop.create_task(
                    self._run_call(token, cluster, path, extra + _lower(metadata), message, timeout))
        self.f.on_loop(start)
        return Status.OK, token

    def stream(self, ctx: Context, grpc_service: bytes, service: str, method: str,
               metadata: Headers) -> tuple[int, int]:
        """proxy_grpc_stream: (status, token); messages go with grpc_send."""
        status, token, target = self._open(ctx, grpc_service, STREAM)
        if status != Status.OK:
            return status, 0
        cluster, extra, _timeout = target      # (Envoy: streams have no timeout)
        path = f"/{service}/{method}"
        entry = self.pending[token]

        def start() -> None:             # (from a start sequence: at the swap)
            if self.pending.get(token) is not entry:
                return
            stream = entry.stream = self.f.services.grpc_stream(cluster, path, extra + _lower(metadata))
            for message, end in entry.early:
                if message is None:
                    stream.close()
                else:
                    stream.send(message, end)
            entry.early.clear()
            entry.task = self.f.loop.create_task(self._run_stream(token, stream))
        self.f.on_loop(start)
        return Status.OK, token

    def send(self, token: int, message: bytes, end_stream: bool) -> int:
        if token & 1:                    # Envoy: an odd token is a call's, never a stream's
            return Status.BAD_ARGUMENT
        entry = self.pending.get(token)
        if entry is None:
            return Status.NOT_FOUND
        if entry.local_closed:
            return Status.OK                    # (Envoy writes to a half-closed stream: dropped)
        entry.local_closed = end_stream
        if entry.stream is None:
            entry.early.append((message, end_stream))
        else:
            entry.stream.send(message, end_stream)
        return Status.OK

    def close(self, token: int) -> int:
        entry = self.pending.get(token)
        if entry is None:
            return Status.NOT_FOUND
        if token & 3 == CALL:
            return self.cancel(token)
        if not entry.local_closed:
            entry.local_closed = True
            if entry.stream is None:
                entry.early.append((None, True))
            else:
                entry.stream.close()
        return Status.OK

    def cancel(self, token: int) -> int:
        entry = self.pending.pop(token, None)
        if entry is None:
            return Status.NOT_FOUND
        self._stop(entry)
        self.f.untrack_callout(entry.origin, token)
        return Status.OK

    @staticmethod
    def _stop(entry: _Callout) -> None:
        if entry.stream is not None:
            entry.stream.cancel()
        if entry.task is not None:
            entry.task.cancel()

    def drop(self, token: int) -> None:
        """The dispatching request is gone (as its HTTP callouts): nowhere for answers to go."""
        entry = self.pending.pop(token, None)
        if entry is not None:
            self._stop(entry)

    def cancel_all(self) -> None:
        """The instance is gone (trap, close): its callouts' answers have nowhere to go."""
        for entry in self.pending.values():
            self._stop(entry)
        self.pending.clear()

    # -- answers (tasks on the event loop: always between guest calls) -------------------------

    async def _run_call(self, token: int, cluster: str, path: str, metadata: Headers,
                        message: bytes, timeout: float | None) -> None:
        try:
            reply = await self.f.services.grpc_call(cluster, path, metadata, message, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:           # noqa: BLE001 — a gateway bug is a failed call here
            self.f.log.error('filter "%s": grpc call to %s failed: %r', self.f.name, cluster, e)
            reply = GrpcReply(INTERNAL, "internal error")
        if not self._finish(token):
            return
        if reply.code == 0:
            self._receive(token, reply.response)
        else:
            self._close(token, reply.code, reply.message)

    async def _run_stream(self, token: int, stream: GrpcStream) -> None:
        entry = self.pending.get(token)
        try:
            async for event in stream.events():
                if self.pending.get(token) is not entry:
                    return
                kind = event[0]
                if kind == "message":
                    self._receive(token, event[1])
                elif kind == "close":
                    if self._finish(token):
                        self._close(token, event[1], event[2])
                    return
                else:
                    self._metadata(token, MapType.GRPC_RECEIVE_INITIAL_METADATA if kind == "initial"
                                   else MapType.GRPC_RECEIVE_TRAILING_METADATA, event[1])
        except asyncio.CancelledError:
            raise
        except Exception as e:           # noqa: BLE001 — a gateway bug ends the stream
            self.f.log.error('filter "%s": grpc stream failed: %r', self.f.name, e)
            if self._finish(token):
                self._close(token, INTERNAL, "internal error")

    def _finish(self, token: int) -> bool:
        """The callout's last event: forget it; False if it was cancelled or its instance is gone."""
        entry = self.pending.pop(token, None)
        if entry is None:
            return False
        self.f.untrack_callout(entry.origin, token)
        return entry.generation == self.f.generation and self.f.root is not None

    def _live(self) -> bool:
        return self.f.root is not None and not self.f.closed

    def _receive(self, token: int, data: bytes) -> None:
        if not self._live() or not self.f.has("proxy_on_grpc_receive"):
            return
        self.received = data
        try:
            self.f.notify_root("proxy_on_grpc_receive", token, len(data))
        finally:
            self.received = None

    def _metadata(self, token: int, map_type: int, pairs: Headers) -> None:
        name = ("proxy_on_grpc_receive_initial_metadata"
                if map_type == MapType.GRPC_RECEIVE_INITIAL_METADATA
                else "proxy_on_grpc_receive_trailing_metadata")
        if not self._live() or not self.f.has(name):
            return
        self.metadata = (map_type, HeaderMap([(k.lower(), v) for k, v in pairs]))
        try:
            self.f.notify_root(name, token, len(pairs))
        finally:
            self.metadata = None

    def _close(self, token: int, code: int, message: str) -> None:
        if not self._live() or not self.f.has("proxy_on_grpc_close"):
            return
        self.f.call_status = (code, message)
        try:
            self.f.notify_root("proxy_on_grpc_close", token, code)
        finally:
            self.f.call_status = (Status.OK, "")

    def buffer(self) -> BodyBuffer | None:
        return BodyBuffer(False, self.received) if self.received is not None else None
