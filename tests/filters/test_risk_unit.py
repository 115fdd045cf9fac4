"""risk filter, unit level through the real wasm (wasmgate's pytest plugin, no sockets): the
threshold (default and nested field), 403 with its reason, numeric strings, every 400, methods,
on_missing, tag mode (deliver_body_while_paused), max_body_bytes, bodies in several chunks.
End to end over HTTP (bodies forwarded intact, chunked uploads, 413): test_risk.py."""
from __future__ import annotations

import json

import pytest

from tests.filters.conftest import DIST

WASM = DIST / "risk.wasm"


def js(doc) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
def reject(wasm_filter):
    return wasm_filter(WASM, config={"threshold": 10000})


def test_threshold(reject):
    r = reject.request("POST", "/pay", body=js({"amount": 10000.5}))
    assert r.local_reply.status == 403 and r.local_reply.headers["content-type"].startswith("application/json")
    assert json.loads(r.local_reply.body) == {"error": "forbidden", "reason": "amount exceeds 10000",
                                              "field": "amount", "value": 10000.5, "threshold": 10000}
    body = js({"amount": 10000, "note": "x" * 3000})
    assert reject.request("POST", "/pay", body=body).upstream_request.body == body
    assert reject.request("POST", "/pay", body=js({"amount": "25000.00"})).local_reply.status == 403   # numeric string
    chunks = [b'{"amo', b'unt": 2', b"0001, ", b'"pad": "' + b"y" * 20000 + b'"}']
    assert json.loads(reject.request("POST", "/pay", body=chunks).local_reply.body)["value"] == 20001


@pytest.mark.parametrize("body,message", [
    (b"amount=20000", "request body is not JSON"),
    (b'{"amount": 1', "request body is not JSON"),
    (b"", "request body is empty"),
    (b"  \n", "request body is empty"),
    (js({"total": 5}), "field amount is missing"),
    (js({"amount": None}), "field amount is missing"),
    (js({"amount": "lots"}), "field amount is not a number"),
    (js({"amount": [1]}), "field amount is not a number"),
    (b'{"amount": 1, "amount": 20000}', "field amount appears more than once"),
    (b'{"amount": 20000, "amount": 1}', "field amount appears more than once"),
])
def test_bad_bodies_get_400(reject, body, message):
    r = reject.request("POST", "/pay", headers={"content-length": str(len(body))}, body=body or None)
    assert r.local_reply.status == 400
    assert json.loads(r.local_reply.body) == {"error": "bad_request", "message": message}


def test_methods_not_checked_pass_through(reject):
    assert reject.request("GET", "/pay").forwarded
    assert reject.request("DELETE", "/pay", body=b"not json at all").upstream_request.body == b"not json at all"


def test_nested_field_custom_reason_and_methods(wasm_filter):
    f = wasm_filter(WASM, config={"field": "payment.items.1.amount", "threshold": 500,
                                  "reason": "second item too expensive", "on_missing": "allow",
                                  "methods": ["post", "DELETE"]})
    over = js({"payment": {"items": [{"amount": 9999}, {"amount": 501}]}})
    doc = json.loads(f.request("POST", "/pay", body=over).local_reply.body)
    assert doc["reason"] == "second item too expensive" and doc["field"] == "payment.items.1.amount"
    assert f.request("DELETE", "/pay", body=over).local_reply.status == 403
    assert f.request("PUT", "/pay", body=over).forwarded                       # PUT not listed
    assert f.request("POST", "/pay", body=js({"payment": {"items": [{"amount": 1}, {"amount": 500}]}})).forwarded
    assert f.request("POST", "/pay", body=js({"payment": {"items": [{"amount": 1}]}})).forwarded   # on_missing: allow
    assert f.request("POST", "/pay", body=b"[not json").local_reply.status == 400


def test_tag_mode(wasm_filter):
    f = wasm_filter(WASM, deliver_body_while_paused=True, config={
        "threshold": 100, "action": "tag", "tag_header": "X-Risk-Flag", "tag_value": "review"})
    r = f.request("POST", "/pay", headers={"x-risk-flag": "client-set"}, body=js({"amount": 101}))
    assert r.upstream_request.headers.get_all("x-risk-flag") == ["review"]
    r = f.request("POST", "/pay", headers={"x-risk-flag": "client-set"}, body=js({"amount": 100}))
    assert "x-risk-flag" not in r.upstream_request.headers                   # a client cannot pre-set it
    assert f.request("POST", "/pay", body=b"nope").local_reply.status == 400
    r = f.request("POST", "/pay", body=[b'{"amount": ', b"5000}"])
    assert r.upstream_request.headers["x-risk-flag"] == "review"
    assert r.upstream_request.body == b'{"amount": 5000}'


def test_reject_mode_when_body_is_delivered_while_paused(wasm_filter):
    f = wasm_filter(WASM, deliver_body_while_paused=True, config={"threshold": 10000})
    assert f.request("POST", "/pay", body=js({"amount": 10001})).local_reply.status == 403
    assert f.request("POST", "/pay", body=js({"amount": 10})).upstream_request.body == js({"amount": 10})


def test_body_over_max_is_413(wasm_filter):
    f = wasm_filter(WASM, config={"threshold": 1, "max_body_bytes": 64})
    r = f.request("POST", "/pay", body=js({"amount": 0, "pad": "z" * 100}))           # by content-length
    assert r.local_reply.status == 413 and json.loads(r.local_reply.body)["error"] == "payload_too_large"
    r = f.request("POST", "/pay", headers={"transfer-encoding": "chunked"},
                  body=[b'{"amount": 0, "pad": "', b"z" * 100, b'"}'])                # while buffering
    assert r.local_reply.status == 413
    assert f.request("POST", "/pay", body=js({"amount": 0})).forwarded
