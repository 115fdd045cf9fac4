"""Routing sees the path the backend will see: every spelling of a protected path either reaches
the auth filter (and the upstream receives the normalised path) or is refused with 400.

The gateway has the shipped config's shape: a route `/api` behind the real auth filter and a
catch-all route without filters. A variant that reached the catch-all would be an auth bypass.
To add a case, add one line to VARIANTS: (raw path, expected upstream path or 400).
"""
from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from tests.filters.conftest import filter_gateway
from tests.helpers import raw_exchange, split_responses

pytestmark = pytest.mark.asyncio(loop_scope="module")

AUTH = [{"name": "auth", "wasm": "auth", "config": {
    "api_key": {"header": "x-api-key", "keys": [{"key": "k-1", "identity": "alice"}]}}}]
ROUTES = [{"name": "api", "match": {"prefix": "/api"}, "cluster": "backend", "filters": ["auth"]},
          {"name": "public", "cluster": "backend"}]

VARIANTS: list[tuple[str, str | int]] = [
    # raw path sent                     what the upstream receives (behind auth), or 400
    ("/api/hello",                      "/api/hello"),
    ("/%61pi/hello",                    "/api/hello"),          # encoded letter
    ("/%61%70%69/hello",                "/api/hello"),
    ("/ap%69/hello",                    "/api/hello"),
    ("/api/%7e/x",                      "/api/~/x"),            # encoded unreserved "~"
    ("/api/%e2%82%ac",                  "/api/%E2%82%AC"),      # other encodings kept, upper-cased
    ("//api/hello",                     "/api/hello"),          # double slashes
    ("///api//hello",                   "/api/hello"),
    ("/api//hello",                     "/api/hello"),
    ("/x/../api/hello",                 "/api/hello"),          # dot segments
    ("/./api/./hello",                  "/api/hello"),
    ("/public/../api/hello",            "/api/hello"),
    ("/api/hello/..",                   "/api/"),
    ("/x/%2e%2e/api/hello",             "/api/hello"),          # dot segments only after decoding
    ("/x/%2E%2e/api/hello",             "/api/hello"),          # mixed-case percent-encodings
    ("/%2e/api/hello",                  "/api/hello"),
    ("/public/%2e%2e/api/hello",        "/api/hello"),
    ("/api/hello/%2e%2E/",              "/api/"),
    ("/x\\..\\api\\hello",              "/api/hello"),          # raw backslashes are separators
    ("/api\\hello",                     "/api/hello"),
    ("/api;v=1/hello",                  "/api;v=1/hello"),      # ; parameters stay, routing ignores them
    ("/%61pi/hello?q=%2F&x=%41",        "/api/hello?q=%2F&x=%41"),  # the query is not touched
    ("/x/..%2fapi/hello",               400),                   # encoded slashes (default: reject)
    ("/x/..%2Fapi/hello",               400),
    ("/x%2f..%2fapi/hello",             400),
    ("/api%2Fhello",                    400),
    ("/x/..%5capi/hello",               400),                   # encoded backslash
    ("/x/..%5Capi/hello",               400),
    ("/;x/api/hello",                   400),                   # parameters on an empty segment
    ("/public/..;/api/hello",           400),                   # Tomcat reads "..;" as ".."
    ("/public/.;x/api/hello",           400),
    ("/%c0%ae%c0%ae/api/hello",         400),                   # overlong UTF-8 dots
    ("/x/%c0%af../api/hello",           400),                   # overlong UTF-8 slash
    ("/api%00/hello",                   400),                   # NUL
    ("/%zzapi/hello",                   400),                   # invalid percent-encodings
    ("/%6",                             400),
    ("/api/hello%",                     400),
    ("/api/%ff",                        400),                   # not UTF-8
    ("/api/hello#frag",                 400),                   # fragments never reach a server
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory):
    async with filter_gateway(tmp_path_factory.mktemp("paths"), AUTH, ROUTES) as pair:
        yield pair


