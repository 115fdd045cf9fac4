"""HTTP/1.1 wire format shared by both sides of the proxy: heads and chunked bodies parsed by
llhttp (through httptools), plus the framing decisions the proxy takes on top.

The proxy re-frames every body itself, so anything ambiguous about where a message ends is
rejected (request smuggling): llhttp runs in its strict mode. Its only leniencies are in the
chunked-body decoder (see read_chunked): BWS after a chunk size, which RFC 9112 §7.1.1 allows,
and a Content-Length field in the trailers, which is dropped rather than refused.

I/O stays with asyncio streams: a head is read up to its CRLFCRLF, then handed to llhttp whole;
a Content-Length body is counted, not parsed; a chunked body goes through llhttp piece by piece.
"""
from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator, Callable

import httptools

# RFC 9110 §7.6.1 plus the legacy names every proxy strips. Names listed in Connection are
# added per message.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "trailer"})
# Headers the proxy always writes itself when serialising a message.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})

# Methods as nginx takes them: upper-case tokens (GET, PROPFIND, M-SEARCH...). Any tchar string
# is a valid token, but "get" or "%00POST" only ever come from broken or hostile clients.
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}")
# llhttp only knows registered methods; an extension method (valid per RFC 9110 §9.1 and
# forwarded) is handed to it as this one, which frames a request body the same way.
_STAND_IN = b"PUT"
# RFC 9110 §8.6: Content-Length values that are all the same number ("5, 5", or the field
# twice) may be taken as that number; llhttp refuses them, so such a head is retried once with
# the fields collapsed into one.
_CL_FIELD = re.compile(rb"(?im)^content-length:([^\r\n]*)\r\n")

Headers = list[tuple[str, str]]


class HttpError(Exception):
    """A message the peer sent that we refuse; ``status`` is what a client should get."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(HttpError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class PeerClosed(Exception):
    """The other side closed or reset the connection mid-message."""


class StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, handing each segment straight to its reader: the base class
    looks the reader up through a weakref property on every data_received."""

    def __init__(self, reader: asyncio.StreamReader, on_connection: Callable | None = None):
        super().__init__(reader, on_connection, loop=asyncio.get_running_loop())
        self._reader = reader

    def data_received(self, data: bytes) -> None:
        self._reader.feed_data(data)


class _Head:
    """llhttp callbacks for one head: lower-cased header fields (latin-1). The request target
    is sliced from the request line llhttp validated, without a callback."""
    __slots__ = ("headers", "complete")

    def __init__(self):
        self.headers: Headers = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


# Methods that passed _METHOD → whether llhttp knows them.
_KNOWN_METHODS: dict[bytes, bool] = {}


def _llhttp_knows(method: bytes) -> bool:
    """Whether llhttp knows ``method``; raises HttpError if it breaks our method policy."""
    known = _KNOWN_METHODS.get(method)
    if known is None:
        if not _METHOD.fullmatch(method):
            raise HttpError(400, f"invalid method {method[:40]!r}")
        try:
            httptools.HttpRequestParser(_Head()).feed_data(method + b" / HTTP/1.1\r\n\r\n")
            known = True
        except httptools.HttpParserInvalidMethodError:
            known = False
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            known = True            # CONNECT, PRI: known, refused or handled later
        if len(_KNOWN_METHODS) < 256:
            _KNOWN_METHODS[method] = known
    return known


def _collapse_content_length(head: bytes) -> bytes:
    values = {v.strip(b" \t") for m in _CL_FIELD.finditer(head) for v in m.group(1).split(b",")}
    if len(values) != 1:
        return head
    value = values.pop()
    if not value.isdigit():
        return head
    first = _CL_FIELD.search(head)
    assert first is not None
    return head[:first.start()] + b"content-length: " + value + b"\r\n" + _CL_FIELD.sub(b"", head[first.end():])


def _parse_head(make, head: bytes) -> tuple[object, _Head]:
    """Feed a whole head to a new llhttp parser; returns the parser and what it reported."""
    sink = _Head()
    parser = make(sink)
    try:
        try:
            parser.feed_data(head)
        except httptools.HttpParserError as e:
            if "Content-Length" not in str(e):
                raise
            collapsed = _collapse_content_length(head)
            if collapsed is head:
                raise
            sink = _Head()
            parser = make(sink)
            parser.feed_data(collapsed)
    except httptools.HttpParserUpgrade:
        # Upgrade or CONNECT: llhttp stops after the head. The proxy never switches protocols;
        # it forwards the request with the hop-by-hop fields stripped or refuses its target.
        pass
    return parser, sink


