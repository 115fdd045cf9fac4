"""headers filter end to end over HTTP: the request id and client address the gateway provides,
response headers from a real upstream (multi-valued ones included). Every operation and template,
through the same wasm without sockets: test_headers_unit.py."""
from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.filters.conftest import filter_gateway, header_values
from tests.filters.test_headers_unit import REQUEST, RESPONSE

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The same configurations the unit tests load: here through the gateway.
FILTERS = [{"name": "req", "wasm": "headers", "config": REQUEST},
           {"name": "resp", "wasm": "headers", "config": RESPONSE}]
ROUTES = [{"name": f["name"], "match": {"prefix": f"/{f['name']}/"}, "cluster": "backend", "filters": [f["name"]]}
          for f in FILTERS]


def handler_for(state):
    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        state.append(headers)
        resp = web.Response(body=json.dumps({"path": request.path_qs}).encode(), content_type="application/json")
        resp.headers["x-secret"] = "s3cr3t"
        resp.headers["x-up"] = "hello"
        resp.headers.add("x-up-multi", "a")
        resp.headers.add("x-up-multi", "b")
        return resp
    return handle


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(tmp_path_factory):
    seen: list = []
    async with filter_gateway(tmp_path_factory.mktemp("hdr"), FILTERS, ROUTES, handler=handler_for(seen)) as (gw, _):
        async with aiohttp.ClientSession() as session:
            yield gw, seen, session


async def call(gw, path, headers=None):
    g, seen, s = gw
    before = len(seen)
    async with s.get(g.url(path), headers=headers or {}) as r:
        await r.read()
        assert len(seen) == before + 1
        return r.status, r.headers, seen[-1]


async def test_request_id_and_client_address_come_from_the_gateway(gw):
    status, _, up = await call(gw, "/req/a/b?q=1", [("x-drop", "1"), ("x-request-id", "rid-123")])
    assert status == 200
    assert header_values(up, "x-drop") == []
    assert header_values(up, "x-path") == ["/req/a/b?q=1"]
    assert header_values(up, "x-rid") == ["rid-123"]                  # the client's id, adopted
    client = header_values(up, "x-client")[0]
    host, _, port = client.rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert header_values(up, "x-port") == [port]


async def test_request_id_generated_by_gateway(gw):
    _, resp_h, up = await call(gw, "/req/x")
    rid = header_values(up, "x-rid")
    assert len(rid) == 1 and rid[0]
    assert header_values(up, "x-request-id") == rid


async def test_response_operations_and_templates(gw):
    status, h, _ = await call(gw, "/resp/x", {"x-foo": "from-request", "x-request-id": "rid-9"})
    assert status == 200
    assert "x-secret" not in h
    assert "x-up-multi" not in h
    assert h.getall("x-renamed") == ["a", "b"]
    assert h["server"] == "wasmgate"
    assert h["x-code"] == "200"
    assert h["x-echo"] == "from-request"                               # request header captured for the response
    assert h["x-up"] == "up said hello"
    assert h["x-rid"] == "rid-9"
    assert h["x-added"] == "1"
