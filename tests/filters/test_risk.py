"""risk filter end to end: JSON body threshold (default and nested field), 403 with reason,
tag mode, 400 for non-JSON / missing / non-numeric, 413 over max_body_bytes, methods,
chunked bodies."""
from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest
import pytest_asyncio

from tests.filters.conftest import filter_gateway, header_values

pytestmark = pytest.mark.asyncio(loop_scope="module")

FILTERS = [
    {"name": "reject", "wasm": "risk", "config": {"threshold": 10000}},
    {"name": "nested", "wasm": "risk", "config": {
        "field": "payment.items.1.amount", "threshold": 500, "reason": "second item too expensive",
        "on_missing": "allow", "methods": ["post", "DELETE"]}},
    {"name": "tag", "wasm": "risk", "deliver_body_while_paused": True, "config": {
        "threshold": 100, "action": "tag", "tag_header": "X-Risk-Flag", "tag_value": "review"}},
    {"name": "reject_bwp", "wasm": "risk", "deliver_body_while_paused": True, "config": {"threshold": 10000}},
    {"name": "small", "wasm": "risk", "config": {"threshold": 1, "max_body_bytes": 64}},
]
ROUTES = [{"name": f["name"], "match": {"prefix": f"/{f['name']}/"}, "cluster": "backend", "filters": [f["name"]]}
          for f in FILTERS]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(tmp_path_factory):
    async with filter_gateway(tmp_path_factory.mktemp("risk"), FILTERS, ROUTES) as (gw, up):
        async with aiohttp.ClientSession() as session:
            yield gw, up, session


async def send(gw, path, body=None, method="POST", headers=None):
    g, up, s = gw
    before = len(up.requests)
    async with s.request(method, g.url(path), data=body, headers=headers or {}) as r:
        data = await r.read()
        fwd = up.requests[-1] if len(up.requests) > before else None
        return r.status, r.headers, data, fwd


def js(doc) -> bytes:
    return json.dumps(doc).encode()


async def test_below_threshold_forwards_body_intact(gw):
    body = js({"amount": 10000, "currency": "EUR", "note": "x" * 3000})
    status, _, data, fwd = await send(gw, "/reject/pay", body, headers={"content-type": "application/json"})
    assert status == 200
    echoed = json.loads(data)
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_above_threshold_rejected_with_reason(gw):
    status, h, data, fwd = await send(gw, "/reject/pay", js({"amount": 10000.5}))
    assert status == 403 and fwd is None
    assert h["content-type"].startswith("application/json")
    assert json.loads(data) == {"error": "forbidden", "reason": "amount exceeds 10000", "field": "amount",
                                "value": 10000.5, "threshold": 10000}


async def test_numeric_string_amount_counts(gw):
    status, _, _, fwd = await send(gw, "/reject/pay", js({"amount": "25000.00"}))
    assert status == 403 and fwd is None


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
async def test_bad_bodies_get_400(gw, body, message):
    status, h, data, fwd = await send(gw, "/reject/pay", body)
    assert status == 400 and fwd is None
    doc = json.loads(data)
    assert doc["error"] == "bad_request"
    assert doc["message"] == message


async def test_methods_not_checked_pass_through(gw):
    status, _, _, fwd = await send(gw, "/reject/pay", None, method="GET")
    assert status == 200 and fwd is not None
    status, _, _, fwd = await send(gw, "/reject/pay", b"not json at all", method="DELETE")
    assert status == 200 and fwd is not None


async def test_nested_field_custom_reason_and_methods(gw):
    over = js({"payment": {"items": [{"amount": 9999}, {"amount": 501}]}})
    status, _, data, fwd = await send(gw, "/nested/pay", over)
    assert status == 403 and fwd is None
    doc = json.loads(data)
    assert doc["reason"] == "second item too expensive" and doc["field"] == "payment.items.1.amount"
    status, _, _, _ = await send(gw, "/nested/pay", over, method="DELETE")
    assert status == 403
    status, _, _, fwd = await send(gw, "/nested/pay", over, method="PUT")     # PUT not listed
    assert status == 200 and fwd is not None
    status, _, _, fwd = await send(gw, "/nested/pay", js({"payment": {"items": [{"amount": 1}, {"amount": 500}]}}))
    assert status == 200
    status, _, _, fwd = await send(gw, "/nested/pay", js({"payment": {"items": [{"amount": 1}]}}))  # on_missing: allow
    assert status == 200
    status, _, _, fwd = await send(gw, "/nested/pay", b"[not json")
    assert status == 400


async def test_tag_mode_forwards_with_header(gw):
    status, _, _, fwd = await send(gw, "/tag/pay", js({"amount": 101}), headers={"x-risk-flag": "client-set"})
    assert status == 200 and fwd is not None
    assert header_values(fwd.headers, "x-risk-flag") == ["review"]
    status, _, _, fwd = await send(gw, "/tag/pay", js({"amount": 100}), headers={"x-risk-flag": "client-set"})
    assert status == 200
    assert header_values(fwd.headers, "x-risk-flag") == []       # a client cannot pre-set the tag
    status, _, _, fwd = await send(gw, "/tag/pay", b"nope")
    assert status == 400 and fwd is None

    async def chunks():
        yield b'{"amount": '
        yield b'5000}'
    status, _, data, fwd = await send(gw, "/tag/pay", chunks())
    assert status == 200 and header_values(fwd.headers, "x-risk-flag") == ["review"]
    assert json.loads(data)["body_length"] == len(b'{"amount": 5000}')


async def test_reject_mode_also_works_when_body_is_delivered_while_paused(gw):
    status, _, _, fwd = await send(gw, "/reject_bwp/pay", js({"amount": 10001}))
    assert status == 403 and fwd is None
    status, _, data, fwd = await send(gw, "/reject_bwp/pay", js({"amount": 10}))
    assert status == 200 and json.loads(data)["body_length"] == len(js({"amount": 10}))


async def test_chunked_body_is_buffered_until_end(gw):
    async def chunks():
        for part in [b'{"amo', b'unt": 2', b"0001, ", b'"pad": "' + b"y" * 20000 + b'"}']:
            yield part
    status, _, data, fwd = await send(gw, "/reject/pay", chunks())
    assert status == 403 and fwd is None
    assert json.loads(data)["value"] == 20001

    async def small_chunks():
        for part in [b'{"amount":', b" 5}"]:
            yield part
    status, _, _, fwd = await send(gw, "/reject/pay", small_chunks())
    assert status == 200 and fwd is not None


async def test_body_over_max_is_413(gw):
    status, _, data, fwd = await send(gw, "/small/pay", js({"amount": 0, "pad": "z" * 100}))
    assert status == 413 and fwd is None
    assert json.loads(data)["error"] == "payload_too_large"

    async def chunks():
        yield b'{"amount": 0, "pad": "'
        yield b"z" * 100
        yield b'"}'
    status, _, _, fwd = await send(gw, "/small/pay", chunks())
    assert status == 413 and fwd is None
    status, _, _, fwd = await send(gw, "/small/pay", js({"amount": 0}))
    assert status == 200