def parse_request_head(head: bytes) -> tuple[str, str, str, Headers]:
    """``head`` ends with CRLFCRLF. Returns method, target, version, lower-cased headers."""
    sp = head.find(b" ")
    method = head[:sp] if sp > 0 else head[:40]
    known = _llhttp_knows(method)
    eol = head.find(b"\r\n")
    if eol < 12 or head[eol - 9:eol - 3] != b" HTTP/":
        raise HttpError(400, "malformed request line")    # llhttp would also take RTSP/, ICE/ and 0.9
    try:
        parser, sink = _parse_head(httptools.HttpRequestParser,
                                   head if known else _STAND_IN + head[sp:])
    except httptools.HttpParserError as e:
        if str(e).startswith("Invalid") and "version" in str(e):
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are supported") from None
        raise HttpError(400, f"malformed request head: {e}") from None
    if not sink.complete:
        raise HttpError(400, "malformed request head")
    version = head[eol - 8:eol]                        # llhttp checked it: HTTP/<digit>.<digit>
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are supported")
    # llhttp took the request line as method SP+ target SP+ version, the target without spaces.
    target = head[sp + 1:eol - 9].strip(b" ")
    if not target:
        raise HttpError(400, "malformed request line")
    return method.decode("latin-1"), target.decode("latin-1"), version.decode("latin-1"), sink.headers


def parse_response_head(head: bytes) -> tuple[int, str, Headers]:
    try:
        parser, sink = _parse_head(httptools.HttpResponseParser, head)
    except httptools.HttpParserError as e:
        raise HttpError(502, f"malformed upstream response head: {e}") from None
    version = head[:8]                                 # llhttp checked it: HTTP/<digit>.<digit>
    if not sink.complete or (version != b"HTTP/1.1" and version != b"HTTP/1.0"):
        status_line = head.partition(b"\r\n")[0]
        raise HttpError(502, f"malformed upstream status line {status_line[:60]!r}")
    return parser.get_status_code(), version.decode("latin-1"), sink.headers


def strip_hop_by_hop(headers: Headers) -> Headers:
    """A message's headers without hop-by-hop ones (RFC 9110 §7.6.1), incl. those Connection names."""
    hop = HOP_BY_HOP
    for name, value in headers:
        if name == "connection":
            low = value.lower()
            if low in hop:          # "keep-alive", most of the time: nothing to add
                continue
            hop = hop | {t.strip() for t in low.split(",")}
    return [(n, v) for n, v in headers if n not in hop]


def connection_tokens(headers: Headers) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def body_length(headers: Headers, *, request: bool) -> int | None:
    """Content-Length, None for chunked; raises HttpError on ambiguous framing.

    Returns -1 when the message has no framing header (request: no body; response: until close).
    """
    cl: str | None = None
    te: list[str] = []
    for name, value in headers:
        if name == "content-length":
            for v in value.split(","):
                v = v.strip()
                if not (v.isdigit() and v.isascii()) or len(v) > 18:
                    raise HttpError(400 if request else 502, f"invalid Content-Length {value!r}")
                if cl is not None and cl != v:
                    raise HttpError(400 if request else 502, "conflicting Content-Length headers")
                cl = v
        elif name == "transfer-encoding":
            te.extend(t.strip().lower() for t in value.split(","))
    if te:
        if cl is not None:
            raise HttpError(400 if request else 502, "both Content-Length and Transfer-Encoding present")
        if te[-1] != "chunked" or te.count("chunked") != 1:
            raise HttpError(400 if request else 502, f"unsupported Transfer-Encoding {', '.join(te)!r}")
        if len(te) != 1:
            # Other codings would have to pass through unchanged; we don't, so refuse loudly.
            raise HttpError(400 if request else 502, f"unsupported Transfer-Encoding {', '.join(te)!r}")
        return None
    if cl is not None:
        return int(cl)
    return -1


class BodyStream:
    """Body chunks as an async iterator that may end with trailers.

    ``trailers`` is None or a list of (lower-case name, value), final once iteration ended:
    the seam's convention for trailers (abi/chain.py reads ``body.trailers`` the same way and
    hands its own output body back with one).
    """
    __slots__ = ("_it", "trailers")

    def __init__(self, it: AsyncIterator[bytes]):
        self._it = it
        self.trailers: Headers | None = None

    def __aiter__(self) -> "BodyStream":
        return self

    def __anext__(self):   # the generator's own awaitable: no extra coroutine per chunk
        return self._it.__anext__()


# Fields that must never travel in a trailer section we write (RFC 9110 §6.5.1).
TRAILER_FORBIDDEN = HOP_BY_HOP | FRAMING | {"host", "content-type", "content-encoding", "content-range",
                                            "authorization", "set-cookie", "cookie", "expect"}


