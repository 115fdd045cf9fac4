"""One request, whatever protocol brought it: route → filter chain → upstream → filter chain → client.

A downstream front-end (client_h1.py for HTTP/1.1) parses the request into a ClientRequest and
hands it to ``Proxy.serve`` together with itself as the ``Downstream`` that writes the answer.
Here the request gets the one path everybody sees (paths.py), a validated request id and
headers the client may not set removed (request_head.py), then its route's filters. The body is
read ahead (spool.py) before an upstream connection is taken, and the response is read ahead of
the client, so a slow client holds no upstream connection. A route without filters never
touches the ABI.

A client that goes away while its request is in the chain, waiting for a connection or for the
upstream is noticed by the front-end, which cancels the request: the upstream exchange is
aborted (or never started), the filters still get on_done/on_log/on_delete, and the access log
says 499 as nginx does.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from operator import itemgetter
from typing import AsyncIterator, Protocol

from abi.api import Forward, LocalReply, LocalReplyInterrupt, LogInfo, StreamInfo, TlsFacts

from .accesslog import AccessLog
from .config import Config, Route
from .http1 import BodyTooLarge, HttpError, PeerClosed, strip_hop_by_hop
from .metrics import Metrics
from .paths import PathPolicy, RedirectTo, needs_normalizing, normalize_path, routing_path
from .random_ids import random_hex
from .request_head import upstream_headers, valid_request_id
from .routing import Router, rewrite_target
from .spool import Spool
from .tracing import DEBUG_HEADER, RequestTrace, Tracer, TraceHeaders
from .upstream import UpstreamError, UpstreamReset, UpstreamResponse, Upstreams, UpstreamTunnel

log = logging.getLogger("wasmgate.proxy")

Headers = list[tuple[str, str]]

CONN_IDS = itertools.count(1)       # downstream connection ids, whatever the protocol


def init_connection(conn, gw: "GatewayState", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    tls: TlsFacts | None) -> None:
    """What every front-end's client connection holds: the gateway, its streams, an id, the peer
    (also as "ip:port" for logs), our local address, the TLS facts and the scheme they make."""
    conn.gw = gw
    conn.proxy = gw.proxy
    conn.reader = reader
    conn.writer = writer
    conn.transport = writer.transport
    conn.id = next(CONN_IDS)
    peer = writer.get_extra_info("peername") or ("", 0)
    local = writer.get_extra_info("sockname") or ("", 0)
    conn.peer, conn.peer_text, conn.local = (peer[0], peer[1]), f"{peer[0]}:{peer[1]}", (local[0], local[1])
    conn.tls = tls                  # a TLS listener's connection facts; None on a plain one
    conn.scheme = "http" if tls is None else "https"


@dataclass
class Generation:
    """Everything one config generation serves with; a reload swaps the whole object."""
    config: Config
    router: Router
    upstreams: Upstreams
    filter_host: object | None      # abi.api.FilterHostProtocol
    active: int = 0                 # requests being served on it (a reload retires it at 0)
    tls: dict = field(default_factory=dict)   # listener name -> gateway.tls.ServerTls


class GatewayState(Protocol):
    """What serving requests reads and counts of the running gateway (server.Gateway)."""
    draining: bool
    metrics: Metrics
    access_log: AccessLog
    generation: Generation
    connections: set
    idle_connections: int
    proxy: "Proxy"
    tracer: Tracer


class RequestBodyLike(Protocol):
    """The client's request body as a front-end delivers it."""
    received: int                   # bytes read from the client so far
    done: bool                      # read to its end

    def __aiter__(self) -> AsyncIterator[bytes]: ...


class ClientRequest:
    """A request as a downstream front-end hands it over (names lower-case, no pseudo-headers)."""
    __slots__ = ("method", "target", "authority", "headers", "conn_tokens", "request_id", "body", "length",
                 "version", "scheme", "upgrade")

    def __init__(self, method: str, target: str, authority: str, headers: Headers, conn_tokens: set[str] | None,
                 request_id: str | None, body: RequestBodyLike | None, length: int | None, version: str,
                 scheme: str, upgrade: str | None = None):
        self.method = method
        self.target = target            # origin-form, as the client sent it
        self.authority = authority      # validated host[:port]
        self.headers = headers
        self.conn_tokens = conn_tokens  # names listed in Connection (hop-by-hop), HTTP/1.1 only
        self.request_id = request_id    # the client's x-request-id, unvalidated
        self.body = body                # None: no body
        self.length = length            # Content-Length, None = unknown (chunked), -1 = no body
        self.version = version          # "HTTP/1.1", "HTTP/1.0", "HTTP/2"
        self.scheme = scheme            # "http" | "https"
        self.upgrade = upgrade          # the Upgrade header of an HTTP/1.1 upgrade request (WebSocket)


