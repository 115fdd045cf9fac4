"""The request handler: route → filter chain → upstream → filter chain → client.

One coroutine per downstream connection reads requests with the strict parser in http1.py and
serves them one at a time. A route without filters never touches the ABI: bodies go straight
from one socket to the other.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, AsyncIterator

from abi.api import Forward, LocalReply, LocalReplyInterrupt, LogInfo, StreamInfo, TlsFacts

from .config import Config, Limits, Route
from .http1 import (FRAMING, HOP_BY_HOP, BodyStream, BodyTooLarge, HttpError, PeerClosed, body_length,
                    parse_request_head, read_chunked, trailer_block)
from .routing import Router, remove_dot_segments, rewrite_target
from .upstream import UpstreamError, UpstreamReset, UpstreamResponse, Upstreams

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("wasmgate.proxy")

_CONN_IDS = itertools.count(1)
_XF = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HIGH_WATER = 65536
_SMALL_BODY = 65536


@dataclass
class Generation:
    """Everything one config generation serves with; a reload swaps the whole object."""
    config: Config
    router: Router
    upstreams: Upstreams
    filter_host: object | None      # abi.api.FilterHostProtocol
    active: int = 0                 # requests being served on it (a reload retires it at 0)
    tls: dict = field(default_factory=dict)   # listener name -> gateway.tls.ServerTls


class Downstream:
    """One client connection."""
    __slots__ = ("reader", "writer", "transport", "id", "peer", "peer_text", "local", "idle", "task", "linger",
                 "last_active", "pending", "tls", "scheme")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsFacts | None = None):
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.id = next(_CONN_IDS)
        peer = writer.get_extra_info("peername") or ("", 0)
        self.peer = (peer[0], peer[1])
        self.peer_text = f"{peer[0]}:{peer[1]}"
        local = writer.get_extra_info("sockname") or ("", 0)
        self.local = (local[0], local[1])
        self.idle = True
        self.task: asyncio.Task | None = None
        self.linger = False         # closing after an error reply with request bytes maybe unread
        self.last_active = time.monotonic()
        self.pending = b""          # bytes read past the end of a chunked body (pipelining)
        self.tls = tls              # None on a plain connection
        self.scheme = "http" if tls is None else "https"

    async def read(self, n: int) -> bytes:
        pending = self.pending
        if pending:
            self.pending = pending[n:]
            return pending[:n]
        return await self.reader.read(n)

    async def read_head(self, limit: int) -> bytes:
        """The next head when bytes are pending: as ``StreamReader.readuntil`` would."""
        buf, self.pending = self.pending, b""
        while (end := buf.find(b"\r\n\r\n")) == -1:
            if len(buf) > limit:
                raise asyncio.LimitOverrunError("request head too large", len(buf))
            more = await self.reader.read(65536)
            if not more:
                raise asyncio.IncompleteReadError(buf, None)
            buf += more
        self.pending = buf[end + 4:]
        return buf[:end + 4]


class RequestBody:
    """The client's request body as an async iterator, de-chunked and held to the size limit."""
    __slots__ = ("conn", "length", "limit", "expect", "received", "done", "iterator")

    def __init__(self, conn: Downstream, length: int | None, limit: int, expect_continue: bool):
        self.conn = conn
        self.length = length            # None = chunked
        self.limit = limit
        self.expect = expect_continue
        self.received = 0
        self.done = False
        self.iterator = BodyStream(self._iterate())

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self.expect:
            # The client waits for this before sending the body: ask only when we want it.
            self.expect = False
            self.conn.writer.write(_CONTINUE)
        conn = self.conn
        try:
            if self.length is not None:
                n = self.length
                while n > 0:
                    data = await conn.read(n if n < 262144 else 262144)
                    if not data:
                        raise PeerClosed(f"client closed with {n} request body bytes missing")
                    n -= len(data)
                    self.received += len(data)
                    yield data
            else:
                trailers: list = []
                rest: list = []
                async for data in read_chunked(conn, status=400, trailers=trailers, rest=rest):
                    self.received += len(data)
                    if self.received > self.limit:
                        raise BodyTooLarge(self.limit)
                    yield data
                self.iterator.trailers = trailers or None
                if rest:
                    conn.pending = rest[0] + conn.pending
        except ConnectionError as e:
            # Keep client-side failures distinct from upstream ones for the caller.
            raise PeerClosed(f"client connection lost: {e}") from None
        self.done = True