def trailer_block(trailers: Headers | None) -> bytes:
    """The last chunk plus trailer section: ``0\r\n`` [fields] ``\r\n``."""
    if not trailers:
        return b"0\r\n\r\n"
    lines = [f"{n}: {v}\r\n" for n, v in trailers
             if n and n[0] != ":" and n.lower() not in TRAILER_FORBIDDEN and "\r" not in v and "\n" not in v]
    return ("0\r\n" + "".join(lines) + "\r\n").encode("latin-1", "replace")


# llhttp decodes a chunked body after this stand-in head, so both sides share one decoder.
_CHUNKED_HEAD = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"


class _Chunks:
    """llhttp callbacks for a chunked body: data pieces, then trailer fields."""
    __slots__ = ("data", "trailers", "in_body", "done", "overrun")

    def __init__(self):
        self.data: list[bytes] = []
        self.trailers: Headers = []
        self.in_body = False
        self.done = False
        self.overrun = False        # llhttp went on into bytes after the body (a pipelined request)

    def on_message_begin(self) -> None:
        if self.done:
            self.overrun = True

    def on_headers_complete(self) -> None:
        self.in_body = True          # the stand-in head is done: later fields are trailers

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body and not self.done:
            self.trailers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")))

    def on_body(self, data: bytes) -> None:
        if not self.done:
            self.data.append(data)

    def on_message_complete(self) -> None:
        self.done = True


def _dechunker() -> tuple[object, _Chunks]:
    sink = _Chunks()
    parser = httptools.HttpRequestParser(sink)
    # BWS after a chunk size is RFC 9112 §7.1.1 chunk-ext syntax. lenient_chunked_length only
    # concerns a Content-Length next to Transfer-Encoding: the stand-in head has none, so here it
    # just lets a (dropped) Content-Length trailer field through; real heads are parsed strictly.
    parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True, lenient_chunked_length=True)
    parser.feed_data(_CHUNKED_HEAD)
    return parser, sink


def _feed_to_end(parser, sink: _Chunks, data: bytes, tail: bytes) -> int:
    """Feed ``data`` up to the end of the body; returns how many bytes that was.

    httptools cannot say where in a buffer a message ended, but a chunked body ends with
    CRLFCRLF (last chunk, trailers, empty line): feeding up to each CRLFCRLF in turn (``tail``:
    the previous read's last bytes) and stopping once llhttp completes the message finds it.
    """
    buf = tail + data
    start = 0
    pos = buf.find(b"\r\n\r\n")
    while pos != -1:
        end = pos + 4 - len(tail)
        if end > start:
            parser.feed_data(data[start:end])
            start = end
            if sink.done:
                return start
        pos = buf.find(b"\r\n\r\n", pos + 1)
    parser.feed_data(data[start:])
    return len(data)


async def read_chunked(reader, status: int = 400, trailers: list | None = None,
                       rest: list | None = None, chunk: int = 262144) -> AsyncIterator[bytes]:
    """De-chunk a body read from ``reader`` (anything with ``async read(n)``) with llhttp.

    Trailer fields go to ``trailers`` if given (else dropped). Bytes read past the body's end
    (a pipelined request) are appended to ``rest``. Raises HttpError(status) on bad framing.
    """
    # Two parsers in step: ``fast`` takes each read whole; only when it ran past the body's end
    # does ``exact`` (same state, one read behind) feed that read piece by piece to find the end.
    # Piecewise costs a feed per CRLFCRLF, so it is paid once per body, and only when pipelining.
    fast, fast_sink = _dechunker()
    exact, exact_sink = _dechunker()
    tail = b""
    while True:
        data = await reader.read(chunk)
        if not data:
            raise PeerClosed("connection closed inside a chunked body")
        sink = fast_sink
        used = len(data)
        try:
            try:
                fast.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                if not fast_sink.done:
                    raise
                fast_sink.overrun = True
            if fast_sink.overrun:
                sink = exact_sink
                used = _feed_to_end(exact, exact_sink, data, tail)
            else:
                exact.feed_data(data)
                exact_sink.data.clear()
        except httptools.HttpParserError as e:
            raise HttpError(status, f"malformed chunked body: {e}") from None
        tail = data[-3:]
        pieces = sink.data
        if pieces:
            piece = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            yield piece
        if sink.done:
            if rest is not None and used < len(data):
                rest.append(data[used:])
            if trailers is not None:
                trailers.extend(sink.trailers)
            return


def serialize_headers(headers: Headers, skip: frozenset[str] | set[str] = FRAMING) -> list[str]:
    """Header lines for the wire, without pseudo-headers and the framing headers we set ourselves."""
    return [f"{n}: {v}\r\n" for n, v in headers if n[0] != ":" and n not in skip]