class Downstream(Protocol):
    """What the proxy needs of the connection a request came in on."""
    id: int
    peer: tuple[str, int]
    local: tuple[str, int]
    peer_text: str
    tls: TlsFacts | None            # None on a plain connection

    def reply(self, ex: "Exchange", status: int, headers: Headers, body: bytes, close: bool) -> None:
        """Write a whole response with this body."""

    async def send_response(self, ex: "Exchange", status: int, headers: Headers,
                            body: AsyncIterator[bytes] | bytes | None, length: int | None,
                            close: bool) -> bool:
        """Write a response head and stream its body; return whether the connection may go on.
        ``length``: None = unknown. The head goes out with the first chunk, so an error
        before it (LocalReplyInterrupt, UpstreamReset) can still become a clean answer."""


class Exchange:
    """Per-request facts collected for the access log, metrics and LogInfo."""
    __slots__ = ("t0", "method", "target", "route", "status", "bytes_out", "upstream", "error", "rid", "body",
                 "keepalive", "upgrade", "tunnel", "bytes_in", "trace")

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
        self.body: RequestBodyLike | None = None
        self.keepalive = False
        self.upgrade: str | None = None     # the protocol an upgrade request asks for
        self.tunnel: Tunnel | None = None   # set when the upstream switched protocols (101)
        self.bytes_in = 0                   # client bytes without a request body (a tunnel's)
        self.trace: RequestTrace | None = None  # tracing.py: this request's trace, once routed


class Tunnel:
    """A 101 the front-end still has to send, and the upstream connection to splice it with."""
    __slots__ = ("upstream", "headers", "idle_timeout_s")

    def __init__(self, upstream: UpstreamTunnel, headers: Headers, idle_timeout_s: float):
        self.upstream = upstream
        self.headers = headers          # the 101's headers after the filters, incl. upgrade + connection
        self.idle_timeout_s = idle_timeout_s


