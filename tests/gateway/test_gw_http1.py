"""HTTP/1.1 parsing on llhttp: round trips, arbitrary bytes only ever give HttpError, chunked
bodies end exactly where llhttp says (pipelining), and the pinned leniencies hold."""
import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from gateway.http1 import HttpError, PeerClosed, body_length, parse_request_head, parse_response_head, read_chunked
from tests.gateway.conftest import basic_yaml
from tests.helpers import raw_exchange, run_gateway, split_responses

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                min_size=1, max_size=20)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                max_size=40).map(lambda v: v.strip(" \t"))


@given(st.lists(st.tuples(TOKEN, VALUE), max_size=12), st.sampled_from(["GET", "POST", "M-SEARCH"]))
@settings(max_examples=200, deadline=None)
def test_request_head_round_trip(headers, method):
    raw = f"{method} /p?q=1 HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    try:
        m, target, version, parsed = parse_request_head(raw.encode("latin-1"))
    except HttpError as e:
        # llhttp refuses broken framing fields (e.g. an empty Content-Length) while parsing the
        # head; the regex parser left that to body_length(). Either way it is a 400 (RFC 9112 §6.3).
        assert e.status == 400
        with pytest.raises(HttpError):
            body_length([(n.lower(), v) for n, v in headers], request=True)
        return
    assert (m, target, version) == (method, "/p?q=1", "HTTP/1.1")
    assert parsed == [(n.lower(), v) for n, v in headers]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_parse_or_raise_http_error(data):
    for parse in (parse_request_head, parse_response_head):
        try:
            result = parse(data + b"\r\n\r\n")
        except HttpError as e:
            assert e.status in (400, 502, 505)
            continue
        headers = result[-1]
        for name, value in headers:
            assert name == name.lower() and "\r" not in value and "\n" not in value
        try:
            body_length(headers, request=True)
        except HttpError as e:
            assert e.status == 400


@given(st.sampled_from([b"GET", b"OPTIONS", b"CONNECT", b"PURGE-ALL"]), st.sampled_from([b" ", b"  ", b"\t"]),
       st.sampled_from([b"/", b"/p?q=1&r", b"*", b"http://h:1/x#f", b"h:443", b"/a b", b"/%7e", b""]),
       st.sampled_from([b" ", b"   ", b""]))
@settings(max_examples=200, deadline=None)
def test_request_target_is_what_llhttp_reports(method, gap, target, gap2):
    """The target is sliced from the request line llhttp validated (no on_url callback): for
    every line llhttp takes, it is exactly what llhttp's on_url reports."""
    import httptools

    class Url:
        url = b""

        def on_url(self, url):
            self.url += url

    line = method + gap + target + gap2 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    seen = Url()
    try:
        httptools.HttpRequestParser(seen).feed_data(line.replace(b"PURGE-ALL", b"PUT", 1))
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        with pytest.raises(HttpError):
            parse_request_head(line)
        return
    try:
        got = parse_request_head(line)[1]
    except HttpError as e:
        # "CONNECT  HTTP/1.1": llhttp reads "HTTP/1.1" as the target of a versionless line; we refuse.
        assert not target and e.status == 400
        return
    assert got == seen.url.decode("latin-1")


def test_response_status_lines():
    assert parse_response_head(b"HTTP/1.0 204\r\n\r\n")[:2] == (204, "HTTP/1.0")
    for bad in (b"RTSP/1.0 200 OK", b"HTTP/2.0 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 OK\r\nX : y"):
        try:
            parse_response_head(bad + b"\r\n\r\n")
            raise AssertionError(bad)
        except HttpError as e:
            assert e.status == 502