async def _get(port: int, path: str, key: str | None = None) -> tuple[int, dict, bytes]:
    head = f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
    if key:
        head += f"x-api-key: {key}\r\n"
    raw = await raw_exchange(port, (head + "\r\n").encode("latin-1"))
    (status, headers, body), = split_responses(raw)
    return status, headers, body


@pytest.mark.parametrize("raw,expected", VARIANTS, ids=[v[0] for v in VARIANTS])
async def test_a_path_variant_reaches_auth_or_is_refused(gw, raw, expected):
    gateway, up = gw
    before = len(up.requests)
    status, headers, _ = await _get(gateway.port(), raw)
    if expected == 400:
        assert status == 400, (raw, status)
        assert len(up.requests) == before          # nothing reached the upstream
        return
    assert status == 401 and "www-authenticate" in headers, (raw, status)    # the auth filter answered
    assert len(up.requests) == before
    status, _, body = await _get(gateway.port(), raw, key="k-1")
    assert status == 200, (raw, status)
    assert up.requests[-1].path == expected
    assert json.loads(body)["path"] == expected
    assert up.requests[-1].header("x-auth-identity") == "alice"


async def test_the_filters_see_the_forwarded_path(tmp_path):
    # The headers filter copies :path into a header: the filters and the upstream agree.
    filters = [{"name": "hdr", "wasm": "headers", "config": {"request": {"set": {"x-seen-path": "${request.path}"}}}}]
    routes = [{"name": "all", "cluster": "backend", "filters": ["hdr"]}]
    async with filter_gateway(tmp_path, filters, routes) as (gateway, up):
        status, _, _ = await _get(gateway.port(), "//%61pi/./x/%2e%2e/hello?a=%41")
        assert status == 200
        assert up.requests[-1].path == "/api/hello?a=%41"
        assert up.requests[-1].header("x-seen-path") == "/api/hello?a=%41"


@pytest.mark.parametrize("action,status,upstream_path", [
    ("keep", 401, None),                 # kept as data: /x/..%2Fapi is one segment, routed to /x
    ("redirect", 307, None),
])
async def test_encoded_slash_actions(tmp_path, action, status, upstream_path):
    routes = [{"name": "api", "match": {"prefix": "/api"}, "cluster": "backend", "filters": ["auth"]},
              {"name": "x", "match": {"prefix": "/x"}, "cluster": "backend", "filters": ["auth"]},
              {"name": "public", "cluster": "backend"}]
    from tests.filters.conftest import gateway_yaml
    from tests.helpers import echo_upstream, run_gateway
    async with echo_upstream() as up:
        doc = json.loads(gateway_yaml(up.port, AUTH, routes))
        doc["path_normalization"] = {"escaped_slashes": action}
        async with run_gateway(json.dumps(doc), tmp_path) as gateway:
            got, headers, _ = await _get(gateway.port(), "/x/..%2fapi/hello?q=1")
            assert got == status
            if action == "redirect":
                # Decoded, then normalised: the client is sent to the path routing will see.
                assert headers["location"] == "/api/hello?q=1"
            else:
                got, _, _ = await _get(gateway.port(), "/x/..%2fapi/hello", key="k-1")
                assert got == 200 and up.requests[-1].path == "/x/..%2Fapi/hello"


async def test_merge_slashes_can_be_turned_off(tmp_path):
    from tests.filters.conftest import gateway_yaml
    from tests.helpers import echo_upstream, run_gateway
    async with echo_upstream() as up:
        doc = json.loads(gateway_yaml(up.port, AUTH, ROUTES))
        doc["path_normalization"] = {"merge_slashes": False}
        async with run_gateway(json.dumps(doc), tmp_path) as gateway:
            status, _, _ = await _get(gateway.port(), "/api//hello", key="k-1")
            assert status == 200 and up.requests[-1].path == "/api//hello"


async def test_every_variant_at_once_leaves_the_gateway_healthy(gw):
    gateway, _ = gw
    assert len(VARIANTS) >= 30
    answers = await asyncio.gather(*(_get(gateway.port(), raw) for raw, _ in VARIANTS))
    assert {status for status, _, _ in answers} <= {400, 401}
