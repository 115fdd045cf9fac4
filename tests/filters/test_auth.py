"""auth filter end to end over HTTP through the gateway: an API key in a header and in the query
(stripped from the upstream's path), a 401 with its challenge, and two header lines whose names
differ only in case (aiohttp would fold them; a raw request sends both). Every option and reject
path, through the same wasm without sockets: test_auth_unit.py."""
from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio

from tests.filters.conftest import filter_gateway, header_values
from tests.helpers import raw_exchange, split_responses

pytestmark = pytest.mark.asyncio(loop_scope="module")

FILTERS = [
    {"name": "keys_default", "wasm": "auth", "config": {
        "api_key": {"keys": [{"key": "k-alice-1", "identity": "alice"}]}, "realm": "shop"}},
    {"name": "keys_strip", "wasm": "auth", "config": {
        "api_key": {"header": "x-api-key", "query": "api_key", "keys": [{"key": "k-alice-1", "identity": "alice"}]},
        "strip_credentials": True, "identity_header": "x-user"}},
]
ROUTES = [{"name": f["name"], "match": {"prefix": f"/{f['name']}/"}, "cluster": "backend", "filters": [f["name"]]}
          for f in FILTERS]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(tmp_path_factory):
    async with filter_gateway(tmp_path_factory.mktemp("auth"), FILTERS, ROUTES) as (gw, up):
        async with aiohttp.ClientSession() as session:
            yield gw, up, session


async def test_api_key_over_http(gw):
    g, up, s = gw
    async with s.get(g.url("/keys_default/x"), headers={"x-api-key": "k-alice-1"}) as r:
        assert r.status == 200
    assert header_values(up.requests[-1].headers, "x-auth-identity") == ["alice"]
    async with s.get(g.url("/keys_strip/x?a=1&api_key=k-alice-1&b=2")) as r:
        assert r.status == 200
    fwd = up.requests[-1]
    assert fwd.path == "/keys_strip/x?a=1&b=2" and header_values(fwd.headers, "x-user") == ["alice"]
    before = len(up.requests)
    async with s.get(g.url("/keys_default/x")) as r:
        assert r.status == 401 and r.headers["www-authenticate"] == 'ApiKey realm="shop", header="x-api-key"'
        assert (await r.json())["error"] == "unauthorized"
    assert len(up.requests) == before


async def test_duplicate_header_names_differing_in_case_are_one_header(gw):
    g, up, _ = gw
    before = len(up.requests)
    raw = await raw_exchange(g.port(), b"GET /keys_default/x HTTP/1.1\r\nHost: t\r\nX-Api-Key: k-alice-1\r\n"
                                       b"x-api-key: k-alice-1\r\nConnection: close\r\n\r\n")
    [(status, _, body)] = split_responses(raw)
    assert status == 400 and json.loads(body)["message"] == "more than one x-api-key header"
    assert len(up.requests) == before