class Exchange:
    """Per-request facts collected for the access log, metrics and LogInfo."""
    __slots__ = ("t0", "method", "target", "route", "status", "bytes_out", "upstream", "error", "rid", "body",
                 "keepalive")

    def __init__(self, method: str, target: str):
        self.t0 = time.perf_counter()
        self.method = method
        self.target = target
        self.route = ""
        self.status = 0
        self.bytes_out = 0
        self.upstream = ""
        self.error = ""
        self.rid = ""
        self.body: RequestBody | None = None
        self.keepalive = False


class Proxy:
    def __init__(self, gateway: "Gateway"):
        self.gw = gateway
        self.metrics = gateway.metrics
        self.access_log = gateway.access_log

    # -- connection loop ------------------------------------------------------------------------

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                tls: TlsFacts | None = None) -> None:
        conn = Downstream(reader, writer, tls)
        conn.task = asyncio.current_task()
        gw = self.gw
        gw.connections.add(conn)
        self.metrics.active_connections += 1
        try:
            while not gw.draining:
                conn.idle = True
                conn.last_active = time.monotonic()
                try:
                    if conn.pending:
                        head = await conn.read_head(max(gw.generation.config.limits.max_header_bytes + 4, 65536))
                    else:
                        head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        self.metrics.error("client_closed_mid_head")
                    break
                except asyncio.LimitOverrunError:
                    ex = Exchange("-", "-")
                    self._reply_error(conn, ex, 431, "request head too large", "header_too_large")
                    self._log(conn, ex)
                    break
                except ConnectionError:
                    break
                conn.idle = False
                if head[:2] == b"\r\n":
                    head = head.lstrip(b"\r\n")    # RFC 9112 §2.2: ignore empty lines before a request
                    if not head:
                        continue
                    if not head.endswith(b"\r\n\r\n"):
                        head += b"\r\n\r\n" if not head.endswith(b"\r\n") else b"\r\n"
                if not await self._serve(conn, head):
                    break
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error on connection %s", conn.peer_text)
        finally:
            if conn.linger and not conn.transport.is_closing():
                await _lingering_close(conn, 0.2 if gw.draining else 1.0)
            gw.connections.discard(conn)
            self.metrics.active_connections -= 1
            if not conn.transport.is_closing():
                conn.transport.close()

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, conn: Downstream, head: bytes) -> bool:
        """Serve one request; return whether the connection may carry another."""
        gen: Generation = self.gw.generation
        limits: Limits = gen.config.limits
        ex = Exchange("-", "-")
        gen.active += 1
        try:
            if len(head) > limits.max_header_bytes:
                return self._reply_error(conn, ex, 431, f"request head over {limits.max_header_bytes} bytes",
                                         "header_too_large")
            method, target, version, headers = parse_request_head(head)
            ex.method, ex.target = method, target
            return await self._serve_parsed(conn, gen, ex, method, target, version, headers)
        except HttpError as e:
            return self._reply_error(conn, ex, e.status, e.message, "bad_request")
        finally:
            gen.active -= 1
            self._log(conn, ex)

    async def _serve_parsed(self, conn: Downstream, gen: Generation, ex: Exchange, method: str, target: str,
                            version: str, headers: list[tuple[str, str]]) -> bool:
        limits = gen.config.limits
        authority: str | None = None
        rid: str | None = None
        expect = ""
        conn_tokens: set[str] | None = None
        for name, value in headers:
            if name == "host":
                if authority is not None:
                    raise HttpError(400, "more than one Host header")
                authority = value
            elif name == "x-request-id":
                rid = value
            elif name == "expect":
                expect = value.lower()
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                conn_tokens = tokens if conn_tokens is None else conn_tokens | tokens
        keepalive = version == "HTTP/1.1"
        if conn_tokens:
            if "close" in conn_tokens:
                keepalive = False
            elif not keepalive and "keep-alive" in conn_tokens:
                keepalive = True
        if target[0] != "/":
            target, authority = _origin_form(method, target, authority)
            ex.target = target
        if authority is None:
            if version == "HTTP/1.1":
                raise HttpError(400, "missing Host header")
            authority = f"{conn.local[0]}:{conn.local[1]}"
        length = body_length(headers, request=True)
        if length is None and version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if rid is None:
            rid = os.urandom(16).hex()
        ex.rid = rid
        ex.keepalive = keepalive

        if length is not None and length > limits.max_request_body_bytes:
            return self._reply_error(conn, ex, 413, f"request body of {length} bytes is over the "
                                     f"{limits.max_request_body_bytes} byte limit", "body_too_large")
        if expect and expect != "100-continue":
            return self._reply_error(conn, ex, 417, f"unsupported Expect: {expect}", "bad_request")

        path = target.partition("?")[0]
        if "/." in path:
            normalized = remove_dot_segments(path)
            target = normalized + target[len(path):]
            path = normalized
            ex.target = target
        route = gen.router.match(method, authority, path, headers)
        has_body = length is None or length > 0
        if route is None:
            return self._reply_error(conn, ex, 404, f"no route for {method} {authority}{path}", "no_route",
                                     close=not keepalive or has_body)
        ex.route = route.name

        body = RequestBody(conn, length, limits.max_request_body_bytes, expect == "100-continue") if has_body else None
        fwd_headers = _upstream_headers(headers, conn_tokens, conn.peer[0], authority, rid, conn.scheme)
        # Body framing upstream: Content-Length kept (incl. 0), chunked stays chunked, none stays none.
        up_length = None if length == -1 else length
        ex.body = body
        self.metrics.active_requests += 1
        try:
            if route.filters:
                ok = await self._with_filters(conn, gen, ex, route, method, target, authority, fwd_headers,
                                              body, length, version, keepalive)
            else:
                ok = await self._forward(conn, gen, ex, route, method, rewrite_target(route, target),
                                         _rewrite_host(route, authority), fwd_headers,
                                         body.iterator if body else None, up_length, version, None)
        finally:
            self.metrics.active_requests -= 1
        return ok and keepalive and (body is None or body.done) and not self.gw.draining

    async def _with_filters(self, conn: Downstream, gen: Generation, ex: Exchange, route: Route, method: str,
                            target: str, authority: str, fwd_headers: list[tuple[str, str]],
                            body: RequestBody | None, length: int | None, version: str, keepalive: bool) -> bool:
        host = gen.filter_host
        if host is None:
            self._reply_error(conn, ex, 500, f'route "{route.name}" has filters but none are loaded',
                              "filter_error")
            return False
        info = StreamInfo(request_id=ex.rid, route_name=route.name, cluster_name=route.cluster,
                          client_addr=conn.peer, local_addr=conn.local, connection_id=conn.id,
                          scheme=conn.scheme, protocol=version, start_time_ns=time.time_ns(), tls=conn.tls)
        try:
            stream = host.stream(list(route.filters), info)   # type: ignore[attr-defined]
        except Exception as e:
            log.exception('route "%s": could not open a filter stream', route.name)
            return self._reply_error(conn, ex, 500, f"filter chain error: {type(e).__name__}", "filter_error")
        chain_headers = [(":method", method), (":path", target), (":authority", authority),
                         (":scheme", conn.scheme)] + fwd_headers
        original = body.iterator if body else None
        try:
            try:
                result = await stream.request(chain_headers, original)
            except LocalReplyInterrupt as e:
                result = e.reply
            except (HttpError, PeerClosed) as e:
                return self._client_body_failed(conn, ex, stream, e)
            if isinstance(result, LocalReply):
                self._send_local_reply(conn, ex, result, close=body is not None and not body.done)
                return False if (body is not None and not body.done) else True
            new_method, new_target, new_authority, rest = _split_pseudo(result.headers, method, target, authority)
            if result.body is None:
                up_body, up_len = None, (0 if body is not None or length == 0 else None)
            elif result.body is original:
                # Untouched body: keep its framing unless a filter dropped or changed the length.
                up_body = original
                cl = _header(rest, "content-length")
                up_len = length if (length is not None and length >= 0 and cl == str(length)) else None
            else:
                up_body, up_len = result.body, None
            return await self._forward(conn, gen, ex, route, new_method, rewrite_target(route, new_target),
                                       _rewrite_host(route, new_authority), rest, up_body, up_len, version, stream)
        except Exception as e:   # a bug in the chain must cost one request, not the process
            log.exception('filter chain of route "%s" failed', route.name)
            if ex.status == 0:
                self._reply_error(conn, ex, 500, f"filter chain error: {type(e).__name__}", "filter_error")
            return False
        finally:
            await self._finish_stream(stream, ex, body)

    # -- upstream and response ----------------------------------------------------------------

    async def _forward(self, conn: Downstream, gen: Generation, ex: Exchange, route: Route, method: str,
                       target: str, authority: str, headers: list[tuple[str, str]],
                       body: AsyncIterator[bytes] | None, up_len: int | None, version: str, stream) -> bool:
        pool = gen.upstreams.pools[route.cluster]
        t_up = time.perf_counter()
        try:
            resp = await pool.exchange(method, target, authority, headers, body, up_len)
        except UpstreamError as e:
            ex.upstream = e.endpoint
            log.warning('route "%s": %s', route.name, e.message)
            if stream is not None:
                # As Envoy encodes its router's error replies through the filters: the chain's
                # response callbacks see (and may change) the 502/503/504.
                return await self._error_through_chain(conn, ex, stream, e.status, _short_upstream_reason(e),
                                                       f"upstream_{e.kind}", close=body is not None)
            return self._reply_error(conn, ex, e.status, _short_upstream_reason(e), f"upstream_{e.kind}",
                                     close=body is not None)
        except LocalReplyInterrupt as e:
            # A filter rejected a request body chunk: the upstream request was aborted with it.
            self._send_local_reply(conn, ex, e.reply, close=True)
            return False
        except (HttpError, PeerClosed) as e:
            self._client_body_failed(conn, ex, None, e)
            return False
        self.metrics.upstream(route.cluster, time.perf_counter() - t_up)
        ex.upstream = resp.endpoint
        try:
            return await self._respond(conn, ex, method, version, resp, stream)
        finally:
            resp.finish()

    async def _respond(self, conn: Downstream, ex: Exchange, method: str, version: str,
                       resp: UpstreamResponse, stream) -> bool:
        status = resp.status
        headers = _strip_hop_by_hop(resp.headers)
        length = resp.length                     # int, None = chunked, -1 = until close
        small = stream is None and length is not None and 0 < length <= _SMALL_BODY
        body = None if small else resp.body
        if stream is not None:
            try:
                result = await stream.response(status, [(":status", str(status))] + headers, body)
            except LocalReplyInterrupt as e:
                result = e.reply
            if isinstance(result, LocalReply):
                self._send_local_reply(conn, ex, result, close=False)
                return True
            status = _final_status(_status_of(result.headers, status), ex)
            headers = [(n, v) for n, v in result.headers if n[0] != ":"]
            if result.body is None:
                length = 0
            elif result.body is not body:
                length = None               # a filter's new body: length unknown until sent
            elif length is not None and length >= 0 and _header(headers, "content-length") != str(length):
                length = None               # a filter dropped or changed Content-Length
            body = result.body
        no_body = method == "HEAD" or status in (204, 304) or status < 200
        close = not ex.keepalive or self.gw.draining
        parts = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        parts += [f"{n}: {v}\r\n" for n, v in headers if n not in FRAMING]
        chunked = False
        if method == "HEAD":
            cl = _header(resp.headers, "content-length")
            if cl is not None:
                parts.append(f"content-length: {cl}\r\n")
        elif no_body:
            pass
        elif length is not None and length >= 0:
            parts.append(f"content-length: {length}\r\n")
        elif version == "HTTP/1.1":
            parts.append("transfer-encoding: chunked\r\n")
            chunked = True
        else:
            close = True
        if close:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("latin-1", "replace")
        writer = conn.writer
        transport = conn.transport
        if no_body or (body is None and not small):
            writer.write(head)
            ex.status = status
            return not close
        if small:
            # Small body, no filters: one read and one write, no iterator machinery.
            try:
                data = await resp.read_exact()
            except UpstreamReset as e:
                log.warning("upstream reset before the response body was complete: %s", e)
                return self._reply_error(conn, ex, 502, "upstream connection reset", "upstream_reset")
            writer.write(head + data)
            ex.status = status
            ex.bytes_out = length
            return not close
        it = body.__aiter__()
        # Headers go out together with the first body chunk, so a rejection on that chunk can
        # still become a clean local reply.
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = b""
            it = None
        except LocalReplyInterrupt as e:
            self._send_local_reply(conn, ex, e.reply, close=True)
            return False
        except UpstreamReset as e:
            log.warning("upstream reset before the response body: %s", e)
            self._reply_error(conn, ex, 502, "upstream connection reset", "upstream_reset")
            return False
        ex.status = status
        if chunked:
            writer.writelines((head, b"%x\r\n" % len(first), first, b"\r\n") if first else (head,))
        else:
            writer.write(head + first if len(first) < 16384 else head)
            if len(first) >= 16384:
                writer.write(first)
        sent = len(first)
        try:
            if it is not None:
                async for chunk in it:
                    if transport.is_closing():
                        ex.error = "client closed the connection"
                        return False
                    if chunked:
                        if chunk:
                            writer.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                    else:
                        writer.write(chunk)
                    sent += len(chunk)
                    if transport.get_write_buffer_size() > _HIGH_WATER:
                        await writer.drain()
            if chunked:
                writer.write(trailer_block(getattr(body, "trailers", None)))
        except UpstreamReset as e:
            # Headers are out: the only honest signal left is closing the client connection.
            log.warning("upstream reset mid-response, closing client %s: %s", conn.peer_text, e)
            self.metrics.error("upstream_reset")
            ex.error = "upstream reset mid-response"
            transport.abort()
            return False
        except LocalReplyInterrupt:
            ex.error = "filter rejected the response body after headers were sent"
            self.metrics.error("filter_reply_after_headers")
            transport.abort()
            return False
        except ConnectionError:
            ex.error = "client closed the connection"
            return False
        finally:
            ex.bytes_out = sent
        return not close

    # -- replies ------------------------------------------------------------------------------

    def _client_body_failed(self, conn: Downstream, ex: Exchange, stream, e: Exception) -> bool:
        if isinstance(e, HttpError):
            kind = "body_too_large" if isinstance(e, BodyTooLarge) else "bad_request"
            self._reply_error(conn, ex, e.status, e.message, kind)
        else:
            ex.status = 499         # nginx's "client closed request"; nothing can be sent
            ex.error = str(e)
            self.metrics.error("client_closed")
        return False

    def _reply_error(self, conn: Downstream, ex: Exchange, status: int, message: str, kind: str,
                     close: bool = True) -> bool:
        """A short text answer for a client- or upstream-caused error; returns keep-alive."""
        self.metrics.error(kind)
        ex.error = message
        body = f"{status} {_reason(status)}: {message}\n".encode("utf-8", "replace")
        extra = [("x-request-id", ex.rid)] if ex.rid else []
        close = close or self.gw.draining
        self._write_reply(conn, ex, status, [("content-type", "text/plain; charset=utf-8")] + extra, body,
                          close=close)
        return not close

    async def _error_through_chain(self, conn: Downstream, ex: Exchange, stream, status: int, message: str,
                                   kind: str, close: bool) -> bool:
        self.metrics.error(kind)
        ex.error = message
        body = f"{status} {_reason(status)}: {message}\n".encode("utf-8", "replace")
        headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
        if ex.rid:
            headers.append(("x-request-id", ex.rid))
        try:
            result = await stream.response(status, [(":status", str(status))] + headers, _once(body))
            if isinstance(result, Forward):
                chunks = []
                if result.body is not None:
                    async for chunk in result.body:
                        chunks.append(chunk)
                status = _status_of(result.headers, status)
                headers = [(n, v) for n, v in result.headers if n[0] != ":"]
                body = b"".join(chunks)
        except LocalReplyInterrupt as e:
            result = e.reply
        if isinstance(result, LocalReply):
            self._send_local_reply(conn, ex, result, close=close)
            return not (close or self.gw.draining or not ex.keepalive)
        close = close or self.gw.draining or not ex.keepalive
        self._write_reply(conn, ex, status, headers, body, close=close)
        return not close

    def _send_local_reply(self, conn: Downstream, ex: Exchange, reply: LocalReply, close: bool) -> None:
        if reply.details:
            ex.error = reply.details
        self._write_reply(conn, ex, reply.status, [(n, v) for n, v in reply.headers if n[0] != ":"],
                          reply.body, close=close or self.gw.draining or not ex.keepalive)

    def _write_reply(self, conn: Downstream, ex: Exchange, status: int, headers: list[tuple[str, str]],
                     body: bytes, close: bool) -> None:
        status = _final_status(status, ex)
        if conn.transport.is_closing():
            ex.status = status
            return
        if status == 204 or status == 304:
            body = b""              # these never carry a body (RFC 9110 §15.3.5, §15.4.5)
        parts = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        parts += [f"{n}: {v}\r\n" for n, v in headers if n not in FRAMING]
        if status != 204 and status != 304:
            parts.append(f"content-length: {len(body)}\r\n")
        if close:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        data = "".join(parts).encode("latin-1", "replace")
        conn.writer.write(data if ex.method == "HEAD" else data + body)
        conn.linger = close
        ex.status = status
        ex.bytes_out = 0 if ex.method == "HEAD" else len(body)

    # -- bookkeeping --------------------------------------------------------------------------

    async def _finish_stream(self, stream, ex: Exchange, body: RequestBody | None) -> None:
        info = LogInfo(status=ex.status, bytes_in=body.received if body else 0, bytes_out=ex.bytes_out,
                       duration_ns=int((time.perf_counter() - ex.t0) * 1e9), upstream_address=ex.upstream)
        try:
            await stream.finish(info)
        except Exception:
            log.exception("filter stream finish failed")

    def _log(self, conn: Downstream, ex: Exchange) -> None:
        bytes_in = ex.body.received if ex.body else 0
        self.metrics.request_done(ex.route or "-", ex.status, bytes_in, ex.bytes_out)
        if self.access_log.enabled:
            self.access_log.write(request_id=ex.rid, client=conn.peer_text, method=ex.method, path=ex.target,
                                  status=ex.status, bytes_in=bytes_in, bytes_out=ex.bytes_out,
                                  route=ex.route, upstream=ex.upstream,
                                  duration_ms=(time.perf_counter() - ex.t0) * 1000, error=ex.error)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _lingering_close(conn: Downstream, seconds: float) -> None:
    """Send FIN, then read and drop what the client still sends for a moment.

    Closing a socket with unread input makes the kernel send RST, which can destroy the error
    response we just wrote before the client reads it (e.g. a 431 while the client is still
    sending its huge header).
    """
    try:
        conn.writer.write_eof()
        async with asyncio.timeout(seconds):
            dropped = 0
            while dropped < 16 * 1024 * 1024:
                data = await conn.reader.read(65536)
                if not data:
                    break
                dropped += len(data)
    except (TimeoutError, ConnectionError, OSError, RuntimeError):
        pass


