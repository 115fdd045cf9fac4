"""A lean HTTP/1.1 upstream client: one keep-alive pool per cluster, round robin, ejection.

Built on asyncio streams and the llhttp-based parsing in http1.py rather than aiohttp's ClientSession,
whose per-request machinery costs more CPU than the whole proxied request may spend.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import AsyncIterator, Callable

from abi.api import CallFailed, CallResponse, GrpcReply, GrpcStream, Headers, NodeInfo, RedisOptions

from .config import Cluster, Endpoint, RedisCluster
from .grpc_clusters import GrpcClusters
from .redis_clusters import RedisClusters
from .http1 import (FRAMING, BodyStream, HttpError, PeerClosed, StreamProtocol, body_length, connection_tokens,
                    parse_response_head, read_chunked, trailer_block)
from .tls import client_context, ssl_reason
from .watchdog import Watchdog
from .write_batch import batch_for

log = logging.getLogger("wasmgate.upstream")

_READ = 262144
# An idle keep-alive connection older than this is closed instead of reused: servers close
# idle connections on their own schedule (Node.js after 5 s), and a request sent into a
# connection the server is closing fails in a way that cannot be retried once a body went out.
IDLE_REUSE_S = 4.0
_SKIP_ON_WRITE = FRAMING | {"host", "expect"}


class UpstreamError(Exception):
    """The upstream could not give us a response head. ``status`` is what the client gets."""

    def __init__(self, status: int, kind: str, message: str, endpoint: str = ""):
        super().__init__(message)
        self.status = status
        self.kind = kind            # refused | timeout | reset | bad_response | overloaded | tls
        self.message = message
        self.endpoint = endpoint


class UpstreamReset(Exception):
    """The upstream broke off (or, ``timeout``, went quiet) while sending the response body."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class _Stale(Exception):
    """A reused keep-alive connection turned out to be closed before answering."""


class UpConn:
    """One upstream connection. What every request touches is resolved once per connection: the
    transport (StreamWriter.transport is a property), the endpoint's text (Endpoint.__str__) and
    the pool's idle list for it (an Endpoint is hashed by a generated Python __hash__)."""
    __slots__ = ("reader", "writer", "transport", "endpoint", "name", "idle", "reused", "timed_out",
                 "idle_since", "watchdog", "out")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, endpoint: Endpoint,
                 idle_timeout_s: float, idle: list["UpConn"]):
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.endpoint = endpoint
        self.name = str(endpoint)
        self.idle = idle            # the pool's idle connections to this endpoint
        self.reused = False
        self.timed_out = False
        self.idle_since = 0.0
        # response_idle_timeout: armed before each read of a response body.
        loop = asyncio.get_running_loop()
        self.watchdog = Watchdog(loop, idle_timeout_s, self.on_timeout)
        self.out = batch_for(loop)      # a request without a body goes out at the end of the turn

    def usable(self) -> bool:
        return not self.transport.is_closing() and not self.reader.at_eof()

    def abort(self) -> None:
        self.watchdog.close()
        self.transport.abort()

    def on_timeout(self) -> None:
        self.timed_out = True
        self.transport.abort()


