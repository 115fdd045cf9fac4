"""headers filter, unit level through the real wasm (wasmgate's pytest plugin, no sockets):
remove / rename / set / add on both sides, templates from properties and headers, `$$`, empty
values and keep_empty. End to end over HTTP (request ids, client address, a real upstream):
test_headers.py."""
from __future__ import annotations

import pytest

from tests.filters.conftest import DIST

WASM = DIST / "headers.wasm"
REQUEST = {"request": {
    "remove": ["x-drop", "X-Drop-Too"],
    "rename": {"x-old": "x-new"},
    "set": {"x-set": "fixed", "x-path": "${request.path}", "x-method": "${request.method}",
            "x-rid": "${request.id}", "x-client": "${source.address}", "x-port": "${source.port}",
            "x-copy": "foo=${request.header.x-foo};", "x-missing": "${request.header.x-absent}",
            "x-dollar": "$$5 and $x"},
    "add": [{"name": "x-add", "value": "one"}, {"name": "x-add", "value": "two"}],
}}
RESPONSE = {"response": {
    "remove": ["x-secret"],
    "rename": [{"name": "x-up-multi", "to": "x-renamed"}],
    "set": {"server": "wasmgate", "x-code": "${response.code}", "x-echo": "${request.header.x-foo}",
            "x-up": "up said ${response.header.x-up}", "x-rid": "${request.id}"},
    "add": {"x-added": "1"},
}}


def test_request_operations_and_templates(wasm_filter):
    f = wasm_filter(WASM, config=REQUEST)
    r = f.request("GET", "/a/b?q=1", client=("10.1.2.3", 4567), headers=[
        ("x-drop", "1"), ("X-Drop-Too", "2"), ("x-old", "o1"), ("x-old", "o2"), ("x-set", "client"),
        ("x-foo", "bar"), ("x-add", "zero")])
    h = r.upstream_request.headers
    assert "x-drop" not in h and "x-drop-too" not in h and "x-old" not in h
    assert h.get_all("x-new") == ["o1", "o2"]
    assert h.get_all("x-set") == ["fixed"]                       # set replaces the client's value
    assert (h["x-path"], h["x-method"], h["x-rid"]) == ("/a/b?q=1", "GET", "req-1")
    assert (h["x-client"], h["x-port"]) == ("10.1.2.3:4567", "4567")   # int property, 8-byte LE decoded
    assert h["x-copy"] == "foo=bar;"
    assert "x-missing" not in h                                  # an empty template is not added
    assert h["x-dollar"] == "$5 and $x"
    assert h.get_all("x-add") == ["zero", "one", "two"]          # add keeps existing values
    assert "x-added" not in r.respond(200).headers               # a request-only filter


def test_keep_empty(wasm_filter):
    f = wasm_filter(WASM, config={"keep_empty": True, "request": {
        "set": {"x-missing": "${request.header.x-absent}", "x-literal-empty": ""}}})
    h = f.request("GET", "/").upstream_request.headers
    assert h.get_all("x-missing") == [""] and h.get_all("x-literal-empty") == [""]


def test_response_operations_and_templates(wasm_filter):
    f = wasm_filter(WASM, config=RESPONSE)
    r = f.request("GET", "/", headers={"x-foo": "from-request"})
    resp = r.respond(200, headers=[("x-secret", "s3cr3t"), ("x-up", "hello"), ("x-up-multi", "a"),
                                   ("x-up-multi", "b"), ("server", "upstream")])
    h = resp.headers
    assert "x-secret" not in h and "x-up-multi" not in h
    assert h.get_all("x-renamed") == ["a", "b"]
    assert (h["server"], h["x-code"], h["x-up"], h["x-added"]) == ("wasmgate", "200", "up said hello", "1")
    assert h["x-echo"] == "from-request"                         # request header captured for the response
    assert h["x-rid"] == "req-1"                                 # the harness's request ids: req-1, req-2, …
    assert "x-code" not in r.upstream_request.headers


@pytest.mark.parametrize("status", [201, 404, 503])
def test_response_code_template(wasm_filter, status):
    f = wasm_filter(WASM, config=RESPONSE)
    assert f.request("GET", "/").respond(status).headers["x-code"] == str(status)


def test_both_directions(wasm_filter):
    f = wasm_filter(WASM, config={"request": {"add": {"x-req-tag": "in"}}, "response": {"add": {"x-resp-tag": "out"}}})
    r = f.request("GET", "/")
    assert r.upstream_request.headers["x-req-tag"] == "in" and "x-resp-tag" not in r.upstream_request.headers
    h = r.respond(200).headers
    assert h["x-resp-tag"] == "out" and "x-req-tag" not in h
