"""HttpStream: one request through one route's filter chain (reference §2.4, §3.4).

Request callbacks run in chain order, response callbacks in reverse. A body flows through a
pipeline of per-filter stages (async generators) that exist only for filters exporting a body
callback; without any, the gateway's body iterator is handed back untouched. A stage buffers
while its filter answers Pause and releases the buffer on Continue, so each body callback
sees the cumulative buffered size.

The per-filter loops are walks (the end of this file): the plain part of each (a filter that
opens, answers Continue and has no body to stage; every teardown) runs as one C call with the
C build (engine.chain_walks), and the coroutines here carry on only where a walk hands back.
"""
from __future__ import annotations

import asyncio
import re
import time
from operator import itemgetter
from typing import AsyncIterator, Callable, Sequence

from .seam import Body, Forward, Headers, LocalReply, LocalReplyInterrupt, LogInfo, StreamInfo
from .buffers import BodyBuffer, HeaderMap
from .context import REQUEST, RESPONSE, HttpContext
from .engine import chain_walks, native_stream_head
from .filter import Filter, FilterFailure
from .properties import CustomProperties
from .trace import FAILED, FilterTrace

PAUSE_TIMEOUT_S = 60.0           # a filter that pauses and never resumes fails the request
FAIL_DETAILS = "wasm_fail_stream"
WATERMARK = 2                    # StopIterationAndWatermark: buffer up to the limit, then stop reading

HEADERS_CB = ("proxy_on_request_headers", "proxy_on_response_headers")
BODY_CB = ("proxy_on_request_body", "proxy_on_response_body")
TRAILERS_CB = ("proxy_on_request_trailers", "proxy_on_response_trailers")
TEARDOWN_CB = ("proxy_on_done", "proxy_on_log", "proxy_on_delete")
# The trace's phase (abi/trace.py PHASES) of a body or trailers callback.
_PHASE_OF = {BODY_CB[0]: 1, TRAILERS_CB[0]: 2, BODY_CB[1]: 4, TRAILERS_CB[1]: 5}

# Highest valid return value per callback kind (cpp-sdk FilterHeadersStatus/FilterDataStatus).
MAX_HEADERS_ACTION = 4
MAX_BODY_ACTION = 3
CONTINUE_HEADERS = (0, 2)        # Continue, ContinueAndEndStream

CONTINUE, PAUSED, SKIPPED = 0, 1, 2

# The end_of_stream slot of a chunk: more data, end of stream, or "trailers follow" (the
# chunk is empty; the stream ends with the trailers, as Envoy's decodeTrailers).
MORE, END, TRAILERS = 0, 1, 2
MAX_TRAILERS_ACTION = 1

Chunks = AsyncIterator[tuple[bytes, int]]
_name = itemgetter(0)

# Envoy's HTTP → gRPC status mapping for local replies (Grpc::Utility::httpToGrpcStatus).
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Stop(Exception):
    """The chain ends with a local reply (a filter answered or failed closed)."""

    def __init__(self, reply: LocalReply):
        self.reply = reply


async def _with_eos(body: Body, expected: int | None, on_trailers) -> Chunks:
    """Pair each chunk with end_of_stream as Envoy's HTTP/1 codec does: the chunk completing a
    known content-length carries it; otherwise an empty final chunk does (chunked encoding),
    or the trailers when the body iterator carries some (``body.trailers``, read once it is
    exhausted). No look-ahead, so a chunk reaches the filters as soon as it arrives."""
    if expected == 0:
        yield b"", END
        return
    total = 0
    it = body.__aiter__()
    async for chunk in it:
        if not chunk:
            continue
        total += len(chunk)
        if expected is not None and total >= expected:
            # Let the gateway's iterator reach its end (immediate once content-length bytes
            # are in) so a reply on this last chunk finds the request body fully read.
            async for extra in it:
                chunk += extra
            yield chunk, END
            return
        yield chunk, MORE
    trailers = getattr(body, "trailers", None)
    if trailers:
        on_trailers(HeaderMap(list(trailers)))
        yield b"", TRAILERS
    else:
        yield b"", END