class Proxy:
    def __init__(self, gateway: GatewayState):
        self.gw = gateway
        self.metrics = gateway.metrics

    async def serve(self, conn: Downstream, gen: Generation, ex: Exchange, req: ClientRequest) -> bool:
        """Serve one request; return whether the connection may carry another."""
        config = gen.config
        path, sep, query = req.target.partition("?")
        if "#" in req.target:
            raise HttpError(400, "a fragment in the request target")
        if needs_normalizing(path):         # most paths are normal already: no call at all
            try:
                path = normalize_path(path, config.path_normalization)
            except RedirectTo as r:
                return self._redirect(conn, ex, r.path + sep + query, req)
            rpath = routing_path(path)
        else:
            rpath = path                    # nothing to normalise means no ";" parameters either
        target = path + sep + query if sep else path
        ex.target = target
        rid = req.request_id
        if rid is None or not valid_request_id(rid):
            rid = random_hex(16)            # request_head.new_request_id, inlined: 128 random bits
        ex.rid = rid
        # Routes match on the headers as the filters and the upstream get them: a route on an
        # internal header (x-auth-identity) must not be chosen by a value the client sent.
        tracer = self.gw.tracer
        got = TraceHeaders() if tracer.active else None
        headers = upstream_headers(req.headers, req.conn_tokens, conn.peer[0], req.authority, rid, req.scheme,
                                   config.internal_headers, got)
        route = gen.router.match(req.method, req.authority, rpath, headers)
        has_body = req.body is not None
        if route is None:
            return self.reply_error(conn, ex, 404, f"no route for {req.method} {req.authority}{path}", "no_route",
                                    close=not ex.keepalive or has_body)
        ex.route = route.name
        ex.body = req.body
        if got is not None:
            ex.trace = tracer.begin(got, conn.peer[0], headers, req.method, route.name)
        if req.upgrade is not None:
            if not route.upgrades:
                # As Envoy (403, "upgrade_failed"), and the connection closes: a client may already
                # be sending the new protocol, which must never be read as a next request.
                return self.reply_error(conn, ex, 403, f'route "{route.name}" does not allow upgrades',
                                        "upgrade_refused", close=True)
            # Filters and upstream see the upgrade (end-to-end for this one hop, as in Envoy).
            ex.upgrade = req.upgrade
            headers += [("connection", "upgrade"), ("upgrade", req.upgrade)]
        # Body framing upstream: Content-Length kept (incl. 0), chunked stays chunked, none stays none.
        up_length = None if req.length == -1 else req.length
        self.metrics.active_requests += 1
        try:
            if route.filters:
                return await self._with_filters(conn, gen, ex, route, req, target, headers)
            authority = req.authority
            if route.rewrite is not None:
                target, authority = rewrite_target(route, target), _rewrite_host(route, authority)
            return await self._forward(conn, gen, ex, route, req.method, target, authority, headers, req.body,
                                       up_length, None)
        finally:
            self.metrics.active_requests -= 1

    async def _with_filters(self, conn: Downstream, gen: Generation, ex: Exchange, route: Route,
                            req: ClientRequest, target: str, headers: Headers) -> bool:
        host = gen.filter_host
        if host is None:
            return self.reply_error(conn, ex, 500, f'route "{route.name}" has filters but none are loaded',
                                    "filter_error")
        rt = ex.trace
        # Positional, in the fields' order: 13 keywords cost ~1 µs more per request (timeit).
        info = StreamInfo(ex.rid, route.name, route.cluster,            # request_id, route_name, cluster_name
                          conn.peer, conn.local, conn.id,               # client_addr, local_addr, connection_id
                          req.scheme, req.version, time.time_ns(),      # scheme, protocol, start_time_ns
                          conn.tls, rt is not None and rt.records,      # tls, trace
                          route.metadata, gen.router.cluster_metadata.get(route.cluster))  # route_/cluster_metadata
        try:
            stream = host.stream(route.filters, info)   # type: ignore[attr-defined]
        except Exception as e:
            log.exception('route "%s": could not open a filter stream', route.name)
            return self.reply_error(conn, ex, 500, f"filter chain error: {type(e).__name__}", "filter_error")
        if info.trace:
            rt.stream = stream
        chain_headers = [(":method", req.method), (":path", target), (":authority", req.authority),
                         (":scheme", req.scheme)] + headers      # in _CHAIN_PSEUDO's order
        original = req.body
        try:
            try:
                result = await stream.request(chain_headers, original)
            except LocalReplyInterrupt as e:
                result = e.reply
            except (HttpError, PeerClosed) as e:
                return self._client_body_failed(conn, ex, e)
            if isinstance(result, LocalReply):
                unread = original is not None and not original.done
                self.send_local_reply(conn, ex, result, close=unread)
                return not unread
            routed_target = target
            method, target, authority, rest = _split_pseudo(result.headers, req.method, target, req.authority)
            if (target != routed_target or method != req.method or authority != req.authority
                    or stream.route_cache_cleared
                    or (gen.router.header_names and gen.router.headers_changed(headers, rest))):
                # Envoy clears the route cache when a filter edits the request headers: the
                # request goes where its headers now say (the chain stays the one it ran).
                try:
                    route = self._rematch(gen, ex, info, method, target, authority, rest,
                                          target != routed_target)
                except _NoRoute as e:
                    unread = original is not None and not original.done
                    return await self._error_through_chain(conn, ex, stream, e.status, e.message, e.kind,
                                                           close=unread)
            length = req.length
            if result.body is None:
                up_body, up_len = None, (0 if original is not None or length == 0 else None)
            elif result.body is original:
                # Untouched body: keep its framing unless a filter dropped or changed the length.
                up_body = original
                cl = header_value(rest, "content-length")
                up_len = length if (length is not None and length >= 0 and cl == str(length)) else None
            else:
                up_body, up_len = result.body, None
            if route.rewrite is not None:
                target, authority = rewrite_target(route, target), _rewrite_host(route, authority)
            return await self._forward(conn, gen, ex, route, method, target, authority, rest, up_body, up_len,
                                       stream)
        except Exception as e:   # a bug in the chain must cost one request, not the process
            log.exception('filter chain of route "%s" failed', route.name)
            if ex.status == 0:
                self.reply_error(conn, ex, 500, f"filter chain error: {type(e).__name__}", "filter_error")
            return False
        finally:
            try:
                # status, bytes_in, bytes_out, duration_ns, upstream_address (positional, as above)
                await stream.finish(LogInfo(ex.status, original.received if original else 0, ex.bytes_out,
                                            int((time.perf_counter() - ex.t0) * 1e9), ex.upstream))
            except Exception:
                log.exception("filter stream finish failed")

    def _rematch(self, gen: Generation, ex: Exchange, info: StreamInfo, method: str, target: str,
                 authority: str, headers: Headers, path_changed: bool) -> Route:
        """The route for the request as the filters left it; raises _NoRoute (an HttpError
        carrying the metrics kind) when there is none or the path a filter set is unusable."""
        path = target.partition("?")[0]
        if path_changed:
            _check_filter_path(target, path, gen.config.path_normalization)
        route = gen.router.match(method, authority, routing_path(path), headers)
        # From here on the filters see the new route (route_name, route_metadata...), or none.
        ex.route = info.route_name = route.name if route is not None else ""
        info.cluster_name = route.cluster if route is not None else ""
        info.route_metadata = route.metadata if route is not None else None
        info.cluster_metadata = gen.router.cluster_metadata.get(info.cluster_name)
        if route is None:
            raise _NoRoute(404, f"no route for {method} {authority}{path} (after the filters)", "no_route")
        if ex.upgrade is not None and not route.upgrades:
            raise _NoRoute(403, f'route "{route.name}" does not allow upgrades', "upgrade_refused")
        return route

    # -- upstream ------------------------------------------------------------------------------

    async def _forward(self, conn: Downstream, gen: Generation, ex: Exchange, route: Route, method: str,
                       target: str, authority: str, headers: Headers, body: AsyncIterator[bytes] | None,
                       up_len: int | None, stream) -> bool:
        """The request upstream, its answer back. One frame from the body to the response (the
        exchange is not a coroutine of its own): every frame here is resumed on every wake-up."""
        spool = None
        try:
            if body is not None:
                # Read the body (through the filters) before taking an upstream connection, so
                # a slow upload holds none; past the buffers it streams on from the client.
                limits = gen.config.limits
                spool = Spool(body, limits.request_buffer_bytes, limits.spool_max_bytes, limits.spool_dir)
                await spool.fill()
                spool.raise_failure()
                body = spool
            pool = gen.upstreams.pools[route.cluster]
            t_up = time.perf_counter()
            try:
                resp = await pool.exchange(method, target, authority, headers, body, up_len,
                                           ex.upgrade is not None)
            except UpstreamError as e:
                ex.upstream = e.endpoint
                log.warning('route "%s": %s', route.name, e.message)
                unread = ex.body is not None and not ex.body.done
                if stream is not None:
                    # As Envoy encodes its router's error replies through the filters: the chain's
                    # response callbacks see (and may change) the 502/503/504.
                    return await self._error_through_chain(conn, ex, stream, e.status, _short_upstream_reason(e),
                                                           f"upstream_{e.kind}", close=unread)
                return self.reply_error(conn, ex, e.status, _short_upstream_reason(e), f"upstream_{e.kind}",
                                        close=unread)
            self.metrics.upstream(route.cluster, time.perf_counter() - t_up)
            ex.upstream = resp.endpoint
            if isinstance(resp, UpstreamTunnel):
                try:
                    return await self._switch(conn, gen, ex, route, resp, stream)
                except BaseException:
                    resp.close(abort=True)
                    raise
            try:
                return await self._respond(conn, gen, ex, method, resp, stream)
            finally:
                resp.finish()
        except LocalReplyInterrupt as e:
            # A filter rejected a request body chunk (the upstream request, if any, was aborted).
            self.send_local_reply(conn, ex, e.reply, close=True)
            return False
        except (HttpError, PeerClosed) as e:
            return self._client_body_failed(conn, ex, e)
        finally:
            if spool is not None:
                spool.close()

    async def _switch(self, conn: Downstream, gen: Generation, ex: Exchange, route: Route, up: UpstreamTunnel,
                      stream) -> bool:
        """The upstream answered 101: its head through the response filters (as Envoy's
        encodeHeaders sees it), then the front-end sends it and splices (Exchange.tunnel)."""
        protocol = header_value(up.headers, "upgrade") or ex.upgrade or ""
        headers = strip_hop_by_hop(up.headers)
        if stream is not None:
            try:
                result = await stream.response(101, [(":status", "101")] + headers, None)
            except LocalReplyInterrupt as e:
                result = e.reply
            if isinstance(result, LocalReply):
                up.close(abort=True)
                self.send_local_reply(conn, ex, result, close=True)
                return False
            # The status stays 101: the upstream has switched, nothing else can be answered now.
            headers = [(n, v) for n, v in result.headers if n[0] != ":" and n not in ("connection", "upgrade")]
        ex.status = 101
        ex.tunnel = Tunnel(up, headers + [("connection", "upgrade"), ("upgrade", protocol)],
                           gen.config.limits.upgrade_idle_timeout_s)
        self.metrics.upgraded(route.name)
        return False

    # -- response ------------------------------------------------------------------------------

    async def _respond(self, conn: Downstream, gen: Generation, ex: Exchange, method: str,
                       resp: UpstreamResponse, stream) -> bool:
        limits = gen.config.limits
        close = not ex.keepalive
        status, headers, length = resp.status, strip_hop_by_hop(resp.headers), resp.length
        small = length is not None and 0 < length <= limits.response_buffer_bytes
        # Small and without filters: the body iterator is never made.
        body = upstream_body = resp.body if stream is not None or not small else None
        if stream is not None:
            try:
                result = await stream.response(status, [(":status", str(status))] + headers, body)
            except LocalReplyInterrupt as e:
                result = e.reply
            if isinstance(result, LocalReply):
                self.send_local_reply(conn, ex, result, close=False)
                return True
            status, headers, length, body = _after_chain(result, status, length, body, ex)
        if small and body is upstream_body:
            # A small body no filter reads (or no filters): one read, the upstream connection
            # back to the pool, one write with its exact length (the front-ends write
            # Content-Length from it, whatever the headers say).
            try:
                data = await resp.read_exact()
            except UpstreamReset as e:
                return self.upstream_broke(conn, ex, e)
            resp.finish()
            return await conn.send_response(ex, status, headers, data, len(data), close)
        if body is None:
            return await conn.send_response(ex, status, headers, None, length, close)
        if small:
            return await self._respond_small(conn, ex, resp, status, headers, body, close)
        spool = Spool(body, limits.response_buffer_bytes, limits.spool_max_bytes, limits.spool_dir,
                      on_end=resp.finish)
        spool.start()
        try:
            return await conn.send_response(ex, status, headers, spool, length, close)
        finally:
            spool.close()

    async def _respond_small(self, conn: Downstream, ex: Exchange, resp: UpstreamResponse, status: int,
                             headers: Headers, body: AsyncIterator[bytes], close: bool) -> bool:
        """A small upstream body a filter reads: read whole through the filters (no read-ahead
        task), the upstream connection back to the pool, one write with its exact length."""
        try:
            chunks = [chunk async for chunk in body]
            data = b"".join(chunks)
        except LocalReplyInterrupt as e:
            self.send_local_reply(conn, ex, e.reply, close=True)
            return False
        except UpstreamReset as e:
            return self.upstream_broke(conn, ex, e)
        resp.finish()
        trailers = getattr(body, "trailers", None)
        if trailers:                        # a filter added trailers: they need the chunked form
            return await conn.send_response(ex, status, headers, _Trailed(data, trailers), None, close)
        return await conn.send_response(ex, status, headers, data, len(data), close)

    async def first_chunk(self, conn: Downstream, ex: Exchange, it: AsyncIterator[bytes]
                          ) -> tuple[bytes, bool] | None:
        """The body's first chunk and whether more may follow; None once a failure before it was
        answered. Front-ends send the response head together with it, so a filter rejecting the
        first chunk, or the upstream failing before it, can still become a clean answer."""
        try:
            return await it.__anext__(), True
        except StopAsyncIteration:
            return b"", False
        except LocalReplyInterrupt as e:
            self.send_local_reply(conn, ex, e.reply, close=True)
        except UpstreamReset as e:
            self.upstream_broke(conn, ex, e)
        return None

    def failed_after_head(self, conn: Downstream, ex: Exchange, e: UpstreamReset | LocalReplyInterrupt) -> None:
        """The body failed once the head was out: the front-end can only abort the response
        (HTTP/1.1: close the connection; HTTP/2: reset the stream). Counted and logged here."""
        if isinstance(e, UpstreamReset):
            log.warning("upstream %s mid-response, aborting the response to %s: %s",
                        "timed out" if e.timeout else "reset", conn.peer_text, e)
            self.metrics.error("upstream_timeout" if e.timeout else "upstream_reset")
            ex.error = "upstream timed out mid-response" if e.timeout else "upstream reset mid-response"
        else:
            self.metrics.error("filter_reply_after_headers")
            ex.error = "filter rejected the response body after headers were sent"

    def upstream_broke(self, conn: Downstream, ex: Exchange, e: UpstreamReset) -> bool:
        """The upstream failed inside a body before anything went downstream."""
        log.warning("upstream %s before the response body was complete: %s",
                    "timed out" if e.timeout else "reset", e)
        if e.timeout:
            return self.reply_error(conn, ex, 504, "upstream timed out", "upstream_timeout")
        return self.reply_error(conn, ex, 502, "upstream connection reset", "upstream_reset")

    # -- replies -------------------------------------------------------------------------------

    def _client_body_failed(self, conn: Downstream, ex: Exchange, e: Exception) -> bool:
        if isinstance(e, HttpError):
            kind = "body_too_large" if isinstance(e, BodyTooLarge) else \
                "client_timeout" if e.status == 408 else "bad_request"
            self.reply_error(conn, ex, e.status, e.message, kind)
        else:
            self.client_gone(ex, str(e))
        return False

    def client_gone(self, ex: Exchange, why: str) -> None:
        """The client went away before its answer was sent (nginx logs 499)."""
        if ex.status == 0:
            ex.status = 499
        ex.error = why
        self.metrics.error("client_closed")

    def _redirect(self, conn: Downstream, ex: Exchange, location: str, req: ClientRequest) -> bool:
        # Envoy's UNESCAPE_AND_REDIRECT: the client asks again for the decoded path.
        ex.target = location
        self.metrics.error("path_redirect")
        unread = req.body is not None
        conn.reply(ex, 307, [("location", location), ("content-type", "text/plain; charset=utf-8")],
                   f"307 Temporary Redirect: {location}\n".encode("utf-8", "replace"), close=unread or not ex.keepalive)
        return not unread and ex.keepalive

    def reply_error(self, conn: Downstream, ex: Exchange, status: int, message: str, kind: str,
                    close: bool = True) -> bool:
        """A short text answer for a client- or upstream-caused error; returns keep-alive."""
        self.metrics.error(kind)
        ex.error = message
        body = f"{status} {reason(status)}: {message}\n".encode("utf-8", "replace")
        extra = [("x-request-id", ex.rid)] if ex.rid else []
        close = close or self.gw.draining
        conn.reply(ex, status, [("content-type", "text/plain; charset=utf-8")] + extra, body, close=close)
        return not close

    async def _error_through_chain(self, conn: Downstream, ex: Exchange, stream, status: int, message: str,
                                   kind: str, close: bool) -> bool:
        self.metrics.error(kind)
        ex.error = message
        body = f"{status} {reason(status)}: {message}\n".encode("utf-8", "replace")
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
            self.send_local_reply(conn, ex, result, close=close)
            return not (close or self.gw.draining or not ex.keepalive)
        close = close or self.gw.draining or not ex.keepalive
        conn.reply(ex, status, headers, body, close=close)
        return not close

    def send_local_reply(self, conn: Downstream, ex: Exchange, reply: LocalReply, close: bool) -> None:
        if reply.details:
            ex.error = reply.details
        conn.reply(ex, reply.status, [(n, v) for n, v in reply.headers if n[0] != ":"], reply.body,
                   close=close or self.gw.draining or not ex.keepalive)


