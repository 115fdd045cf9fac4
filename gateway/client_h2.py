"""HTTP/2 clients: frames through python-hyper's h2 state machine, each stream through the proxy.

One H2Connection per client connection reads frames and feeds them to ``h2`` (framing, HPACK,
stream states, flow-control accounting and the protocol's own checks are the library's); every
request stream runs in its own task as an H2Stream, the proxy's Downstream for that stream, so
the route's filters, the upstream (HTTP/1.1) and the access log see it exactly as an HTTP/1.1
request (``:authority`` is its Host, cookies split over fields are joined with "; ").

Limits, per stream where HTTP/1.1 has them per connection:

- SETTINGS_MAX_CONCURRENT_STREAMS = ``limits.http2_max_concurrent_streams``; a stream opened while
  that many are still being served (a reset stream counts until its task ended: "rapid reset")
  is refused (RST_STREAM REFUSED_STREAM), and a client that keeps doing it gets GOAWAY;
- ``limits.http2_max_streams_per_io_cycle`` streams start per event-loop turn; the others a read
  brought wait, in order, for the next turns, after the other connections' events (what Envoy's
  http.max_requests_per_io_cycle does against abusive HTTP/2 connections);
- the request head (decoded header list, RFC 9113 §6.5.2 sizes) over ``limits.max_header_bytes``
  → 431 on that stream; far over it (twice, or 64 KiB) → GOAWAY, as HPACK stops decoding;
- receive flow control: each stream's window is ``limits.http2_stream_window_bytes`` and is
  handed back only as the proxy consumes the body, so a client can run at most one window ahead
  of a proxy that does not read; the connection window is the sum of the streams', so a stalled
  stream never blocks the others;
- ``request_body_idle_timeout_s`` between DATA frames → 408 on the stream (then RST_STREAM);
- ``response_send_timeout_s`` for the client to open its window or drain the socket → the stream
  is reset (CANCEL), or the connection aborted if the socket itself stopped draining;
- ``request_header_timeout_s`` from accept to the first request, ``keepalive_timeout_s`` with no
  stream open (the server's sweep) → GOAWAY and close.

A stream the client resets, or a connection that goes away, cancels the stream's request task as
for HTTP/1.1 (499, filters torn down). A response that cannot be completed after its headers
went out (upstream reset, a filter rejecting a response body chunk) resets the stream
(INTERNAL_ERROR). A response sent while the client is still sending its body is followed by
RST_STREAM(NO_ERROR) (RFC 9113 §8.1). A malformed frame or header block is a connection error:
GOAWAY with h2's error code, then close. Draining sends GOAWAY and lets open streams finish.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, AsyncIterator

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from abi.api import LocalReplyInterrupt, TlsFacts

from .config import Limits
from .http1 import HOP_BY_HOP, BodyTooLarge, HttpError, PeerClosed
from .proxy import (ClientRequest, Exchange, GatewayState, final_status, header_value, init_connection,
                    log_exchange, traced)
from .request_head import check_authority
from .upstream import UpstreamReset

log = logging.getLogger("wasmgate.proxy")

_READ = 65536
_HIGH_WATER = 65536
_SMALL = 16384              # body pieces below this are written with other streams' frames
# Refused streams a client may cause (beyond max_concurrent_streams itself) before GOAWAY.
_REFUSED_BUDGET = 100
# Response fields HTTP/2 forbids (RFC 9113 §8.2.2) and those we frame ourselves.
_NOT_SENT = HOP_BY_HOP | {"content-length"}
_CONNECTION_GONE = "client closed the connection"


class _SendTimeout(Exception):
    pass


def _h2_config() -> h2.config.H2Configuration:
    # Header names and values stay bytes: decoded here as latin-1 like HTTP/1.1 heads. h2's checks
    # (RFC 9113 §8.2-8.3) stay on both ways; cookie fields are joined in H2Stream._request.
    return h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                     normalize_inbound_headers=False, validate_outbound_headers=True,
                                     normalize_outbound_headers=False)


class H2Connection:
    """One HTTP/2 client connection (h2c with prior knowledge, or TLS with ALPN "h2")."""

    def __init__(self, gw: GatewayState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: TlsFacts | None = None, preread: bytes = b""):
        init_connection(self, gw, reader, writer, tls)
        self.limits: Limits = gw.generation.config.limits
        self.preread = preread
        self.task: asyncio.Task | None = None
        self.streams: dict[int, H2Stream] = {}      # streams whose task is still running
        self.last_active = time.monotonic()
        self.requests = 0
        self.refused = 0
        self.closing = False        # GOAWAY sent or received: no new streams
        # Streams received but not started yet (http2_max_streams_per_io_cycle), with their headers.
        self._deferred: deque[tuple[H2Stream, list]] = deque()
        self._start_budget = 0      # streams the read being handled may still start at once
        self._flush_handle: asyncio.Handle | None = None
        self._loop = asyncio.get_running_loop()
        lim = self.limits
        # HPACK stops decoding here (a connection error); between max_header_bytes and this → 431.
        self.header_ceiling = max(2 * lim.max_header_bytes, 65536)
        self.h2 = h2.connection.H2Connection(_h2_config())
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: lim.http2_max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: lim.http2_stream_window_bytes,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_bytes,
        })
        self.h2.decoder.max_header_list_size = self.header_ceiling

    # -- what the server's sweep and drain call ------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.streams

    def close_idle(self) -> None:
        """No stream for keepalive_timeout_s: GOAWAY(NO_ERROR), then close."""
        self.goaway(ErrorCodes.NO_ERROR)
        self._close_when_done()

    def drain(self) -> None:
        """The gateway stops: GOAWAY, the open streams finish, then the connection closes."""
        self.goaway(ErrorCodes.NO_ERROR)
        self._close_when_done()

    def goaway(self, code: ErrorCodes) -> None:
        """NO_ERROR: no new streams, the open ones finish. Any other code: close now."""
        if self.closing or self.transport.is_closing():
            return
        self.closing = True
        if code == ErrorCodes.NO_ERROR:
            # Written beside h2's state machine: h2 sends nothing more once it sent a GOAWAY
            # itself, and the open streams still have answers to send.
            self.flush()
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = code
            self.writer.write(frame.serialize())
            return
        try:
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass                # the state machine is closed already
        self.flush()
        self.transport.close()

    def _close_when_done(self) -> None:
        if self.closing and not self.streams and not self.transport.is_closing():
            self.flush()
            self.transport.close()

    # -- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        gw = self.gw
        self.task = asyncio.current_task()
        proto = self.transport.get_protocol()
        if hasattr(proto, "on_gone"):
            proto.on_gone = None    # the read loop below sees the client go (h1's hook is not ours)
        gw.connections.add(self)
        gw.metrics.active_connections += 1
        self.h2.initiate_connection()
        # Connection window = all streams' windows: one stalled stream never blocks another.
        lim = self.limits
        extra = min(lim.http2_stream_window_bytes * lim.http2_max_concurrent_streams, 2**31 - 1) - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.flush()
        first_request = self._loop.call_later(lim.request_header_timeout_s, self._no_request)
        data = self.preread
        self.preread = b""
        try:
            while True:
                if data:
                    self.last_active = time.monotonic()
                    if not self._receive(data):
                        break
                    if self.requests:
                        first_request.cancel()
                    if self.transport.get_write_buffer_size() > _HIGH_WATER:
                        # Our answers to its frames pile up (a PING or SETTINGS flood from a client
                        # that does not read): stop reading until it takes them.
                        await asyncio.wait_for(self.writer.drain(), lim.response_send_timeout_s)
                data = await self.reader.read(_READ)
                if not data:
                    break
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error on HTTP/2 connection %s", self.peer_text)
        finally:
            first_request.cancel()
            await self._end_streams()
            gw.connections.discard(self)
            gw.metrics.active_connections -= 1
            if not self.transport.is_closing():
                self.flush()
                self.transport.close()

    def _no_request(self) -> None:
        if not self.requests:
            self.goaway(ErrorCodes.NO_ERROR)
            self._close_when_done()

    def _receive(self, data: bytes) -> bool:
        """Feed bytes to h2 and act on its events; False once the connection is done for."""
        if not self._deferred:      # else the streams waiting go first, one turn's worth at a time
            self._start_budget = self.limits.http2_max_streams_per_io_cycle
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY with the error code — except for a wrong preface (say, HTTP/1.1
            # after ALPN chose h2), where RFC 9113 §3.4 lets it be omitted: we send one anyway.
            try:
                self.h2.close_connection(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR))
            except h2.exceptions.ProtocolError:
                pass                    # already closed, its GOAWAY queued
            kind = "h2_flood" if isinstance(e, h2.exceptions.DenialOfServiceError) else "h2_protocol_error"
            self.gw.metrics.error(kind)
            log.info("HTTP/2 client %s: %s; GOAWAY", self.peer_text, e)
            self.closing = True
            self.flush()
            return False
        for ev in events:
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                handler(self, ev)
        if self._overlong_frame():
            self.gw.metrics.error("h2_protocol_error")
            log.info("HTTP/2 client %s: frame over SETTINGS_MAX_FRAME_SIZE (or not HTTP/2 at all); GOAWAY",
                     self.peer_text)
            self.goaway(ErrorCodes.FRAME_SIZE_ERROR)
        self.flush()
        return not self.transport.is_closing()

    def _overlong_frame(self) -> bool:
        """Whether the next frame announces more than SETTINGS_MAX_FRAME_SIZE.

        h2 checks a frame's length only once all of it arrived, so a header announcing 16 MiB
        (or HTTP/1.1 text read as one: "GET" is a length of 4.6 MB) would be buffered for that
        long. Peeking at h2's buffer (h2 4.x) refuses it on its 9-byte header."""
        pending = self.h2.incoming_buffer._data
        return len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self.h2.max_inbound_frame_size

    async def _end_streams(self) -> None:
        """The connection is gone: every stream still served ends as a vanished client's."""
        while self._deferred:        # logged as 499s, as any stream the client left behind
            self._start(*self._deferred.popleft())
        tasks = []
        for stream in list(self.streams.values()):
            stream.peer_gone(_CONNECTION_GONE)
            if stream.task is not None:
                tasks.append(stream.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- events --------------------------------------------------------------------------------

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        if self.closing:
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.http2_max_concurrent_streams:
            # Still serving that many (reset ones included): refuse, and stop a client that makes
            # a habit of it (CVE-2023-44487, "rapid reset").
            self.refused += 1
            self.gw.metrics.error("h2_refused_stream")
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            if self.refused > _REFUSED_BUDGET + self.requests // 10:
                self.gw.metrics.error("h2_flood")
                self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self.requests += 1
        stream = H2Stream(self, sid, ev.stream_ended is not None)
        if not stream.remote_ended:
            # Now, not in the task: DATA frames may follow in this very batch of events.
            lim = self.limits
            stream.body = H2Body(stream, lim.max_request_body_bytes, lim.request_body_idle_timeout_s)
        self.streams[sid] = stream
        if self._start_budget > 0:
            self._start_budget -= 1
            self._start(stream, ev.headers)
            return
        if not self._deferred:
            self._loop.call_soon(self._start_deferred)
        self._deferred.append((stream, ev.headers))

    @staticmethod
    def _start(stream: "H2Stream", headers: list) -> None:
        stream.task = asyncio.ensure_future(stream.serve(headers))

    def _start_deferred(self) -> None:
        """One turn's worth of the streams waiting to start; the rest wait for the next turn.
        A stream reset meanwhile starts too: it ends at once as a vanished client's (499)."""
        waiting = self._deferred
        for _ in range(self.limits.http2_max_streams_per_io_cycle):
            if not waiting:         # all started (or the connection went, _end_streams)
                return
            self._start(*waiting.popleft())
        if waiting:
            self._loop.call_soon(self._start_deferred)

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        stream = self.streams.get(ev.stream_id)
        if stream is None or stream.body is None or stream.body.closed:
            # Nobody reads it any more (answered early, body refused): hand the window back.
            self._ack(ev.stream_id, ev.flow_controlled_length)
            return
        stream.body.feed(ev.data, ev.flow_controlled_length)

    def _on_trailers(self, ev: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(ev.stream_id)
        if stream is not None and stream.body is not None:
            stream.body.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in ev.headers]

    def _on_end(self, ev: h2.events.StreamEnded) -> None:
        stream = self.streams.get(ev.stream_id)
        if stream is not None:
            stream.remote_ended = True
            if stream.body is not None:
                stream.body.end()

    def _on_reset(self, ev: h2.events.StreamReset) -> None:
        stream = self.streams.get(ev.stream_id)
        if stream is not None:
            stream.peer_gone(f"client reset the stream ({_code_name(ev.error_code)})")

    def _on_window(self, ev: h2.events.WindowUpdated) -> None:
        if ev.stream_id:
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.wake()
        else:
            self._wake_all()

    def _on_settings(self, ev: h2.events.RemoteSettingsChanged) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
            self._wake_all()

    def _on_settings_ack(self, ev: h2.events.SettingsAcknowledged) -> None:
        # h2 narrows HPACK's limit to the advertised one on ACK; keep the ceiling (→ 431 below it).
        self.h2.decoder.max_header_list_size = self.header_ceiling

    def _on_goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        self.closing = True             # the client opens no more streams; the open ones finish
        self._loop.call_soon(self._close_when_done)

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream.wake()

    # -- writing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has queued."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.writer.write(data)

    def flush_soon(self) -> None:
        """Write at the end of this loop iteration: frames of several streams go out together."""
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def _ack(self, sid: int, n: int) -> None:
        if n:
            try:
                self.h2.acknowledge_received_data(n, sid)
            except (h2.exceptions.ProtocolError, ValueError):
                return
            self.flush_soon()

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            return              # already closed
        self.flush_soon()

    def stream_done(self, stream: "H2Stream") -> None:
        self.streams.pop(stream.sid, None)
        self.last_active = time.monotonic()
        self._close_when_done()


_HANDLERS = {
    h2.events.RequestReceived: H2Connection._on_request,
    h2.events.DataReceived: H2Connection._on_data,
    h2.events.TrailersReceived: H2Connection._on_trailers,
    h2.events.StreamEnded: H2Connection._on_end,
    h2.events.StreamReset: H2Connection._on_reset,
    h2.events.WindowUpdated: H2Connection._on_window,
    h2.events.RemoteSettingsChanged: H2Connection._on_settings,
    h2.events.SettingsAcknowledged: H2Connection._on_settings_ack,
    h2.events.ConnectionTerminated: H2Connection._on_goaway,
}


def _code_name(code: Any) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Stream:
    """One request stream: builds the ClientRequest, serves it, and is the proxy's Downstream."""
    __slots__ = ("conn", "sid", "id", "peer", "local", "peer_text", "tls", "task", "body", "busy", "gone",
                 "remote_ended", "headers_sent", "ended", "_waiter", "_outbox")

    def __init__(self, conn: H2Connection, sid: int, remote_ended: bool):
        self.conn = conn
        self.sid = sid
        self.id = conn.id
        self.peer = conn.peer
        self.local = conn.local
        self.peer_text = conn.peer_text
        self.tls = conn.tls             # the connection's TLS facts (filters' connection.* properties)
        self.task: asyncio.Task | None = None
        self.body: H2Body | None = None
        self.busy = False
        self.gone = ""                  # why the client is gone (reset the stream, connection lost)
        self.remote_ended = remote_ended
        self.headers_sent = False
        self.ended = False              # our side of the stream is closed (END_STREAM or reset)
        self._waiter: asyncio.Future | None = None
        self._outbox = b""              # the rest of a whole response reply() could not send yet

    # -- the request ---------------------------------------------------------------------------

    async def serve(self, raw_headers: list) -> None:
        conn = self.conn
        gw = conn.gw
        gen = gw.generation
        ex = Exchange("-", "-")
        ex.keepalive = True
        gen.active += 1
        try:
            try:
                req = self._request(ex, raw_headers, gen.config.limits)
                if req is not None:
                    self.busy = True
                    if self.gone:
                        raise asyncio.CancelledError
                    await conn.proxy.serve(self, gen, ex, req)
            except HttpError as e:
                conn.proxy.reply_error(self, ex, e.status, e.message,
                                       "client_timeout" if e.status == 408 else "bad_request")
            except asyncio.CancelledError:
                if not self.gone:
                    raise
                asyncio.current_task().uncancel()       # type: ignore[union-attr]
                conn.proxy.client_gone(ex, self.gone)
            finally:
                self.busy = False
            if not self.gone:
                await self._finish()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("unexpected error on HTTP/2 stream %d of %s", self.sid, self.peer_text)
            self.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            gen.active -= 1
            if self.body is not None:
                self.body.close()
            log_exchange(gw, ex, self.peer_text)
            conn.stream_done(self)

    def _request(self, ex: Exchange, raw_headers: list, limits: Limits) -> ClientRequest | None:
        """The stream's head as the proxy takes it (h2 checked the pseudo-header rules)."""
        method = path = authority = host = rid = cl = None
        headers: list[tuple[str, str]] = []
        cookies: list[str] = []
        size = 0
        for n, v in raw_headers:
            size += len(n) + len(v) + 32                 # RFC 9113 §6.5.2's header list size
            if n[0] == 58:                               # ":"
                if n == b":method":
                    method = v.decode("latin-1")
                elif n == b":path":
                    path = v.decode("latin-1")
                elif n == b":authority":
                    authority = v.decode("latin-1")
                continue
            name, value = n.decode("latin-1"), v.decode("latin-1")
            if name == "cookie":
                cookies.append(value)                   # RFC 9113 §8.2.3: joined for HTTP/1.1
                continue
            if name == "host":
                host = value
            elif name == "x-request-id":
                rid = value if rid is None else ""      # two of them: generate our own
            elif name == "content-length":
                cl = value
            headers.append((name, value))
        if cookies:
            headers.append(("cookie", "; ".join(cookies)))
        ex.method = method or "-"
        ex.target = path or "-"
        if size > limits.max_header_bytes:
            self.conn.proxy.reply_error(self, ex, 431, f"request header list over {limits.max_header_bytes} bytes",
                                        "header_too_large")
            return None
        if method == "CONNECT" or path is None:
            raise HttpError(400, "CONNECT is not supported")
        if path == "*":
            self.conn.proxy.reply_error(self, ex, 404, "no route for OPTIONS *", "no_route")
            return None
        if path[0] != "/":
            raise HttpError(400, f"invalid :path {path[:60]!r}")
        authority = authority or host
        if not authority:
            raise HttpError(400, "no :authority or Host")
        check_authority(authority)
        length: int | None = None
        if cl is not None:
            if not (cl.isdigit() and cl.isascii()) or len(cl) > 18:
                raise HttpError(400, f"invalid Content-Length {cl!r}")
            length = int(cl)
            if length > limits.max_request_body_bytes:
                self.conn.proxy.reply_error(self, ex, 413, f"request body of {length} bytes is over the "
                                            f"{limits.max_request_body_bytes} byte limit", "body_too_large")
                return None
        if self.body is None:
            length = -1 if length is None else length
            if length > 0:
                raise HttpError(400, "Content-Length without a body")
        return ClientRequest(method, path, authority, headers, None, rid, self.body, length, "HTTP/2",
                             self.conn.scheme)

    # -- a vanishing client --------------------------------------------------------------------

    def peer_gone(self, why: str) -> None:
        if self.gone:
            return
        self.gone = why or _CONNECTION_GONE
        self.ended = True
        if self.body is not None:
            self.body.fail(ConnectionResetError(why))
        self.wake()
        if self.busy and self.task is not None:
            self.task.cancel()

    # -- writing the answer (Downstream) -------------------------------------------------------

    def reply(self, ex: Exchange, status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> None:
        status = final_status(status, ex)
        headers = traced(ex, headers)
        ex.status = status
        if self.ended or self.headers_sent:
            return
        if status == 204 or status == 304:
            body = b""
        head = self._head(status, headers)
        if status != 204 and status != 304:
            head.append(("content-length", str(len(body))))
        if ex.method == "HEAD":
            body = b""
        if not self._send_headers(head, end=not body):
            return
        ex.bytes_out = len(body)
        if body:
            self._outbox = body     # the rest goes out from the stream's task as the window opens
            self._write(end=True)
            self.conn.flush_soon()

    async def send_response(self, ex: Exchange, status: int, headers: list[tuple[str, str]],
                            body: AsyncIterator[bytes] | bytes | None, length: int | None, close: bool) -> bool:
        headers = traced(ex, headers)
        head = self._head(status, headers)
        if ex.method == "HEAD":
            cl = header_value(headers, "content-length")
            if cl is not None:
                head.append(("content-length", cl))
        elif length is not None and length >= 0 and status not in (204, 304):
            head.append(("content-length", str(length)))
        if ex.method == "HEAD" or status in (204, 304) or body is None:
            ex.status = status
            self._send_headers(head, end=True)
            return True
        if isinstance(body, bytes):
            ex.status = status
            if self._send_headers(head, end=not body):
                ex.bytes_out = len(body)
                await self._send(body, end=True)
            return True
        return await self._stream(ex, status, head, body)

    async def _stream(self, ex: Exchange, status: int, head: list[tuple[str, str]],
                      body: AsyncIterator[bytes]) -> bool:
        it = body.__aiter__()
        got = await self.conn.proxy.first_chunk(self, ex, it)
        if got is None:
            return False
        first, more = got
        ex.status = status
        trailers = None if more else getattr(body, "trailers", None)
        if not self._send_headers(head, end=not more and not first and not trailers):
            return False
        sent = 0
        try:
            if first:
                await self._send(first, end=False)
                sent += len(first)
            if more:
                async for chunk in it:
                    if chunk:
                        await self._send(chunk, end=False)
                        sent += len(chunk)
                trailers = getattr(body, "trailers", None)
            self._end(trailers)
        except (UpstreamReset, LocalReplyInterrupt) as e:
            self.conn.proxy.failed_after_head(self, ex, e)
            self.reset(ErrorCodes.INTERNAL_ERROR)
            return False
        except _SendTimeout:
            ex.error = "client did not take the response in time"
            return False
        except ConnectionError:
            ex.error = self.gone
            return False
        finally:
            ex.bytes_out = sent
        return True

    def _head(self, status: int, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        head = [(":status", str(status))]
        for n, v in headers:
            n = n.lower()
            if n not in _NOT_SENT and n[:1] != ":":
                head.append((n, v.strip(" \t")))
        return head

    def _send_headers(self, head: list[tuple[str, str]], end: bool) -> bool:
        if self.ended:
            return False
        conn = self.conn
        try:
            conn.h2.send_headers(self.sid, head, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            if self.ended:
                return False
            # A field HTTP/2 cannot carry (e.g. a filter's value with a line break): refuse to send.
            log.warning("HTTP/2 stream %d of %s: response head not sendable: %s", self.sid, self.peer_text, e)
            conn.gw.metrics.error("h2_bad_response_head")
            self.reset(ErrorCodes.INTERNAL_ERROR)
            return False
        self.headers_sent = True
        if end:
            self.ended = True
        conn.flush_soon()
        return True

    def _end(self, trailers: list[tuple[str, str]] | None) -> None:
        if self.ended:
            return
        conn = self.conn
        trailer_head = [(n.lower(), v) for n, v in trailers or () if n[:1] != ":" and n.lower() not in _NOT_SENT]
        try:
            if trailer_head:
                conn.h2.send_headers(self.sid, trailer_head, end_stream=True)
            else:
                conn.h2.end_stream(self.sid)
        except h2.exceptions.ProtocolError as e:
            log.warning("HTTP/2 stream %d of %s: trailers not sendable: %s", self.sid, self.peer_text, e)
            self.reset(ErrorCodes.INTERNAL_ERROR)
            return
        self.ended = True
        conn.flush_soon()

    def _write(self, end: bool) -> None:
        """Send what the client's windows allow of the outbox (``end``: END_STREAM on its last byte)."""
        conn = self.conn
        h2c = conn.h2
        data = self._outbox
        while data and not self.ended:
            n = min(h2c.local_flow_control_window(self.sid), h2c.max_outbound_frame_size, len(data))
            if n <= 0:
                break
            last = n == len(data)
            h2c.send_data(self.sid, data[:n], end_stream=end and last)
            data = data[n:]
            if end and last:
                self.ended = True
        self._outbox = data

    async def _send(self, data: bytes, end: bool) -> None:
        """Send ``data`` as the client's windows allow, waiting (send timeout) when they are shut."""
        self._outbox = data
        conn = self.conn
        timeout = conn.limits.response_send_timeout_s
        while True:
            if self.gone:
                raise ConnectionResetError(self.gone)
            self._write(end)
            if not self._outbox:
                break
            conn.flush()
            await self._wait(timeout)
        if len(data) < _SMALL:
            conn.flush_soon()       # small answers of several streams go out in one write
            return
        conn.flush()
        if conn.transport.get_write_buffer_size() > _HIGH_WATER:
            try:
                await asyncio.wait_for(conn.writer.drain(), timeout)
            except asyncio.TimeoutError:
                conn.gw.metrics.error("client_send_timeout")
                log.info("HTTP/2 client %s did not read for %g s; closing", self.peer_text, timeout)
                conn.transport.abort()
                raise _SendTimeout() from None

    async def _wait(self, timeout: float) -> None:
        self._waiter = self.conn._loop.create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        except asyncio.TimeoutError:
            self.conn.gw.metrics.error("client_send_timeout")
            log.info("HTTP/2 client %s kept stream %d's window shut for %g s; resetting it",
                     self.peer_text, self.sid, timeout)
            self.reset(ErrorCodes.CANCEL)
            raise _SendTimeout() from None
        finally:
            self._waiter = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _finish(self) -> None:
        """After the proxy: deliver what reply() left, then close our side of the stream."""
        if self._outbox and not self.ended:
            timeout = self.conn.limits.response_send_timeout_s
            try:
                while self._outbox and not self.ended:
                    await self._wait(timeout)
                    self._write(end=True)
                    self.conn.flush()
            except _SendTimeout:
                return
        if not self.headers_sent and not self.ended:
            self.reset(ErrorCodes.INTERNAL_ERROR)       # no answer was produced (a bug upstream of here)
        elif not self.remote_ended and not self.gone:
            # Answered before the client finished sending: tell it to stop (RFC 9113 §8.1).
            self.reset(ErrorCodes.NO_ERROR)

    def reset(self, code: ErrorCodes) -> None:
        self.ended = True
        self.conn._reset(self.sid, code)


class H2Body:
    """A stream's request body as an async iterator; the stream's window reopens as it is read."""
    __slots__ = ("stream", "limit", "idle_s", "received", "done", "trailers", "closed", "_chunks", "_ended",
                 "_error", "_waiter")

    def __init__(self, stream: H2Stream, limit: int, idle_s: float):
        self.stream = stream
        self.limit = limit
        self.idle_s = idle_s
        self.received = 0
        self.done = False
        self.trailers: list[tuple[str, str]] | None = None
        self.closed = False             # nobody reads any more: data is acknowledged and dropped
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def feed(self, data: bytes, flow_controlled: int) -> None:
        self.received += len(data)
        if self.received > self.limit and self._error is None:
            self.fail(BodyTooLarge(self.limit))
        if self._error is not None:
            self.stream.conn._ack(self.stream.sid, flow_controlled)
            return
        self._chunks.append((data, flow_controlled))
        self._wake()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def close(self) -> None:
        """The stream is over: hand back the window of what was never read."""
        self.closed = True
        conn = self.stream.conn
        while self._chunks:
            conn._ack(self.stream.sid, self._chunks.popleft()[1])

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> "H2Body":
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                error = self._error
                if isinstance(error, ConnectionError):
                    raise PeerClosed(str(error))
                raise error
            if self._ended:
                self.done = True
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, self.idle_s)
            except asyncio.TimeoutError:      # answered (and counted) where the body read fails
                self.fail(HttpError(408, f"no request body data for {self.idle_s:g} s"))
            finally:
                self._waiter = None
        data, flow_controlled = self._chunks.popleft()
        self.stream.conn._ack(self.stream.sid, flow_controlled)
        return data
