"""The strict HTTP/1.1 head parser: round trips, and arbitrary bytes only ever give HttpError."""
from hypothesis import given, settings, strategies as st

from gateway.http1 import HttpError, body_length, parse_request_head, parse_response_head

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                min_size=1, max_size=20)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                max_size=40).map(lambda v: v.strip(" \t"))


@given(st.lists(st.tuples(TOKEN, VALUE), max_size=12), st.sampled_from(["GET", "POST", "M-SEARCH"]))
@settings(max_examples=200, deadline=None)
def test_request_head_round_trip(headers, method):
    raw = f"{method} /p?q=1 HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    m, target, version, parsed = parse_request_head(raw.encode("latin-1"))
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
