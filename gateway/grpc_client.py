"""One `protocol: grpc` cluster: a grpc.aio channel (gRPC's C core does HTTP/2, h2c or TLS,
deadlines, status and metadata) used with raw bytes — no generated code, no protobuf: the
filter's bytes are the message, as Envoy's ``sendRaw`` / ``startRaw``.

The channel is made on first use, on the worker's running event loop (grpc.aio binds a channel
to the loop it was made on, and gRPC's threads must not cross a fork: the supervisor never
imports this module).
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import AsyncIterator

# gRPC's C core logs connection events (a server's GOAWAY...) to stderr at INFO, outside the
# gateway's log; its errors stay visible. Read once, when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from abi.api import GrpcReply, Headers

from .config import Cluster

INTERNAL = 13


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


def _md_out(metadata: Headers) -> tuple[tuple[str, str | bytes], ...]:
    # gRPC carries "-bin" metadata as bytes (base64 on the wire); the filter gave latin-1 text.
    return tuple((k, v.encode("latin-1") if k.endswith("-bin") else v) for k, v in metadata)


def _md_in(metadata) -> Headers:
    return [(k, v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in (metadata or ())]


def target(cluster: Cluster) -> str:
    """gRPC's target for the endpoints: one "host:port" (gRPC resolves a name itself), or an
    address list (config.py requires IP addresses then), balanced round robin."""
    eps = cluster.endpoints
    if len(eps) == 1:
        host = eps[0].host
        return f"[{host}]:{eps[0].port}" if ":" in host else f"{host}:{eps[0].port}"
    if all(":" in e.host for e in eps):
        return "ipv6:" + ",".join(f"[{e.host}]:{e.port}" for e in eps)
    return "ipv4:" + ",".join(f"{e.host}:{e.port}" for e in eps)


class GrpcClusterClient:
    def __init__(self, cfg: Cluster):
        self.cfg = cfg
        self.counts: Counter[str] = Counter()       # gRPC status name -> calls and streams ended
        self._channel: aio.Channel | None = None
        self._unary: dict[str, aio.UnaryUnaryMultiCallable] = {}

    def _options(self) -> list[tuple[str, object]]:
        cfg = self.cfg
        opts: list[tuple[str, object]] = [
            # A refused endpoint is retried after eject_ms at most (gRPC's default grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", max(1, min(1000, cfg.eject_ms))),
            ("grpc.max_reconnect_backoff_ms", max(1, cfg.eject_ms)),
            ("grpc.min_reconnect_backoff_ms", max(1, min(cfg.connect_timeout_ms, cfg.eject_ms))),
            # Envoy's async client does not retry; neither do we (the filter decides).
            ("grpc.enable_retries", 0),
        ]
        if len(cfg.endpoints) > 1:
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if cfg.tls is not None and cfg.tls.sni:
            opts.append(("grpc.ssl_target_name_override", cfg.tls.sni))
            opts.append(("grpc.default_authority", cfg.tls.sni))
        return opts

    def channel(self) -> aio.Channel:
        if self._channel is None:
            tls = self.cfg.tls
            if tls is None:
                self._channel = aio.insecure_channel(target(self.cfg), self._options())
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=tls.ca.read_bytes() if tls.ca else None,
                    private_key=tls.key.read_bytes() if tls.key else None,
                    certificate_chain=tls.cert.read_bytes() if tls.cert else None)
                self._channel = aio.secure_channel(target(self.cfg), creds, self._options())
        return self._channel

    async def call(self, path: str, metadata: Headers, message: bytes,
                   timeout_s: float | None) -> GrpcReply:
        method = self._unary.get(path)
        if method is None:
            # Raw bytes both ways: no serializer (grpc passes bytes through untouched).
            method = self._unary[path] = self.channel().unary_unary(path)
        if timeout_s is None:
            timeout_s = self.cfg.request_timeout_ms / 1000
        try:
            response = await method(message, metadata=_md_out(metadata), timeout=timeout_s)
        except aio.AioRpcError as e:
            self.counts[e.code().name] += 1
            return GrpcReply(_code(e.code()), e.details() or "")
        except asyncio.CancelledError:
            raise
        except Exception as e:          # noqa: BLE001 — e.g. metadata gRPC refuses to send
            self.counts["INTERNAL"] += 1
            return GrpcReply(INTERNAL, f"{type(e).__name__}: {e}")
        self.counts["OK"] += 1
        return GrpcReply(0, "", response)

    def stream(self, path: str, metadata: Headers) -> "GrpcStreamCall":
        call = self.channel().stream_stream(path)(metadata=_md_out(metadata))
        return GrpcStreamCall(call, self.counts)

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace=None)


class GrpcStreamCall:
    """abi.api.GrpcStream over a grpc.aio stream-stream call: writes go out in order from one
    task (``send`` never blocks the guest), reads become events."""

    def __init__(self, call: aio.StreamStreamCall, counts: Counter[str]):
        self._call = call
        self._counts = counts
        self._outbox: asyncio.Queue[tuple[bytes | None, bool]] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write())
        self._cancelled = False

    def send(self, message: bytes, end_stream: bool) -> None:
        self._outbox.put_nowait((message, end_stream))

    def close(self) -> None:
        self._outbox.put_nowait((None, True))

    def cancel(self) -> None:
        self._cancelled = True
        self._writer.cancel()
        self._call.cancel()

    async def _write(self) -> None:
        try:
            while True:
                message, end = await self._outbox.get()
                if message is not None:
                    await self._call.write(message)
                if end:
                    await self._call.done_writing()
                    return
        except (aio.AioRpcError, asyncio.InvalidStateError):
            return                       # the call ended first: its events say how

    async def events(self) -> AsyncIterator[tuple]:
        call = self._call
        try:
            initial = await call.initial_metadata()
            # A call that failed before the server answered (refused, trailers-only error)
            # has no initial metadata to report, as Envoy's onReceiveInitialMetadata.
            if initial or not call.done() or await call.code() == grpc.StatusCode.OK:
                yield ("initial", _md_in(initial))
            while True:
                message = await call.read()
                if message is aio.EOF:
                    break
                yield ("message", message)
        except aio.AioRpcError:
            pass                         # the status comes below
        except asyncio.CancelledError:
            if not self._cancelled:
                call.cancel()
            raise
        if self._cancelled:
            return
        self._writer.cancel()
        code = await call.code()
        details = await call.details() or ""
        self._counts[code.name] += 1
        # gRPC keeps grpc-status / grpc-message out of the trailing metadata; Envoy's trailer
        # map has them: put them back.
        status = [("grpc-status", str(_code(code)))] + ([("grpc-message", details)] if details else [])
        yield ("trailing", _md_in(await call.trailing_metadata()) + status)
        yield ("close", _code(code), details)