class UpstreamResponse:
    """Status, headers and a body iterator; ``finish()`` returns the connection to the pool.

    Between two reads of the body the upstream may stay silent for the cluster's
    ``response_idle_timeout_ms`` at most (nginx ``proxy_read_timeout``): then the connection is
    aborted and the body iterator raises UpstreamReset(timeout=True).
    """
    __slots__ = ("pool", "conn", "status", "headers", "length", "keepalive", "complete", "_body_iter",
                 "endpoint", "bytes", "idle_s")

    def __init__(self, pool: "Pool", conn: UpConn, status: int, headers: Headers, length: int | None,
                 keepalive: bool):
        self.pool = pool
        self.conn = conn
        self.status = status
        self.headers = headers
        self.length = length            # int, None = chunked, -1 = until close
        self.keepalive = keepalive
        self.complete = length == 0
        self.endpoint = conn.name
        self.bytes = 0
        self._body_iter: AsyncIterator[bytes] | None = None
        self.idle_s = pool.cluster.response_idle_timeout_ms / 1000

    @property
    def body(self) -> AsyncIterator[bytes] | None:
        """The body as an async iterator (the same object on every access); None if empty."""
        if self.length == 0:
            return None
        if self._body_iter is None:
            self._body_iter = BodyStream(self._body())
        return self._body_iter

    async def read_exact(self) -> bytes:
        """The whole Content-Length body in one read: the fast path for small responses.
        ``body`` may have been handed out (to the filters), but nothing may have iterated it."""
        assert self.length is not None and self.length > 0 and self.bytes == 0 and not self.complete
        conn = self.conn
        watchdog = conn.watchdog
        watchdog.arm(self.idle_s)
        try:
            data = await conn.reader.readexactly(self.length)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise self._broke(f"connection closed inside the body ({e})") from None
        finally:
            watchdog.deadline = None            # disarm(), without the call
        self.bytes = len(data)
        self.complete = True
        return data

    def _broke(self, why: object) -> UpstreamReset:
        conn = self.conn
        if conn is not None and conn.timed_out:
            return UpstreamReset(f"{self.endpoint}: no response data for {self.idle_s:g} s", timeout=True)
        return UpstreamReset(f"{self.endpoint}: {why}")

    async def _body(self) -> AsyncIterator[bytes]:
        conn = self.conn
        reader = conn.reader
        watchdog = conn.watchdog
        idle = self.idle_s
        n = self.length
        watchdog.arm(idle)
        try:
            if n is None:
                trailers: list = []
                rest: list = []
                async for data in read_chunked(reader, status=502, trailers=trailers, rest=rest):
                    self.bytes += len(data)
                    watchdog.disarm()
                    yield data
                    watchdog.arm(idle)
                self._body_iter.trailers = trailers or None   # type: ignore[union-attr]
                if rest:
                    self.keepalive = False      # bytes after the response: never reuse this connection
            elif n == -1:
                while True:
                    data = await reader.read(_READ)
                    if not data:
                        if conn.timed_out:      # aborted by the watchdog, not the end of the body
                            raise PeerClosed("timed out")
                        break
                    self.bytes += len(data)
                    watchdog.disarm()
                    yield data
                    watchdog.arm(idle)
            else:
                while n > 0:
                    data = await reader.read(n if n < _READ else _READ)
                    if not data:
                        raise PeerClosed(f"upstream closed with {n} body bytes missing")
                    n -= len(data)
                    self.bytes += len(data)
                    watchdog.disarm()
                    yield data
                    watchdog.arm(idle)
        except (PeerClosed, HttpError, ConnectionError) as e:
            raise self._broke(e) from None
        finally:
            watchdog.disarm()
        self.complete = True

    def finish(self) -> None:
        """Keep the connection if the body was read to its end, else close it."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None  # type: ignore[assignment]
        # The body iterator's generator frame holds this response: dropping our end of that cycle
        # lets reference counting free the request's response (headers, iterator) here instead of
        # leaving ~10 objects per request to a young collection (bench/README.md, Issue 15 third pass).
        self._body_iter = None
        if self.complete and self.keepalive:
            self.pool.release(conn)
        else:
            self.pool.discard(conn)


class UpstreamTunnel:
    """An upstream connection that answered 101 Switching Protocols: from the byte after that
    head on it carries another protocol, spliced by gateway/tunnel.py. It still counts against
    the cluster's ``max_connections`` until ``close()``."""
    __slots__ = ("pool", "conn", "headers", "endpoint", "reader", "writer")

    def __init__(self, pool: "Pool", conn: UpConn, headers: Headers):
        self.pool = pool
        self.conn: UpConn | None = conn
        self.headers = headers
        self.endpoint = conn.name
        self.reader = conn.reader       # may already hold the first bytes the upstream sent after 101
        self.writer = conn.writer

    def close(self, abort: bool = False) -> None:
        """Close the connection (``abort``: drop what is still unsent) and free its pool slot."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if abort:
                self.pool.discard(conn)
            else:
                self.pool._close(conn)


class Pool:
    """Connections to one cluster's endpoints, at most ``max_connections`` open at once."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.idle: dict[Endpoint, list[UpConn]] = {ep: [] for ep in cluster.endpoints}
        # One endpoint (the common case): no round robin, its idle list is where a request looks.
        self._single = self.idle[cluster.endpoints[0]] if len(cluster.endpoints) == 1 else None
        self.open = 0
        self._rr = 0
        self._ejected: dict[Endpoint, float] = {}
        self._waiters: list[asyncio.Future] = []
        self._connect_timeout = cluster.connect_timeout_ms / 1000
        self._request_timeout = cluster.request_timeout_ms / 1000
        self._closed = False
        self._tls = client_context(cluster.tls) if cluster.tls is not None else None

    # -- connection management ---------------------------------------------------------------

    def _candidates(self) -> list[Endpoint]:
        eps = self.cluster.endpoints
        if len(eps) == 1:
            return list(eps)
        start = self._rr % len(eps)
        self._rr += 1
        ordered = eps[start:] + eps[:start]
        if not self._ejected:
            return list(ordered)
        now = time.monotonic()
        live = [ep for ep in ordered if self._ejected.get(ep, 0) <= now]
        # All ejected: try them anyway rather than fail without trying (Envoy's "panic" mode).
        return live or list(ordered)

    def is_ejected(self, ep: Endpoint) -> bool:
        return self._ejected.get(ep, 0) > time.monotonic()

    def _eject(self, ep: Endpoint) -> None:
        if self.cluster.eject_ms > 0:
            self._ejected[ep] = time.monotonic() + self.cluster.eject_ms / 1000
            log.warning('cluster "%s": endpoint %s ejected for %d ms', self.cluster.name, ep,
                        self.cluster.eject_ms)

    def _reuse(self) -> UpConn | None:
        """acquire()'s first step without a coroutine, for a single-endpoint cluster: an idle
        connection fit for reuse, or None."""
        idle = self._single
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing() and not conn.reader.at_eof() and now - conn.idle_since < IDLE_REUSE_S:
                conn.reused = True
                return conn
            self._close(conn)
        return None

    async def acquire(self) -> UpConn:
        """A connection to the next endpoint in round robin: idle if one is pooled, else new."""
        last: UpstreamError | None = None
        for ep in self._candidates():
            idle = self.idle[ep]
            while True:
                while idle:
                    conn = idle.pop()
                    if conn.usable() and time.monotonic() - conn.idle_since < IDLE_REUSE_S:
                        conn.reused = True
                        return conn
                    self._close(conn)
                if self.open < self.cluster.max_connections or self._evict_one_idle():
                    break
                await self._wait_for_release()
            self.open += 1
            try:
                conn = await self._connect(ep)
            except BaseException as e:
                self.open -= 1
                self._wake()
                if not isinstance(e, UpstreamError):
                    raise
                last = e
                continue
            self._ejected.pop(ep, None)
            return conn
        assert last is not None
        raise last

    async def _wait_for_release(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self._connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(503, "overloaded", f'cluster "{self.cluster.name}": all '
                                f'{self.cluster.max_connections} connections busy') from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _evict_one_idle(self) -> bool:
        for conns in self.idle.values():
            if conns:
                self._close(conns.pop(0))
                return True
        return False

    async def _connect(self, ep: Endpoint) -> UpConn:
        tls = {} if self._tls is None else {
            # SNI and the name verified: `sni`, else the endpoint's host (Python sends no SNI for an IP).
            "ssl": self._tls, "server_hostname": self.cluster.tls.sni or ep.host,   # type: ignore[union-attr]
            "ssl_handshake_timeout": self._connect_timeout}
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ, loop=loop)
        try:
            # connect_timeout_ms bounds the TCP connect and the TLS handshake together.
            # (asyncio.open_connection, with the leaner protocol.)
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: StreamProtocol(reader), ep.host, ep.port, **tls), self._connect_timeout)
        except asyncio.TimeoutError:
            self._eject(ep)
            raise UpstreamError(504, "timeout", f"connect to {ep} timed out", str(ep)) from None
        except ssl.SSLError as e:
            self._eject(ep)
            raise UpstreamError(502, "tls", f'cluster "{self.cluster.name}": TLS handshake with {ep} failed: '
                                f"{ssl_reason(e)}", str(ep)) from None
        except OSError as e:
            self._eject(ep)
            why = "refused" if isinstance(e, ConnectionRefusedError) else (e.strerror or str(e))
            raise UpstreamError(502, "refused", f"connect to {ep}: {why}", str(ep)) from None
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Head, body chunks and the final chunk go out as separate writes: no Nagle delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return UpConn(reader, writer, ep, self.cluster.response_idle_timeout_ms / 1000, self.idle[ep])

    def release(self, conn: UpConn) -> None:
        if self._closed or conn.transport.is_closing() or conn.reader.at_eof():
            self._close(conn)
            return
        conn.idle_since = time.monotonic()
        conn.idle.append(conn)
        if self._waiters:
            self._wake()

    def discard(self, conn: UpConn) -> None:
        conn.abort()
        self.open -= 1
        self._wake()

    def _close(self, conn: UpConn) -> None:
        conn.watchdog.close()
        conn.transport.close()
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def close(self) -> None:
        self._closed = True
        for conns in self.idle.values():
            while conns:
                self._close(conns.pop())

    # -- one exchange -------------------------------------------------------------------------

    async def exchange(self, method: str, target: str, authority: str, headers: Headers,
                       body: AsyncIterator[bytes] | None, length: int | None,
                       upgrade: bool = False) -> UpstreamResponse | UpstreamTunnel:
        """Send a request and read the response head.

        ``body`` None means no body (``length`` 0 still writes ``content-length: 0``); otherwise
        ``length`` is the Content-Length, or None to send it chunked. ``upgrade``: the request
        asks to switch protocols (``headers`` carry its ``upgrade``); a 101 answer returns an
        UpstreamTunnel, anything else an ordinary response.
        """
        for attempt in (0, 1):
            conn = self._reuse() if self._single is not None else None
            if conn is None:
                conn = await self.acquire()
            try:
                return await self._exchange_on(conn, method, target, authority, headers, body, length, upgrade)
            except _Stale:
                self.discard(conn)
                # Replaying is only safe when no body bytes were consumed.
                if body is None and attempt == 0:
                    continue
                raise UpstreamError(502, "reset", f"{conn.endpoint} closed the connection before responding",
                                    conn.name) from None
            except BaseException:
                self.discard(conn)
                raise
        raise AssertionError("unreachable")

    async def _exchange_on(self, conn: UpConn, method: str, target: str, authority: str, headers: Headers,
                           body: AsyncIterator[bytes] | None, length: int | None,
                           upgrade: bool = False) -> UpstreamResponse | UpstreamTunnel:
        parts = [f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n"]
        if upgrade:
            parts.append("connection: upgrade\r\n")
        parts += [f"{n}: {v}\r\n" for n, v in headers if n[0] != ":" and n not in _SKIP_ON_WRITE]
        if body is not None:
            parts.append("transfer-encoding: chunked\r\n\r\n" if length is None else f"content-length: {length}\r\n\r\n")
        elif length == 0:
            parts.append("content-length: 0\r\n\r\n")
        else:
            parts.append("\r\n")
        head = "".join(parts).encode("latin-1", "replace")
        if body is None:
            conn.out.write(conn.transport, head)    # nothing else writes here before the answer
        else:
            conn.transport.write(head)
            try:
                await self._send_body(conn, body, length)
            except (ConnectionError, _UploadStalled):
                # The upstream may have answered early (e.g. 413) and closed; read what it said.
                pass
        # request_timeout_ms on the connection's watchdog: moving a deadline, not a timer per request.
        watchdog = conn.watchdog
        watchdog.arm(self._request_timeout)
        reader = conn.reader
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if conn.timed_out:
                        raise UpstreamError(504, "timeout", f"{conn.endpoint} did not respond within "
                                            f"{self.cluster.request_timeout_ms} ms", conn.name) from None
                    if not e.partial and conn.reused:
                        raise _Stale() from None
                    raise UpstreamError(502, "reset", f"{conn.endpoint} closed the connection before responding",
                                        conn.name) from None
                except asyncio.LimitOverrunError:
                    raise UpstreamError(502, "bad_response", f"{conn.endpoint} sent a response head over "
                                        f"{_READ} bytes", conn.name) from None
                except ConnectionError as e:
                    if conn.timed_out:
                        raise UpstreamError(504, "timeout", f"{conn.endpoint} did not respond in time",
                                            conn.name) from None
                    raise UpstreamError(502, "reset", f"{conn.endpoint}: {e}", conn.name) from None
                try:
                    status, version, rheaders = parse_response_head(head)
                except HttpError as e:
                    raise UpstreamError(502, "bad_response", f"{conn.endpoint}: {e.message}", conn.name) from None
                if 100 <= status < 200 and status != 101:
                    continue            # interim responses (100 Continue, 103) are not forwarded
                break
        finally:
            watchdog.deadline = None            # disarm(), without the call
        if status == 101 and upgrade:
            conn.watchdog.close()
            return UpstreamTunnel(self, conn, rheaders)
        if status == 101:
            raise UpstreamError(502, "bad_response", f"{conn.endpoint} switched protocols, which is not supported",
                                conn.name)
        if method == "HEAD" or status == 204 or status == 304:
            n: int | None = 0
        else:
            try:
                n = body_length(rheaders, request=False)
            except HttpError as e:
                raise UpstreamError(502, "bad_response", f"{conn.endpoint}: {e.message}", conn.name) from None
        # A refused upgrade: the upstream may still expect the other protocol on this connection.
        keepalive = version == "HTTP/1.1" and n != -1 and not upgrade
        if keepalive:
            for name, value in rheaders:
                # "close" in the value is rare ("keep-alive" is not): only then split the tokens.
                if name == "connection" and "close" in value.lower() and "close" in connection_tokens([(name, value)]):
                    keepalive = False
        return UpstreamResponse(self, conn, status, rheaders, n, keepalive)

    async def _send_body(self, conn: UpConn, body: AsyncIterator[bytes], length: int | None) -> None:
        writer = conn.writer
        transport = writer.transport
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            if length is None:
                writer.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                writer.write(chunk)
            sent += len(chunk)
            if transport.get_write_buffer_size() > 65536:
                await self._drain(conn)
        if length is None:
            writer.write(trailer_block(getattr(body, "trailers", None)))
        elif sent != length:
            # Framing would be wrong on the wire; never send a message the upstream would split.
            raise UpstreamError(502, "bad_request_body", f"body had {sent} bytes, Content-Length said {length}",
                                conn.name)

    async def _drain(self, conn: UpConn) -> None:
        # An upstream that stops reading for a whole request timeout is treated as stalled.
        try:
            await asyncio.wait_for(conn.writer.drain(), self._request_timeout)
        except asyncio.TimeoutError:
            conn.on_timeout()
            raise _UploadStalled() from None


class _UploadStalled(Exception):
    pass


class Upstreams:
    """All clusters' pools; also the gateway's HostServices for filter callouts.

    ``shared_store``: the gateway-wide store for shared data/queues when workers share one
    (set by the worker supervisor); None lets the filter host use a per-process store.
    ``redis_clusters``: the `type: redis` clusters (gateway/redis_clusters.py).
    ``node``: the config's `node:`, which filters read as the node.* properties.
    """

    def __init__(self, clusters: tuple[Cluster, ...], logger: logging.Logger | None = None,
                 shared_store: object | None = None, redis_clusters: tuple[RedisCluster, ...] = (),
                 node: NodeInfo | None = None):
        self.pools = {c.name: Pool(c) for c in clusters if c.protocol != "grpc"}
        self.node = node or NodeInfo()          # the config's `node:` (filters' node.* properties)
        self.redis = RedisClusters(redis_clusters)
        self.grpc = GrpcClusters(tuple(c for c in clusters if c.protocol == "grpc"))
        self.log = logger or logging.getLogger("wasmgate.filters")
        self.shared_store = shared_store

    def has_cluster(self, name: str) -> bool:
        return name in self.pools

    def has_redis_cluster(self, name: str) -> bool:
        return self.redis.has(name)

    def redis_call(self, cluster: str, query: bytes, options: RedisOptions) -> asyncio.Future:
        """HostServices.redis_call: one command to a `type: redis` cluster, the raw reply."""
        return self.redis.call(cluster, query, options)

    def has_grpc_cluster(self, name: str) -> bool:
        return self.grpc.has(name)

    async def grpc_call(self, cluster: str, path: str, metadata: Headers, message: bytes,
                        timeout_s: float | None) -> GrpcReply:
        """HostServices.grpc_call: one unary call to a `protocol: grpc` cluster."""
        return await self.grpc.call(cluster, path, metadata, message, timeout_s)

    def grpc_stream(self, cluster: str, path: str, metadata: Headers) -> GrpcStream:
        return self.grpc.stream(cluster, path, metadata)

    async def http_call(self, cluster: str, method: str, path: str, authority: str, headers: Headers,
                        body: bytes, timeout_s: float | None,
                        reserve: Callable[[int], bool] | None = None) -> CallResponse:
        """HostServices.http_call: a whole request/response to a named cluster. ``reserve``
        approves each response body chunk before it is kept (the filter's callout bytes)."""
        pool = self.pools.get(cluster)
        if pool is None:
            raise CallFailed(f'no cluster named "{cluster}"')
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await pool.exchange(method, path, authority, headers,
                                           _once(body) if body else None, len(body) if body else None)
                chunks = []
                body = resp.body
                if body is not None:
                    async for chunk in body:
                        if reserve is not None and not reserve(len(chunk)):
                            raise CallFailed("response body over the filter's max_callout_bytes")
                        chunks.append(chunk)
                trailers = list(getattr(body, "trailers", None) or [])
                return CallResponse(resp.status, list(resp.headers), b"".join(chunks), trailers)
        except TimeoutError:
            raise CallFailed("timeout") from None
        except UpstreamError as e:
            # A TLS failure's reason (e.g. which verification failed) goes to the filter's log line.
            raise CallFailed(e.message if e.kind == "tls" else e.kind) from None
        except UpstreamReset:
            raise CallFailed("reset") from None
        finally:
            if resp is not None:
                resp.finish()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def aclose(self, keep_redis: set[str] = frozenset()) -> None:
        """close(), and the Redis connections too (except those of ``keep_redis``, carried into
        a reloaded generation)."""
        self.close()
        await self.redis.aclose(keep_redis)
        await self.grpc.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
