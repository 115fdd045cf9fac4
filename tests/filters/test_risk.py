"""risk filter end to end over HTTP: bodies forwarded intact, chunked uploads buffered to the end,
tag mode (the gateway delivers the body to a filter paused in headers), 413 over max_body_bytes.
Every verdict and option, through the same wasm without sockets: test_risk_unit.py."""
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
    {"name": "tag", "wasm": "risk", "deliver_body_while_paused": True, "config": {
        "threshold": 100, "action": "tag", "tag_header": "X-Risk-Flag", "tag_value": "review"}},
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