# -- header helpers ---------------------------------------------------------------------------

def _upstream_headers(headers: list[tuple[str, str]], conn_tokens: set[str] | None, client_ip: str,
                      authority: str, rid: str, scheme: str) -> list[tuple[str, str]]:
    """Request headers for the upstream: hop-by-hop gone, X-Forwarded-* appended, request id."""
    hop = HOP_BY_HOP | conn_tokens if conn_tokens else HOP_BY_HOP
    out: list[tuple[str, str]] = []
    xff = xfp = xfh = None
    has_rid = False
    for name, value in headers:
        if name in hop or name == "host" or name == "expect":
            continue
        if name[0] == "x":
            if name == "x-forwarded-for":
                xff = value if xff is None else f"{xff}, {value}"
                continue
            if name == "x-forwarded-proto":
                xfp = value if xfp is None else f"{xfp}, {value}"
                continue
            if name == "x-forwarded-host":
                xfh = value if xfh is None else f"{xfh}, {value}"
                continue
            if name == "x-request-id":
                has_rid = True
        out.append((name, value))
    out.append(("x-forwarded-for", client_ip if xff is None else f"{xff}, {client_ip}"))
    out.append(("x-forwarded-proto", scheme if xfp is None else f"{xfp}, {scheme}"))
    out.append(("x-forwarded-host", authority if xfh is None else f"{xfh}, {authority}"))
    if not has_rid:
        out.append(("x-request-id", rid))
    return out