class _Payload:
    """The body handed back to the gateway: data only, and ``trailers`` (wire-safe, after the
    filters) set once it is exhausted — the same protocol as the body the gateway gave us."""

    def __init__(self, chunks: Chunks, trailers: "Callable[[], Headers | None]"):
        self._chunks = chunks
        self._trailers = trailers
        self.trailers: Headers | None = None

    def __aiter__(self) -> "_Payload":
        return self

    async def __anext__(self) -> bytes:
        while True:
            data, eos = await self._chunks.__anext__()
            if eos == TRAILERS:
                self.trailers = self._trailers()
            if data:
                return data


async def _just(item: tuple[bytes, int]) -> Chunks:
    yield item


def _content_length(headers: Headers, names: list[str]) -> int | None:
    """The first Content-Length of ``headers`` (``names``: their names, searched in C)."""
    if "content-length" not in names:
        return None
    v = headers[names.index("content-length")][1]
    return int(v) if v.strip().isdigit() else None


def _stream_head(status: int | None, headers: Headers, has_body: bool) -> tuple[Headers, int | None]:
    """The items of a stream's header map (a copy; for a response, ``status`` not None, with
    ":status" first and set to str(status)) and, when a body follows, its first
    Content-Length. _crossing.c's stream_head does it in C for the plain case: keep alike."""
    names = list(map(_name, headers))       # searched in C (a Python loop costs more)
    if status is None:
        items = list(headers)
    elif names[:1] == [":status"] and names.count(":status") == 1:
        items = list(headers)                # as the gateway hands them: :status first
        items[0] = (":status", str(status))
    else:
        items = [(":status", str(status))]
        items += [h for h in headers if h[0] != ":status"]
    return items, _content_length(headers, names) if has_body else None


