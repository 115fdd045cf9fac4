"""HTTP/1.1 wire format shared by both sides of the proxy: strict head parsing and body framing.

The parser is deliberately strict (RFC 9112): anything ambiguous about where a message ends is
rejected, because the proxy re-frames every body itself and must never let a request the
upstream would split differently through (request smuggling).
"""
from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator

# RFC 9110 §7.6.1 plus the legacy names every proxy strips. Names listed in Connection are
# added per message.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "trailer"})
# Headers the proxy always writes itself when serialising a message.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A whole header section in one match: `token ":" value CRLF`, values free of control chars
# (this also rejects obs-fold, bare CR/LF and whitespace before the colon).
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+")
# Methods as nginx takes them: upper-case tokens (GET, PROPFIND, M-SEARCH...). Any tchar string
# is a valid token, but "get" or "%00POST" only ever come from broken or hostile clients.
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}")
# A request target is visible ASCII only (RFC 3986 via RFC 9112 §3.2); raw UTF-8 or controls are
# refused rather than forwarded for each upstream to interpret its own way.
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?")

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


def parse_headers(lines: list[bytes]) -> Headers:
    headers: Headers = []
    append = headers.append
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            # Covers obs-fold (leading whitespace), "name : value" and garbage lines.
            raise HttpError(400, f"malformed header line {line[:60]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, f"invalid character in header {name.decode('latin-1')}")
        append((name.decode("latin-1").lower(), value.decode("latin-1")))
    return headers


def _fast_headers(head: bytes, end: int) -> Headers:
    """Headers of a head whose first line ends at ``end``; validated by one regex match."""
    if _HEADER_BLOCK.fullmatch(head, end + 2, len(head) - 2) is None:
        return parse_headers(head[end + 2:-4].split(b"\r\n"))   # slow path: names the bad line
    if end + 4 >= len(head):
        return []
    headers: Headers = []
    append = headers.append
    for line in head[end + 2:-4].decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        append((name.lower(), value.strip(" \t")))
    return headers


def parse_request_head(head: bytes) -> tuple[str, str, str, Headers]:
    """``head`` ends with CRLFCRLF. Returns method, target, version, lower-cased headers."""
    end = head.find(b"\r\n")
    parts = head[:end].split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise HttpError(400, "malformed request line")
    if not _METHOD.fullmatch(parts[0]):
        raise HttpError(400, f"invalid method {parts[0][:40]!r}")
    version = parts[2]
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        raise HttpError(400, "malformed request line")
    target = parts[1]
    if _BAD_TARGET.search(target):
        raise HttpError(400, "invalid character in request target")
    return (parts[0].decode("latin-1"), target.decode("latin-1"), version.decode("latin-1"),
            _fast_headers(head, end))


def parse_response_head(head: bytes) -> tuple[int, str, Headers]:
    end = head.find(b"\r\n")
    status_line = head[:end]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise HttpError(502, f"malformed upstream status line {status_line[:60]!r}")
    try:
        return int(parts[1]), parts[0].decode("latin-1"), _fast_headers(head, end)
    except HttpError as e:
        raise HttpError(502, f"upstream sent {e.message}") from None


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
                if not _DIGITS.fullmatch(v.encode("latin-1")) or len(v) > 18:
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


async def read_length(reader: asyncio.StreamReader, n: int, chunk: int = 262144) -> AsyncIterator[bytes]:
    while n > 0:
        data = await reader.read(min(n, chunk))
        if not data:
            raise PeerClosed(f"connection closed with {n} body bytes missing")
        n -= len(data)
        yield data


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


async def read_chunked(reader: asyncio.StreamReader, status: int = 400,
                       trailers: list | None = None) -> AsyncIterator[bytes]:
    """De-chunk a body. Trailer fields go to ``trailers`` if given (else dropped).
    Raises HttpError(status) on bad framing."""
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError:
            raise PeerClosed("connection closed inside a chunked body") from None
        except asyncio.LimitOverrunError:
            raise HttpError(status, "chunk size line too long") from None
        m = _CHUNK_SIZE.fullmatch(line, 0, len(line) - 2)
        if m is None:
            raise HttpError(status, "malformed chunk size line")
        size = int(m.group(1), 16)
        if size == 0:
            break
        while size > 0:
            data = await reader.read(min(size, 262144))
            if not data:
                raise PeerClosed("connection closed inside a chunk")
            size -= len(data)
            yield data
        try:
            crlf = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise PeerClosed("connection closed inside a chunked body") from None
        if crlf != b"\r\n":
            raise HttpError(status, "chunk data not followed by CRLF")
    # Trailer section: header lines until an empty line.
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError:
            raise PeerClosed("connection closed inside chunked trailers") from None
        except asyncio.LimitOverrunError:
            raise HttpError(status, "trailer line too long") from None
        if line == b"\r\n":
            return
        if trailers is not None:
            try:
                trailers.extend(parse_headers([line[:-2]]))
            except HttpError:
                raise HttpError(status, "malformed trailer field") from None


def serialize_headers(headers: Headers, skip: frozenset[str] | set[str] = FRAMING) -> list[str]:
    """Header lines for the wire, without pseudo-headers and the framing headers we set ourselves."""
    return [f"{n}: {v}\r\n" for n, v in headers if n[0] != ":" and n not in skip]