def _strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    hop = HOP_BY_HOP
    for name, value in headers:
        if name == "connection":
            hop = hop | {t.strip().lower() for t in value.split(",")}
    return [(n, v) for n, v in headers if n not in hop]


def _split_pseudo(headers: list[tuple[str, str]], method: str, target: str, authority: str
                  ) -> tuple[str, str, str, list[tuple[str, str]]]:
    rest = []
    for n, v in headers:
        if n[0] == ":":
            if n == ":method":
                method = v
            elif n == ":path":
                target = v
            elif n == ":authority":
                authority = v
        else:
            rest.append((n, v))
    return method, target, authority, rest


def _status_of(headers: list[tuple[str, str]], default: int) -> int:
    for n, v in headers:
        if n == ":status":
            try:
                return int(v)
            except ValueError:
                return default
    return default


def _final_status(status: int, ex: Exchange) -> int:
    """A filter may ask for any number; only 200..599 can be a final HTTP/1.1 response."""
    if 200 <= status <= 599:
        return status
    log.warning("a filter asked for status %s on %s %s; answering 500", status, ex.method, ex.target)
    ex.error = f"invalid status {status} from a filter"
    return 500


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _rewrite_host(route: Route, authority: str) -> str:
    return route.rewrite.host if route.rewrite is not None and route.rewrite.host else authority


def _origin_form(method: str, target: str, authority: str | None) -> tuple[str, str | None]:
    """Absolute-form targets carry the authority; '*' only for OPTIONS."""
    if target == "*" and method == "OPTIONS":
        return target, authority
    lower = target[:8].lower()
    if lower.startswith("http://") or lower.startswith("https://"):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        auth, path = (rest, "/") if slash == -1 else (rest[:slash], rest[slash:])
        if not auth:
            raise HttpError(400, "absolute request target without authority")
        return path, auth
    raise HttpError(400, f"invalid request target {target[:60]!r}")


def _short_upstream_reason(e: UpstreamError) -> str:
    return {"refused": "upstream unreachable", "timeout": "upstream timed out",
            "reset": "upstream connection reset", "bad_response": "invalid upstream response",
            "overloaded": "upstream connection limit reached", "tls": "upstream TLS handshake failed",
            "bad_request_body": "request body length mismatch"}.get(e.kind, e.message)


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