def log_exchange(gw: GatewayState, ex: Exchange, client: str) -> None:
    """Count a finished exchange and write its access log line."""
    bytes_in = ex.body.received if ex.body else ex.bytes_in
    gw.metrics.request_done(ex.route or "-", ex.status, bytes_in, ex.bytes_out)
    access_log = gw.access_log
    rt = ex.trace
    if access_log.enabled:
        access_log.write(request_id=ex.rid, client=client, method=ex.method, path=ex.target,
                         status=ex.status, bytes_in=bytes_in, bytes_out=ex.bytes_out, route=ex.route,
                         upstream=ex.upstream, duration_ms=(time.perf_counter() - ex.t0) * 1000,
                         error=ex.error, filters=rt.summary() if rt is not None and rt.log else "")
    if rt is not None:
        gw.tracer.done(rt, ex, client)


def traced(ex: Exchange, headers: Headers) -> Headers:
    """``headers`` with x-wasmgate-trace (the filter trace so far) when the client asked for it
    and may see it (admin.trace_allowed_cidrs); the front-ends call it on every response head."""
    rt = ex.trace
    if rt is None or not rt.header:
        return headers
    return headers + [(DEBUG_HEADER, rt.summary() or "-")]


def _after_chain(result: Forward, status: int, length: int | None, body, ex: Exchange):
    """Status, headers, length and body of the response the filters let through."""
    items = result.headers
    names = list(map(_name, items))          # one C-built names list for every search below
    if names[:1] == [":status"] and not any(map(str.startswith, names[1:], _COLONS)):
        # The chain's usual answer: its own :status first and no other pseudo-header.
        try:
            status = int(items[0][1])
        except ValueError:
            pass
        headers = items[1:]
        del names[0]
    else:
        status = _status_of(items, status)
        headers = [(n, v) for n, v in items if n[0] != ":"]
        names = list(map(_name, headers))
    if not 200 <= status <= 599:
        status = final_status(status, ex)
    if result.body is None:
        length = 0
    elif result.body is not body:
        length = None               # a filter's new body: length unknown until sent
    elif length is not None and length >= 0 and (
            "content-length" not in names or headers[names.index("content-length")][1] != str(length)):
        length = None               # a filter dropped or changed Content-Length
    return status, headers, length, result.body


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _Trailed:
    """One body chunk, then trailers (the body protocol of the seam)."""

    def __init__(self, data: bytes, trailers: Headers):
        self._it = _once(data)
        self.trailers = trailers

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._it


