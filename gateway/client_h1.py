"""HTTP/1.1 clients: read each request with llhttp (http1.py), hand it to the proxy, write the answer.

One coroutine per connection serves its requests one at a time (pipelined ones in order).

Time limits, as nginx's ``client_header_timeout`` / ``client_body_timeout`` / ``send_timeout``:
one Watchdog per connection whose deadline follows what the connection waits for —

- HEAD: a request head, from the first byte (from accept for the first request) → 408, close;
- BODY: the next piece of the request body → 408, close;
- SEND: the client to take what we wrote → close;
- BUSY: the proxy (filters, upstream), which has its own limits;
- IDLE: the next request after a response; the server's periodic sweep closes it after
  ``keepalive_timeout_s`` (no timer per request).

A client that goes away (FIN or reset, as nginx and Envoy read a half-close) while its request is
being served cancels the request task: the proxy then aborts the upstream exchange or never
starts it, and the filters still get their teardown callbacks.

On a listener with ``http2`` on, a connection whose first bytes are the HTTP/2 client preface
(h2c prior knowledge) is handed to client_h2.py instead. A WebSocket (or other) upgrade request
whose upstream answers 101 ends the connection's HTTP life: the rest is spliced (tunnel.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

from abi.api import LocalReplyInterrupt, TlsFacts

from .client_h2 import H2Connection
from .config import Limits
from .http1 import (FRAMING, BodyTooLarge, HttpError, PeerClosed, StreamProtocol, body_length, parse_request_head,
                    read_chunked, trailer_block)
from .proxy import (ClientRequest, Exchange, GatewayState, final_status, header_value, init_connection,
                    log_exchange, reason, traced)
from .request_head import check_authority
from .tunnel import splice
from .upstream import UpstreamReset
from .watchdog import Watchdog
from .write_batch import batch_for

log = logging.getLogger("wasmgate.proxy")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"     # RFC 9113 §3.4: the HTTP/2 client preface
_HIGH_WATER = 65536
_READ = 65536
IDLE, HEAD, BODY, BUSY, SEND = range(5)


class ClientProtocol(StreamProtocol):
    """The stream protocol that also tells the connection when the client goes away."""

    def __init__(self, limit: int, on_connection: Callable):
        super().__init__(asyncio.StreamReader(limit=limit, loop=asyncio.get_running_loop()), on_connection)
        self.on_gone: Callable[[], None] | None = None

    def eof_received(self) -> bool | None:
        if self.on_gone is not None:
            self.on_gone()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_gone is not None:
            self.on_gone()
        super().connection_lost(exc)


class _HeadTimeout(Exception):
    pass


class Connection:
    """One HTTP/1.1 client connection (the proxy's Downstream)."""
    __slots__ = ("gw", "proxy", "reader", "writer", "transport", "id", "peer", "peer_text", "local", "scheme",
                 "tls", "task", "linger", "last_active", "pending", "phase", "watchdog", "busy", "gone", "version",
                 "limits", "h2c", "out")

    def __init__(self, gw: GatewayState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: TlsFacts | None = None, h2c: bool = False):
        init_connection(self, gw, reader, writer, tls)
        self.task: asyncio.Task | None = None
        self.linger = False         # closing after an error reply with request bytes maybe unread
        self.last_active = time.monotonic()
        self.pending = b""          # bytes read past the end of the last message (pipelining)
        self.phase = HEAD
        self.busy = False           # a request is being served: a client going away cancels it
        self.gone = False
        self.version = "HTTP/1.1"
        self.limits: Limits = gw.generation.config.limits
        self.h2c = h2c              # the listener also takes HTTP/2 with prior knowledge
        lim = self.limits
        period = min(lim.request_header_timeout_s, lim.request_body_idle_timeout_s, lim.response_send_timeout_s)
        loop = asyncio.get_running_loop()
        self.watchdog = Watchdog(loop, period, self._expired)
        self.out = batch_for(loop)      # answers go out at the end of the loop's turn

    @property
    def idle(self) -> bool:
        """No request in progress: between requests, or waiting for (the rest of) a head."""
        return self.phase == IDLE or self.phase == HEAD

    # -- time limits and a vanishing client ---------------------------------------------------

    def _enter(self, phase: int, seconds: float | None) -> None:
        self.phase = phase
        if seconds is None:
            self.watchdog.disarm()
        else:
            self.watchdog.arm(seconds)

    def _expired(self) -> None:
        phase = self.phase
        if phase == HEAD:
            self.reader.set_exception(_HeadTimeout())
        elif phase == BODY:
            # Answered (and counted as client_timeout) where the body read fails.
            self.reader.set_exception(HttpError(408, f"no request body data for "
                                                     f"{self.limits.request_body_idle_timeout_s:g} s"))
        elif phase == SEND:
            self.gw.metrics.error("client_send_timeout")
            log.info("client %s did not read its response for %g s; closing", self.peer_text,
                     self.limits.response_send_timeout_s)
            self.gone = True            # our doing: the failed write ends the request, not a cancel
            self.transport.abort()

    def peer_gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.busy and self.task is not None:
            self.task.cancel()

    # -- the connection -----------------------------------------------------------------------

    def close_idle(self) -> None:
        """Close the connection between requests (keep-alive timeout)."""
        self.out.settle(self.transport)
        self.transport.close()

    def drain(self) -> None:
        """The gateway stops: an idle connection closes now, a busy one after its request."""
        if self.idle:
            self.out.settle(self.transport)
            self.transport.close()

    async def run(self) -> None:
        gw = self.gw
        self.task = asyncio.current_task()
        proto = self.transport.get_protocol()
        if isinstance(proto, ClientProtocol):
            proto.on_gone = self.peer_gone
        gw.connections.add(self)
        gw.metrics.active_connections += 1
        self._enter(HEAD, self.limits.request_header_timeout_s)
        h2 = False
        try:
            h2 = self.h2c and await self._sniff_preface()
            in_a_row = 0
            while not h2 and not gw.draining:
                head = await self._next_head()
                if head is None:
                    break
                if not await self._serve(head):
                    break
                if not self.pending:    # the next request is not read yet: not pipelined
                    in_a_row = 0
                    continue
                in_a_row += 1
                if in_a_row >= self.limits.max_requests_per_io_cycle:
                    in_a_row = 0
                    await asyncio.sleep(0)          # the other connections' turn
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error on connection %s", self.peer_text)
        finally:
            self.watchdog.close()
            if self.phase == IDLE:
                gw.idle_connections -= 1
            self.phase = BUSY
            self.out.settle(self.transport)
            if self.linger and not self.transport.is_closing():
                await _lingering_close(self, 0.2 if gw.draining else 1.0)
            gw.connections.discard(self)
            gw.metrics.active_connections -= 1
            if not h2 and not self.transport.is_closing():
                if self.transport.get_write_buffer_size():
                    await self._flush()
                self.transport.close()
        if h2:
            # h2c prior knowledge: the HTTP/2 front-end takes the connection (and counts it).
            await H2Connection(gw, self.reader, self.writer, preread=self.pending).run()

    async def _sniff_preface(self) -> bool:
        """Whether the first bytes are the HTTP/2 preface; what was read stays in ``pending``."""
        buf = b""
        try:
            while len(buf) < len(PREFACE) and PREFACE.startswith(buf):
                data = await self.reader.read(_READ)
                if not data:
                    break
                buf += data
        except (_HeadTimeout, ConnectionError):
            pass                    # _next_head meets the same condition and handles it
        self.pending = buf
        return buf.startswith(PREFACE)

    async def _next_head(self) -> bytes | None:
        """The next request head (ends with an empty line), or None: the client left or timed out."""
        limits = self.limits
        limit = max(limits.max_header_bytes + 4, 65536)
        buf, self.pending = self.pending, b""
        while True:
            end = _head_end(buf)
            if end:
                head, self.pending = buf[:end], buf[end:]
                if head[:1] in (b"\r", b"\n"):
                    head = head.lstrip(b"\r\n")     # RFC 9112 §2.2: ignore empty lines before a request
                    if not head:
                        buf, self.pending = self.pending, b""
                        continue
                if self.phase == IDLE:      # _leave_idle(), inline: once per request
                    self.gw.idle_connections -= 1
                    self.phase = HEAD
                return head
            if len(buf) > limit:
                self._leave_idle()
                ex = Exchange("-", "-")
                self.proxy.reply_error(self, ex, 431, "request head too large", "header_too_large")
                self._log(ex)
                return None
            if buf and self.phase != HEAD:
                self._leave_idle()
                self._enter(HEAD, limits.request_header_timeout_s)
            try:
                data = await self.reader.read(_READ)
            except _HeadTimeout:
                if buf.strip():
                    self._leave_idle()
                    ex = Exchange("-", "-")
                    self.proxy.reply_error(self, ex, 408, f"request head not complete within "
                                           f"{limits.request_header_timeout_s:g} s", "client_timeout")
                    self._log(ex)
                return None
            except ConnectionError:
                return None
            if not data:
                if buf.strip():
                    self.gw.metrics.error("client_closed_mid_head")
                return None
            buf = buf + data if buf else data

    def _leave_idle(self) -> None:
        if self.phase == IDLE:
            self.gw.idle_connections -= 1
            self.phase = HEAD

    def _go_idle(self) -> None:
        self.watchdog.deadline = None       # disarm(), without the call
        self.phase = IDLE
        self.gw.idle_connections += 1
        self.last_active = time.monotonic()

    async def _serve(self, head: bytes) -> bool:
        """Serve one request; return whether the connection may carry another."""
        gw = self.gw
        gen = gw.generation
        limits = self.limits = gen.config.limits
        self.phase = BUSY                   # _enter(BUSY, None), inline: once per request
        self.watchdog.deadline = None
        ex = Exchange("-", "-")
        gen.active += 1
        try:
            if len(head) > limits.max_header_bytes:
                return self.proxy.reply_error(self, ex, 431, f"request head over {limits.max_header_bytes} bytes",
                                              "header_too_large")
            method, target, version, headers = parse_request_head(head)
            ex.method, ex.target = method, target
            self.version = version
            req = self._request(ex, method, target, version, headers)
            if isinstance(req, bool):
                return req
            self.busy = True
            try:
                if self.gone:
                    raise asyncio.CancelledError
                ok = await self.proxy.serve(self, gen, ex, req)
            except asyncio.CancelledError:
                if not self.gone:
                    raise
                asyncio.current_task().uncancel()     # type: ignore[union-attr]
                self.proxy.client_gone(ex, "client closed the connection")
                return False
            finally:
                self.busy = False
            body = req.body
            keep = ok and ex.keepalive and (body is None or body.done) and not gw.draining \
                and gw.idle_connections < limits.max_idle_connections
        except HttpError as e:
            return self.proxy.reply_error(self, ex, e.status, e.message,
                                          "client_timeout" if e.status == 408 else "bad_request")
        finally:
            gen.active -= 1
            if ex.tunnel is None:
                log_exchange(gw, ex, self.peer_text)
        if ex.tunnel is not None:
            await self._switch(ex)
            return False
        # A client that pipelines requests and never reads the answers must not make the gateway
        # buffer them without end (answers given here need no upstream, so nothing else slows
        # it): before the next request, wait for it to take what is written; the send timeout
        # closes the connection if it never does.
        if keep and self.transport.get_write_buffer_size() > _HIGH_WATER:
            keep = await self._drained()
        if keep:
            self._go_idle()
        return keep

    def _request(self, ex: Exchange, method: str, target: str, version: str,
                 headers: list[tuple[str, str]]) -> ClientRequest | bool:
        """The parsed head as the proxy takes it, or the keep-alive verdict of an answer given here."""
        limits = self.limits
        authority: str | None = None
        rid: str | None = None
        expect = ""
        upgrade: str | None = None
        conn_tokens: set[str] | None = None
        framed = False              # a Content-Length or Transfer-Encoding field: body_length() decides
        for name, value in headers:
            if name == "host":
                if authority is not None:
                    raise HttpError(400, "more than one Host header")
                authority = value
            elif name == "x-request-id":
                rid = value if rid is None else ""     # two of them: generate our own
            elif name == "expect":
                expect = value.lower()
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                conn_tokens = tokens if conn_tokens is None else conn_tokens | tokens
            elif name == "upgrade":
                upgrade = value if upgrade is None else f"{upgrade}, {value}"
            elif name == "content-length" or name == "transfer-encoding":
                framed = True
        keepalive = version == "HTTP/1.1"
        if conn_tokens:
            if "close" in conn_tokens:
                keepalive = False
            elif not keepalive and "keep-alive" in conn_tokens:
                keepalive = True
        ex.keepalive = keepalive
        if target[0] != "/":
            target, authority = _origin_form(method, target, authority)
            ex.target = target
        if authority is None:
            if version == "HTTP/1.1":
                raise HttpError(400, "missing Host header")
            authority = f"{self.local[0]}:{self.local[1]}"
        else:
            check_authority(authority)
        length = body_length(headers, request=True) if framed else -1
        if length is None and version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if length is not None and length > limits.max_request_body_bytes:
            return self.proxy.reply_error(self, ex, 413, f"request body of {length} bytes is over the "
                                          f"{limits.max_request_body_bytes} byte limit", "body_too_large")
        if expect and expect != "100-continue":
            return self.proxy.reply_error(self, ex, 417, f"unsupported Expect: {expect}", "bad_request")
        if target == "*":
            return self.proxy.reply_error(self, ex, 404, "no route for OPTIONS *", "no_route", close=length != -1)
        if upgrade is not None:
            upgrade = _upgrade_to(upgrade, conn_tokens, version)
        if upgrade is not None:
            if length is None or length > 0:
                # The new protocol's bytes would follow a body we forward first: never worth the
                # framing risk (WebSocket handshakes have no body).
                return self.proxy.reply_error(self, ex, 400, "an upgrade request with a body", "bad_request")
            ex.keepalive = False    # after a refused upgrade too: the client may have moved on
        body = None
        if length is None or length > 0:
            body = RequestBody(self, length, limits.max_request_body_bytes, expect == "100-continue")
        return ClientRequest(method, target, authority, headers, conn_tokens, rid, body, length, version,
                             self.scheme, upgrade)

    async def _switch(self, ex: Exchange) -> None:
        """Send the upstream's 101 and splice the two connections until either ends."""
        tunnel = ex.tunnel
        assert tunnel is not None
        gw = self.gw
        up = tunnel.upstream
        if self.gone or self.transport.is_closing():
            up.close(abort=True)
            self.proxy.client_gone(ex, "client closed the connection")
            self._log(ex)
            return
        head = ["HTTP/1.1 101 Switching Protocols\r\n"] + [f"{n}: {v}\r\n" for n, v in tunnel.headers]
        self.out.settle(self.transport)
        self.writer.write(("".join(head) + "\r\n").encode("latin-1", "replace"))
        pending, self.pending = self.pending, b""
        gw.metrics.active_upgraded += 1
        done = None
        try:
            done = await splice((self.reader, self.writer), pending, (up.reader, up.writer),
                                tunnel.idle_timeout_s, self.limits.response_send_timeout_s)
        finally:
            gw.metrics.active_upgraded -= 1
            up.close(abort=done is None or not done.graceful)
        ex.bytes_in, ex.bytes_out = done.client_to_upstream, done.upstream_to_client
        if not done.graceful:
            gw.metrics.error("upgrade_" + done.reason)
            ex.error = f"upgraded connection closed: {done.reason.replace('_', ' ')}"
        self._log(ex)

    # -- reading the body ---------------------------------------------------------------------

    async def read(self, n: int) -> bytes:
        """Up to ``n`` request body bytes; waiting for them counts against the body idle timeout."""
        pending = self.pending
        if pending:
            self.pending = pending[n:]
            return pending[:n]
        self._enter(BODY, self.limits.request_body_idle_timeout_s)
        try:
            return await self.reader.read(n)
        finally:
            self.phase = BUSY
            self.watchdog.disarm()

    # -- writing the answer -------------------------------------------------------------------

    def reply(self, ex: Exchange, status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> None:
        status = final_status(status, ex)
        headers = traced(ex, headers)
        if self.transport.is_closing():
            ex.status = status
            return
        if status == 204 or status == 304:
            body = b""              # these never carry a body (RFC 9110 §15.3.5, §15.4.5)
        parts = [f"HTTP/1.1 {status} {reason(status)}\r\n"]
        parts += [f"{n}: {v}\r\n" for n, v in headers if n not in FRAMING]
        if status != 204 and status != 304:
            parts.append(f"content-length: {len(body)}\r\n")
        if close:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        data = "".join(parts).encode("latin-1", "replace")
        self.out.write(self.transport, data if ex.method == "HEAD" else data + body)
        self.linger = close
        ex.status = status
        ex.bytes_out = 0 if ex.method == "HEAD" else len(body)

    async def send_response(self, ex: Exchange, status: int, headers: list[tuple[str, str]],
                            body: AsyncIterator[bytes] | bytes | None, length: int | None, close: bool) -> bool:
        headers = traced(ex, headers)
        close = close or self.gw.draining or self.gw.idle_connections >= self.limits.max_idle_connections
        no_body = ex.method == "HEAD" or status in (204, 304) or status < 200
        parts = [f"HTTP/1.1 {status} {reason(status)}\r\n"]
        parts += [f"{n}: {v}\r\n" for n, v in headers if n not in FRAMING]
        chunked = False
        if ex.method == "HEAD":
            cl = header_value(headers, "content-length")
            if cl is not None:
                parts.append(f"content-length: {cl}\r\n")
        elif no_body:
            pass
        elif length is not None and length >= 0:
            parts.append(f"content-length: {length}\r\n")
        elif self.version == "HTTP/1.1":
            parts.append("transfer-encoding: chunked\r\n")
            chunked = True
        else:
            close = True
        if close:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("latin-1", "replace")
        if no_body or body is None:
            self.out.write(self.transport, head)
            ex.status = status
            return not close
        if isinstance(body, bytes):
            transport = self.transport
            self.out.write(transport, head + body)
            ex.status = status
            ex.bytes_out = len(body)
            if transport.get_write_buffer_size():       # else _drained() would return at once
                return await self._drained() and not close
            return not close and not transport.is_closing()
        return await self._stream(ex, status, head, body, chunked) and not close

    async def _stream(self, ex: Exchange, status: int, head: bytes, body: AsyncIterator[bytes],
                      chunked: bool) -> bool:
        writer = self.writer
        transport = self.transport
        it = body.__aiter__()
        got = await self.proxy.first_chunk(self, ex, it)
        if got is None:
            return False
        first, more = got
        ex.status = status
        self.out.settle(transport)      # a stream is written as it comes, after what is queued
        if chunked:
            writer.writelines((head, b"%x\r\n" % len(first), first, b"\r\n") if first else (head,))
        else:
            writer.write(head + first if len(first) < 16384 else head)
            if len(first) >= 16384:
                writer.write(first)
        sent = len(first)
        try:
            if more:
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
                        await self._drain()
            if chunked:
                writer.write(trailer_block(getattr(body, "trailers", None)))
        except (UpstreamReset, LocalReplyInterrupt) as e:
            # Headers are out: the only honest signal left is closing the client connection.
            self.proxy.failed_after_head(self, ex, e)
            transport.abort()
            return False
        except ConnectionError:
            ex.error = "client closed the connection"
            return False
        finally:
            ex.bytes_out = sent
        return await self._drained()

    async def _drain(self) -> None:
        self._enter(SEND, self.limits.response_send_timeout_s)
        try:
            await self.writer.drain()
        finally:
            self._enter(BUSY, None)

    async def _drained(self) -> bool:
        """Wait (bounded by the send timeout) until the client took what we wrote, if it has not."""
        if self.transport.get_write_buffer_size():
            try:
                await self._drain()
            except ConnectionError:
                return False
        return not self.transport.is_closing()

    async def _flush(self) -> None:
        try:
            await self._drain()
        except (ConnectionError, RuntimeError):
            pass

    # -- bookkeeping --------------------------------------------------------------------------

    def _log(self, ex: Exchange) -> None:
        log_exchange(self.gw, ex, self.peer_text)


class RequestBody:
    """The client's request body as an async iterator, de-chunked and held to the size limit."""
    __slots__ = ("conn", "length", "limit", "expect", "received", "done", "trailers", "_it")

    def __init__(self, conn: Connection, length: int | None, limit: int, expect_continue: bool):
        self.conn = conn
        self.length = length            # None = chunked
        self.limit = limit
        self.expect = expect_continue
        self.received = 0
        self.done = False
        self.trailers: list[tuple[str, str]] | None = None
        self._it = self._iterate()

    def __aiter__(self) -> "RequestBody":
        return self

    def __anext__(self):   # the generator's own awaitable: no extra coroutine per chunk
        return self._it.__anext__()

    async def _iterate(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if self.expect:
            # The client waits for this before sending the body: ask only when we want it.
            self.expect = False
            conn.out.settle(conn.transport)
            conn.writer.write(_CONTINUE)
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
                self.trailers = trailers or None
                if rest:
                    conn.pending = rest[0] + conn.pending
        except ConnectionError as e:
            # Keep client-side failures distinct from upstream ones for the caller.
            raise PeerClosed(f"client connection lost: {e}") from None
        self.done = True


def _upgrade_to(value: str | None, conn_tokens: set[str] | None, version: str) -> str | None:
    """The protocol an HTTP/1.1 request asks to switch to (RFC 9110 §7.8), or None.

    ``h2c`` is never passed on (RFC 9113 deprecates it, and a backend that took it would serve
    HTTP/2 requests the gateway never routed or filtered): such a request is served as HTTP/1.1,
    its Upgrade dropped like any hop-by-hop field."""
    if value is None or version != "HTTP/1.1" or not conn_tokens or "upgrade" not in conn_tokens:
        return None
    protocols = [p.strip() for p in value.split(",") if p.strip()]
    if not protocols or any(p.lower().startswith("h2c") for p in protocols):
        return None
    return ", ".join(protocols)


def _head_end(buf: bytes) -> int:
    """Where the first head in ``buf`` ends (after its empty line), or 0.

    A head whose lines end in a bare LF ends at "\\n\\n": it is handed to llhttp, which refuses
    it (400) instead of the connection waiting for a CRLFCRLF that never comes."""
    crlf = buf.find(b"\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf == -1:
        return lf + 2 if lf != -1 else 0
    if lf == -1 or crlf < lf:
        return crlf + 3
    return lf + 2


async def _lingering_close(conn: Connection, seconds: float) -> None:
    """Send FIN, then read and drop what the client still sends for a moment.

    Closing a socket with unread input makes the kernel send RST, which can destroy the error
    response we just wrote before the client reads it (e.g. a 431 while the client is still
    sending its huge header).
    """
    try:
        conn.out.settle(conn.transport)
        if conn.writer.can_write_eof():     # TLS cannot half-close: there, only read and drop
            conn.writer.write_eof()
        async with asyncio.timeout(seconds):
            dropped = 0
            while dropped < 16 * 1024 * 1024:
                data = await conn.reader.read(65536)
                if not data:
                    break
                dropped += len(data)
    except (TimeoutError, ConnectionError, OSError, RuntimeError, HttpError, _HeadTimeout):
        pass


def _origin_form(method: str, target: str, authority: str | None) -> tuple[str, str | None]:
    """Absolute-form targets carry the authority (it replaces Host); '*' only for OPTIONS."""
    if target == "*" and method == "OPTIONS":
        return target, authority
    lower = target[:8].lower()
    if lower.startswith("http://") or lower.startswith("https://"):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        auth, path = (rest, "/") if slash == -1 else (rest[:slash], rest[slash:])
        if not auth:
            raise HttpError(400, "absolute request target without authority")
        check_authority(auth)
        return path, auth
    raise HttpError(400, f"invalid request target {target[:60]!r}")