def test_response_head_and_framing():
    status, version, headers = parse_response_head(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 5, 5\r\nX:  padded  \r\n\r\n")
    assert (status, version) == (404, "HTTP/1.1") and ("x", "padded") in headers
    assert body_length(headers, request=False) == 5
    assert body_length([("transfer-encoding", "Chunked")], request=True) is None
    assert body_length([], request=True) == -1


def test_methods_must_be_upper_case_tokens():
    for good in (b"GET", b"M-SEARCH", b"PROPFIND", b"X_1"):
        assert parse_request_head(good + b" / HTTP/1.1\r\n\r\n")[0] == good.decode()
    for bad in (b"get", b"%00POST", b"G$T", b"1GET", b"X" * 40):
        try:
            parse_request_head(bad + b" / HTTP/1.1\r\n\r\n")
            raise AssertionError(bad)
        except HttpError as e:
            assert e.status == 400


def test_versions_and_extension_methods():
    assert parse_request_head(b"PURGE-ALL /x HTTP/1.0\r\nHost: h\r\n\r\n")[:3] == ("PURGE-ALL", "/x", "HTTP/1.0")
    for line, status in ((b"GET / HTTP/1.2", 505), (b"GET / HTTP/2.0", 505), (b"GET / FTP/1.1", 400),
                         (b"GET / RTSP/1.0", 400), (b"GET /a?0", 400), (b"GET / HTTP/1.x", 505), (b"GET /caf\xc3\xa9 HTTP/1.1", 400)):
        try:
            parse_request_head(line + b"\r\nHost: h\r\n\r\n")
            raise AssertionError(line)
        except HttpError as e:
            assert e.status == status, (line, e.status, e.message)
    assert parse_request_head(b"GET / HTTP/1.1\r\nContent-Length: 3, 3\r\ncontent-length: 3\r\n\r\n")[3] == [
        ("content-length", "3")]                        # RFC 9110 §8.6, as before
    for bad in (b"Content-Length: 3, 4", b"Content-Length: 3\r\nContent-Length: 4", b"Content-Length: "):
        try:
            parse_request_head(b"POST / HTTP/1.1\r\n" + bad + b"\r\n\r\n")
            raise AssertionError(bad)
        except HttpError as e:
            assert e.status == 400
    # obs-text in a value is kept as latin-1; Upgrade requests are ordinary requests to us
    _, _, _, headers = parse_request_head(b"GET / HTTP/1.1\r\nX: caf\xe9\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n")
    assert headers == [("x", "caf\xe9"), ("upgrade", "ws"), ("connection", "upgrade")]


class _Reader:
    def __init__(self, parts):
        self.parts = list(parts)

    async def read(self, n):
        return self.parts.pop(0) if self.parts else b""


def _dechunk(parts):
    async def run():
        trailers, rest, out = [], [], []
        async for data in read_chunked(_Reader(parts), trailers=trailers, rest=rest):
            out.append(data)
        return b"".join(out), trailers, b"".join(rest)
    return asyncio.run(run())


def test_chunked_body_ends_exactly_and_keeps_trailers():
    nxt = b"GET /next HTTP/1.1\r\n\r\n"
    assert _dechunk([b"5\r\nhello\r\n0\r\n\r\n" + nxt]) == (b"hello", [], nxt)
    assert _dechunk([b"4\r\n\r\n\r\n\r\n0\r\nT: 1\r\n\r\n" + nxt]) == (b"\r\n\r\n", [("t", "1")], nxt)
    assert _dechunk([b"2\r\nab\r\n", b"0\r\n\r\n\r\n"]) == (b"ab", [], b"")    # extra CRLF: nothing pending
    # the final CRLFCRLF split across reads, and CRLFCRLF inside chunk data
    assert _dechunk([b"4\r\n\r\n\r\n\r\n0\r\n\r", b"\n" + nxt]) == (b"\r\n\r\n", [], nxt)
    body, trailers, rest = _dechunk([b"3 ;a=b\r\nabc\r\n0\r\nX-T:  t \r\nContent-Length: 9\r\n\r\n"])
    assert (body, trailers, rest) == (b"abc", [("x-t", "t"), ("content-length", "9")], b"")
    for bad in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n", b"ffffffffffffffffff\r\n",
                b"3\r\nabc\r\n0\r\nBad Name: x\r\n\r\n"):
        try:
            _dechunk([bad])
            raise AssertionError(bad)
        except HttpError as e:
            assert e.status == 400
    try:
        _dechunk([b"5\r\nhel"])
        raise AssertionError("no PeerClosed")
    except PeerClosed:
        pass


async def test_request_pipelined_after_a_chunked_body(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        raw = await raw_exchange(gw.port(), b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n0\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz"
                                 b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert [s for s, _, _ in split_responses(raw)] == [200, 200, 200]
    assert [(r.path, r.body_length) for r in upstream.requests] == [("/a", 5), ("/b", 3), ("/c", 0)]