def _split_pseudo(headers: Headers, method: str, target: str, authority: str) -> tuple[str, str, str, Headers]:
    """The request's method, target and authority after the chain (the last of each
    pseudo-header; the given ones if a filter removed it) and its other headers."""
    names = list(map(_name, headers))
    if names[:4] == _CHAIN_PSEUDO and not any(map(str.startswith, names[4:], _COLONS)):
        return headers[0][1], headers[1][1], headers[2][1], headers[4:]   # as _with_filters put them
    rest = [h for h in headers if h[0][0] != ":"]
    for n, v in headers:
        if n == ":method":
            method = v
        elif n == ":path":
            target = v
        elif n == ":authority":
            authority = v
    return method, target, authority, rest


_name = itemgetter(0)
# str.startswith's second argument for map(): a pseudo-header among names, searched in C.
_COLONS = itertools.repeat(":")
# The request's pseudo-headers, first and in this order, as _with_filters hands them to the chain.
_CHAIN_PSEUDO = [":method", ":path", ":authority", ":scheme"]


class _NoRoute(HttpError):
    """No usable route for the request after the filters edited it."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(status, message)
        self.kind = kind


def _check_filter_path(target: str, path: str, policy: PathPolicy) -> None:
    """A :path a filter set must already be in the normal form client paths are brought to
    (paths.py): routing it on one reading while the upstream resolves another (``/public/../admin``)
    would let a rewrite reach a route it does not name. Not normal → 400, never normalised."""
    try:
        if "#" not in target and normalize_path(path, policy) == path:
            return
    except (HttpError, RedirectTo):
        pass
    raise _NoRoute(400, f"a filter set the request path {path[:200]!r}, which is not in normal form",
                   "filter_bad_path")


def _status_of(headers: Headers, default: int) -> int:
    for n, v in headers:
        if n == ":status":
            try:
                return int(v)
            except ValueError:
                return default
    return default


def final_status(status: int, ex: Exchange) -> int:
    """A filter may ask for any number; only 200..599 can be a final response."""
    if 200 <= status <= 599:
        return status
    log.warning("a filter asked for status %s on %s %s; answering 500", status, ex.method, ex.target)
    ex.error = f"invalid status {status} from a filter"
    return 500


def header_value(headers: Headers, name: str) -> str | None:
    names = list(map(_name, headers))        # searched in C: cheaper than a loop over pairs
    return headers[names.index(name)][1] if name in names else None


def _rewrite_host(route: Route, authority: str) -> str:
    return route.rewrite.host if route.rewrite is not None and route.rewrite.host else authority


def _short_upstream_reason(e: UpstreamError) -> str:
    return {"refused": "upstream unreachable", "timeout": "upstream timed out",
            "reset": "upstream connection reset", "bad_response": "invalid upstream response",
            "overloaded": "upstream connection limit reached", "tls": "upstream TLS handshake failed",
            "bad_request_body": "request body length mismatch"}.get(e.kind, e.message)


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