class Chain:
    """Implements api.HttpStream; also the StreamFacts that properties read.

    One per request, so what most requests never set stays a class attribute until set.
    """
    request_headers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    request_trailers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    log: LogInfo | None = None
    reply: LocalReply | None = None
    _replying = False                    # a local reply is being encoded: no second one
    _closed = False                      # response headers went downstream
    _finished = False                    # finish() ran
    # The per-request filter trace (abi/trace.py): only when the gateway asks for it.
    trace: FilterTrace | None = None
    # Envoy's clearRouteCache (proxy_clear_route_cache, foreign function clear_route_cache):
    # the gateway re-matches the route after the request headers (api.HttpStream).
    route_cache_cleared = False
    _custom: CustomProperties | None = None

    def __init__(self, filters: Sequence[Filter], info: StreamInfo,
                 on_finished: Callable[[], None] | None = None):
        self.filters = filters           # never changed here: FilterHost hands the same one out
        self._on_finished = on_finished
        self.info: StreamInfo | None = info
        n = len(filters)
        self.ctxs: list[HttpContext | None] = [None] * n
        self.skipped = [False] * n
        self.failed = [False] * n
        if info.trace:
            self.trace = FilterTrace(filters)

    @property
    def custom(self) -> CustomProperties:
        """The proxy_set_property values, made on first use (most requests set none)."""
        c = self._custom
        if c is None:
            c = self._custom = CustomProperties()
        return c

    # -- local replies -----------------------------------------------------------------------

    def set_reply(self, reply: LocalReply) -> None:
        if self.reply is None and not self._replying and not self._closed:
            self.reply = reply

    def shape_reply(self, reply: LocalReply, grpc_status: int) -> LocalReply:
        """Envoy sendLocalReply: gRPC requests get a trailers-only gRPC answer, a body a
        content-type."""
        ct = self.request_headers.get("content-type") if self.request_headers else None
        if ct and ct.startswith("application/grpc"):
            grpc = grpc_status if grpc_status >= 0 else _HTTP_TO_GRPC.get(reply.status, 2)
            msg = _CONTROL.sub(" ", reply.body.decode("latin-1"))     # bytes kept, no CR/LF
            headers = [("content-type", "application/grpc"), ("grpc-status", str(grpc))]
            if msg:
                headers.append(("grpc-message", msg))
            return LocalReply(200, headers + reply.headers, b"", reply.details)
        if reply.body and not any(k == "content-type" for k, _ in reply.headers):
            reply.headers.append(("content-type", "text/plain"))
        return reply

    def _wire(self, hmap: HeaderMap) -> Headers:
        items = hmap.wire()
        if items is not hmap.items:
            self.filters[0].log.warning("dropped headers with invalid names or values set by a filter")
        return items

    def _fail(self, i: int) -> None:
        """Apply filter i's failure policy: skip it (fail_open) or stop with 503."""
        self.failed[i] = True
        if self.filters[i].spec.failure_policy == "fail_open":
            self.skipped[i] = True
            return
        raise _Stop(LocalReply(503, [], b"", FAIL_DETAILS))

    def _invalid(self, i: int, name: str, action: int) -> None:
        self._soft_failure(i, name, "invalid_action", f"returned {action}")
        self._fail(i)

    def _soft_failure(self, i: int, callback: str, kind: str, message: str) -> None:
        """Filter i broke a rule without trapping: counted, logged, and named in the trace."""
        self.filters[i].record_soft_failure(callback, kind, message)
        ctx = self.ctxs[i]
        if ctx is not None:
            ctx.failure = kind

    def host_limit(self, ctx: HttpContext, call: str, what: str) -> None:
        """The filter of `ctx` tried to grow host state past a fixed bound (abi/limits.py) and
        the edit was refused: the request gets the filter's failure policy, as for an invalid
        return action. The instance is kept: a client's request may be what tipped it over."""
        i = self._slot(ctx)
        if self.failed[i]:
            return                       # already failed: once is enough (and one log line)
        self._soft_failure(i, call, "host_limit", what)
        try:
            self._fail(i)
        except _Stop as s:
            self.set_reply(s.reply)

    def _slot(self, ctx: HttpContext) -> int:
        """The chain position of `ctx`'s filter. A context still in proxy_on_context_create
        is not recorded yet: its slot is its filter's first one with no context."""
        ctxs = self.ctxs
        if ctx in ctxs:
            return ctxs.index(ctx)
        return next(i for i, f in enumerate(self.filters) if f is ctx.filter and ctxs[i] is None)

    def too_large(self, f: Filter, direction: int) -> LocalReply:
        """The reply when filter `f` would make the host hold more body than its
        max_buffered_body_bytes: 413 on the request, 500 on the response (Envoy's buffer
        limits: request_payload_too_large / response_payload_too_large)."""
        limit = f.spec.limits.max_buffered_body_bytes
        side = "request" if direction == REQUEST else "response"
        f.log.warning('filter "%s": %s body buffered past max_buffered_body_bytes (%d)', f.name, side, limit)
        reply = LocalReply(413 if direction == REQUEST else 500, [],
                           f"{side} body over the buffer limit\n".encode(), f"{side}_payload_too_large")
        return self.shape_reply(reply, -1)

    # -- invoking callbacks ------------------------------------------------------------------

    def _invoke(self, i: int, name: str, *args: int) -> int | None:
        """Call filter i; None when it is skipped from now on. Raises _Stop on a reply."""
        if self._finished:                  # finish() ran: the contexts are deleted
            raise _Stop(LocalReply(503, [], b"", "stream_finished"))
        ctx = self.ctxs[i]
        f = self.filters[i]
        if ctx is None or ctx.generation != f.generation:      # not ctx.alive
            self._fail(i)
            return None
        tr = self.trace
        t = time.perf_counter_ns() if tr is not None else 0
        try:
            action = f.call(ctx, name, *args)
        except FilterFailure:
            if tr is not None:
                tr.note(i, _PHASE_OF[name], FAILED, t)
            self._fail(i)
            return None
        if tr is not None:
            tr.note(i, _PHASE_OF[name], action, t)
        if self.reply is not None:
            self._replied(i, _PHASE_OF[name])
        return action

    def _replied(self, i: int, phase: int) -> None:
        """Filter i answered (a reply is set): trace it and stop the chain with it."""
        if self.trace is not None:
            self.trace.replied(i, phase, self.reply.status)
        raise _Stop(self.reply)

    def trace_summary(self) -> str:
        """The filter trace as one line (abi/trace.py), "" when not traced."""
        tr = self.trace
        if tr is None:
            return ""
        if not self._finished:           # the contexts are live: read their edits now
            for i, ctx in enumerate(self.ctxs):
                tr.capture(i, ctx, self.failed[i])
        return tr.summary()

    def trace_phases(self) -> list[tuple[str, str, str, int, int, int]]:
        return self.trace.phases() if self.trace is not None else []

    def _headers(self, i: int, f: Filter, ctx: HttpContext, direction: int, eos: bool) -> int:
        """Filter i's (`f`, context `ctx`, which exports the callback) headers callback, as
        ``f.headers`` asks (NativeFilter's C does the common case itself: keep them alike)."""
        name = HEADERS_CB[direction]
        hmap = self.request_headers if direction == REQUEST else self.response_headers
        ctx.resumed[direction] = False
        # _invoke, inlined (six times per request)
        if self._finished:
            raise _Stop(LocalReply(503, [], b"", "stream_finished"))
        if ctx.generation != f.generation:
            self._fail(i)
            return SKIPPED
        tr = self.trace
        t = time.perf_counter_ns() if tr is not None else 0
        try:
            if f.headers_eos[direction]:
                action = f.call(ctx, name, ctx.id, len(hmap.items), 1 if eos else 0)
            else:                           # 0.1.0 as specified: (context_id, num_headers)
                action = f.call(ctx, name, ctx.id, len(hmap.items))
        except FilterFailure:
            if tr is not None:
                tr.note(i, direction * 3, FAILED, t)
            self._fail(i)
            return SKIPPED
        if tr is not None:
            tr.note(i, direction * 3, action, t)
        if self.reply is not None:
            self._replied(i, direction * 3)
        if action == 0 or action == 2:      # CONTINUE_HEADERS: Continue, ContinueAndEndStream
            return CONTINUE
        if action > MAX_HEADERS_ACTION:
            self._invalid(i, name, action)
            return SKIPPED
        return CONTINUE if ctx.resumed[direction] else PAUSED

    async def _wait(self, i: int, direction: int, part: int = 0) -> None:
        """Wait until filter i resumes `direction` (proxy_continue_stream), replies or dies.
        ``part``: what it paused in (0 headers, 1 body, 2 trailers), for the trace."""
        ctx = self.ctxs[i]
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        loop = asyncio.get_running_loop()
        while True:
            if self._finished:
                raise _Stop(LocalReply(503, [], b"", "stream_finished"))
            if self.reply is not None:
                self._replied(i, direction * 3 + part)    # only filter i can answer while it pauses
            if not ctx.alive:
                self._fail(i)
                return
            if ctx.resumed[direction] or self.skipped[i]:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._soft_failure(i, HEADERS_CB[direction], "pause_timeout",
                                   f"paused for more than {PAUSE_TIMEOUT_S:g}s")
                self._fail(i)
                return
            ctx.waiter = loop.create_future()
            try:
                await asyncio.wait_for(ctx.waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                ctx.waiter = None

    # -- request -------------------------------------------------------------------------------

    async def request(self, headers: Headers, body: Body | None) -> Forward | LocalReply:
        try:                                     # one coroutine for the request callbacks
            items, length = (stream_head(None, headers, body is not None)
                             or _stream_head(None, headers, body is not None))
            self.request_headers = HeaderMap(items)
            eos = body is None or length == 0        # Envoy: end_stream with the headers
            # The chunk pipeline is built only once a filter needs the body. The walk runs the
            # filters that open, answer Continue and need no body work; what it hands back
            # (filter i paused, or has a body to stage) carries on here.
            src: Chunks | None = None
            i = 0
            while (stop := walk_request(self, i, eos)) is not None:
                i, state = stop >> 2, stop & 3
                f = self.filters[i]
                staged = False
                if state == PAUSED:
                    if not eos and f.spec.deliver_body_while_paused and f.has(BODY_CB[REQUEST]):
                        if src is None:
                            src = _with_eos(body, length, self._set_request_trailers)
                        src = await self._body_while_paused(i, src)
                        staged = True
                    else:
                        await self._wait(i, REQUEST)
                if not eos and not staged and not self.skipped[i] and f.body_callbacks[REQUEST]:
                    if src is None:
                        src = _with_eos(body, length, self._set_request_trailers)
                    src = self._stage(i, REQUEST, src)
                i += 1
            return self._handed_on(REQUEST, self.request_headers, body, src)
        except _Stop as s:
            return await self._encode_reply(s.reply)
        except LocalReplyInterrupt as e:
            # An earlier filter answered on a body chunk while a later one, paused in its
            # headers, was being fed the body (deliver_body_while_paused): already encoded.
            return e.reply

    def _handed_on(self, direction: int, hmap: HeaderMap, body: Body | None, src: Chunks | None) -> Forward:
        """The headers as they may go on the wire, and the body: the gateway's own when no
        filter stage was built (``src`` None), else the stages' output."""
        out = body if src is None else _Payload(src, lambda: self._wire_trailers(direction))
        return Forward(hmap.items if not hmap.unsafe else self._wire(hmap), out)   # _wire, inlined

    def _set_request_trailers(self, trailers: HeaderMap) -> None:
        self.request_trailers = trailers

    def _set_response_trailers(self, trailers: HeaderMap) -> None:
        self.response_trailers = trailers

    def _wire_trailers(self, direction: int) -> Headers | None:
        hmap = self.request_trailers if direction == REQUEST else self.response_trailers
        return None if hmap is None else self._wire(hmap)

    async def _body_while_paused(self, i: int, src: Chunks) -> Chunks:
        """Filter i paused in request headers still gets the body (deliver_body_while_paused).

        As Envoy with allow_on_headers_stop_iteration: a body callback answering Continue (or
        proxy_continue_stream) resumes the headers too; the buffered body then moves on.
        """
        ctx = self.ctxs[i]
        f = self.filters[i]
        name = BODY_CB[REQUEST]
        limit = f.spec.limits.max_buffered_body_bytes
        buf = BodyBuffer(limit=limit)
        ctx.bodies[REQUEST] = buf
        it = src.__aiter__()
        ended = False
        marker = False
        while not ctx.resumed[REQUEST] and not ended:
            chunk, eos = await it.__anext__()
            if eos == TRAILERS:         # the trailers go through filter i's stage afterwards
                marker = True
                break
            ended = eos == END
            buf.append(chunk)
            ctx.resumed[REQUEST] = False
            action = self._invoke(i, name, ctx.id, buf.size, 1 if ended else 0)
            if action is None:
                break
            if action == 0:
                ctx.resumed[REQUEST] = True
            elif action > MAX_BODY_ACTION:
                self._invalid(i, name, action)
                break
            elif buf.size > limit and not ctx.resumed[REQUEST]:
                raise _Stop(self.too_large(f, REQUEST))
        if not self.skipped[i] and not ctx.resumed[REQUEST]:
            await self._wait(i, REQUEST, 1)
        rest = _just((b"", TRAILERS)) if marker else it
        return self._then(buf.take(), ended, rest, None if self.skipped[i] else i)

    async def _then(self, head: bytes, ended: bool, rest: Chunks, stage_at: int | None) -> Chunks:
        yield head, END if ended else MORE
        if not ended:
            tail = rest if stage_at is None else self._stage(stage_at, REQUEST, rest)
            async for item in tail:
                yield item

    async def _stage(self, i: int, direction: int, src: Chunks) -> Chunks:
        ctx = self.ctxs[i]
        f = self.filters[i]
        name = BODY_CB[direction]
        limit = f.spec.limits.max_buffered_body_bytes
        buf = BodyBuffer(limit=limit)
        ctx.bodies[direction] = buf
        has_body = f.has(name)
        try:
            async for chunk, eos in src:
                if eos == TRAILERS:
                    await self._trailers(i, direction)
                    if buf.size:
                        yield buf.take(), MORE
                    yield chunk, eos
                    continue
                if self.skipped[i] or not has_body:
                    if buf.size:
                        yield buf.take(), MORE
                    yield chunk, eos
                    continue
                buf.append(chunk)
                ctx.resumed[direction] = False
                action = self._invoke(i, name, ctx.id, buf.size, 1 if eos else 0)
                if action is None:                       # failed open: let it all through
                    yield buf.take(), eos
                    continue
                if action > MAX_BODY_ACTION:
                    self._invalid(i, name, action)
                    yield buf.take(), eos
                    continue
                if action == 0 or ctx.resumed[direction]:
                    yield buf.take(), eos
                elif action == WATERMARK and buf.size >= limit:
                    await self._wait(i, direction, 1)       # no more reading until it resumes
                    yield buf.take(), eos
                elif buf.size > limit:
                    raise _Stop(self.too_large(f, direction))
                elif eos:
                    await self._wait(i, direction, 1)
                    yield buf.take(), END
        except _Stop as s:
            if direction == REQUEST:
                raise LocalReplyInterrupt(await self._encode_reply(s.reply)) from None
            raise LocalReplyInterrupt(self._finish_reply(s.reply)) from None

    async def _trailers(self, i: int, direction: int) -> None:
        f = self.filters[i]
        name = TRAILERS_CB[direction]
        if self.skipped[i] or not f.has(name):
            return
        hmap = self.request_trailers if direction == REQUEST else self.response_trailers
        ctx = self.ctxs[i]
        ctx.resumed[direction] = False
        action = self._invoke(i, name, ctx.id, len(hmap))
        if action is None or action == 0:
            return
        if action > MAX_TRAILERS_ACTION:
            self._invalid(i, name, action)
        elif not ctx.resumed[direction]:
            await self._wait(i, direction, 2)

    # -- response ------------------------------------------------------------------------------

    async def response(self, status: int, headers: Headers, body: Body | None) -> Forward | LocalReply:
        items, length = (stream_head(status, headers, body is not None)
                         or _stream_head(status, headers, body is not None))
        self.response_headers = HeaderMap(items)
        eos = body is None or length == 0
        try:                                     # one coroutine for the response callbacks
            src: Chunks | None = None                # built only once a filter needs the body
            i = len(self.filters) - 1
            while (stop := walk_response(self, i, eos)) is not None:
                i, state = stop >> 2, stop & 3
                if state == PAUSED:
                    await self._wait(i, RESPONSE)
                if not eos and not self.skipped[i] and self.filters[i].body_callbacks[RESPONSE]:
                    if src is None:
                        src = _with_eos(body, length, self._set_response_trailers)
                    src = self._stage(i, RESPONSE, src)
                i -= 1
            return self._handed_on(RESPONSE, self.response_headers, body, src)
        except _Stop as s:
            return self._finish_reply(s.reply)

    def _finish_reply(self, reply: LocalReply) -> LocalReply:
        self._closed = True
        return reply

    async def _encode_reply(self, reply: LocalReply) -> LocalReply:
        """A request-phase reply passes the response callbacks of the filters that saw the
        request (Envoy encodes local replies through the chain; the replier sees its own)."""
        self._replying = True
        if self._finished:
            return self._finish_reply(reply)
        self.response_headers = HeaderMap([(":status", str(reply.status))] + list(reply.headers))
        body = reply.body
        for i in range(len(self.filters) - 1, -1, -1):
            ctx = self.ctxs[i]
            if ctx is None or self.skipped[i] or not ctx.alive:
                continue
            f = self.filters[i]
            tr = self.trace
            phase = 3
            t = time.perf_counter_ns() if tr is not None else 0
            try:
                if f.has(HEADERS_CB[RESPONSE]):
                    n = len(self.response_headers)
                    args = (ctx.id, n, 0 if body else 1) if f.headers_eos[RESPONSE] else (ctx.id, n)
                    action = f.call(ctx, HEADERS_CB[RESPONSE], *args)
                    if tr is not None:
                        tr.note(i, phase, action, t)
                if body and f.has(BODY_CB[RESPONSE]) and ctx.alive:
                    buf = ctx.bodies[RESPONSE] = BodyBuffer(data=body, limit=f.spec.limits.max_buffered_body_bytes)
                    phase = 4
                    t = time.perf_counter_ns() if tr is not None else 0
                    action = f.call(ctx, BODY_CB[RESPONSE], ctx.id, buf.size, 1)
                    if tr is not None:
                        tr.note(i, phase, action, t)
                    body = buf.data()
            except FilterFailure:
                if tr is not None:
                    tr.note(i, phase, FAILED, t)
                self.failed[i] = True
        items = self._wire(self.response_headers)
        status = items[0][1] if items and items[0][0] == ":status" else ""
        return self._finish_reply(LocalReply(
            int(status) if status.isdigit() else reply.status,
            [(k, v) for k, v in items if not k.startswith(":")], body, reply.details))

    # -- teardown --------------------------------------------------------------------------------

    async def finish(self, log: LogInfo) -> None:
        """on_done → on_log → on_delete for every context (on_delete last); never raises."""
        self.log = log
        self._closed = True
        self._finished = True
        done, self._on_finished = self._on_finished, None
        try:
            tr = self.trace
            if tr is not None:           # the trace reads the contexts before their teardown
                for i, ctx in enumerate(self.ctxs):
                    tr.capture(i, ctx, self.failed[i])
            walk_finish(self)
        finally:
            if done is not None:
                done()

    def _finish_one(self, i: int) -> None:
        """Filter i's context torn down (walk_finish does it for each; never raises)."""
        ctx = self.ctxs[i]
        if ctx is None or ctx.chain is None:     # never opened, or already deleted
            return
        f = self.filters[i]
        try:
            if ctx.waiter is not None:
                ctx.wake()
            f.finish_context(ctx, self.failed[i])    # releases and detaches ctx, always
        except FilterFailure:
            pass
        except Exception as e:           # noqa: BLE001 — teardown must never fail the gateway
            self._teardown_failed(i, e)

    def _teardown_failed(self, i: int, e: Exception) -> None:
        f = self.filters[i]
        f.log.error('filter "%s": teardown failed', f.name, exc_info=e)

    # -- the per-filter loops --------------------------------------------------------------------
    # What _crossing.c's walk_request / walk_response / walk_finish do in C (engine.chain_walks,
    # the ones used when built); these are the reference, used without the C build: keep them
    # alike. A headers walk answers None once every filter is done, else ``i * 4 + state``:
    # filter i's headers callback answered `state` and the chain's coroutine carries on there,
    # because filter i paused or has a body to stage.

    def _request_headers(self, i: int, eos: bool) -> int:
        """Filter i's context opened and its request headers callback run: its state (a
        failure to open is the filter's failure policy, then SKIPPED)."""
        f = self.filters[i]
        try:
            ctx = f.new_http_context(self)
        except FilterFailure:
            ctx = None
        if ctx is None:
            self._fail(i)
            return SKIPPED
        self.ctxs[i] = ctx
        return f.headers(self, i, ctx, REQUEST, eos) if f.on_headers[REQUEST] else CONTINUE


def _hand_back(chain: Chain, i: int, direction: int, state: int, eos: bool) -> bool:
    """Whether the chain's coroutine carries on at filter i: it paused, or has a body to stage."""
    return state == PAUSED or (not eos and not chain.skipped[i]
                               and chain.filters[i].body_callbacks[direction])


def _walk_request(chain: Chain, i: int, eos: bool) -> int | None:
    for i in range(i, len(chain.filters)):
        state = chain._request_headers(i, eos)
        if _hand_back(chain, i, REQUEST, state, eos):
            return i * 4 + state
    return None


def _walk_response(chain: Chain, i: int, eos: bool) -> int | None:
    ctxs = chain.ctxs
    for i in range(min(i, len(ctxs) - 1), -1, -1):
        ctx = ctxs[i]
        if ctx is None or chain.skipped[i]:
            continue
        f = chain.filters[i]
        state = f.headers(chain, i, ctx, RESPONSE, eos) if f.on_headers[RESPONSE] else CONTINUE
        if _hand_back(chain, i, RESPONSE, state, eos):
            return i * 4 + state
    return None


def _walk_finish(chain: Chain) -> None:
    for i in range(len(chain.ctxs)):
        chain._finish_one(i)


PY_WALKS = (_walk_request, _walk_response, _walk_finish)
walk_request, walk_response, walk_finish = chain_walks or PY_WALKS
stream_head = native_stream_head or _stream_head
