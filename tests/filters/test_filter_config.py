"""Filter configuration through the gateway: msgpack encoding reaches the filter, and a bad
`config:` stops the gateway from starting with the filter's own reason."""
from __future__ import annotations

import aiohttp
import pytest

from tests.filters.conftest import DIST, assert_start_refused, filter_gateway, gateway_yaml, header_values


async def test_msgpack_encoded_configs(tmp_path):
    filters = [
        {"name": "auth", "wasm": "auth", "encoding": "msgpack",
         "config": {"api_key": {"keys": [{"key": "k1", "identity": "alice"}]}}},
        {"name": "hdr", "wasm": "headers", "encoding": "msgpack",
         "config": {"request": {"set": {"x-who": "${request.header.x-auth-identity}"}}}},
        {"name": "risk", "wasm": "risk", "encoding": "msgpack", "config": {"threshold": 5, "field": "a.b"}},
    ]
    routes = [{"name": "r", "cluster": "backend", "filters": ["auth", "hdr", "risk"]}]
    async with filter_gateway(tmp_path, filters, routes) as (gw, up):
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url("/x"), json={"a": {"b": 4}}, headers={"x-api-key": "k1"}) as r:
                assert r.status == 200
            assert header_values(up.requests[-1].headers, "x-who") == ["alice"]
            async with s.post(gw.url("/x"), json={"a": {"b": 6}}, headers={"x-api-key": "k1"}) as r:
                assert r.status == 403
            async with s.post(gw.url("/x"), json={"a": {"b": 1}}) as r:
                assert r.status == 401


@pytest.mark.parametrize("wasm,config,reason", [
    ("auth", {"jwt": {"secret": "short"}}, "jwt.secret: at least 16 bytes"),
    ("auth", {"api_key": {"keys": [{"key": "k"}]}}, "identity: required"),
    ("ratelimit", {"limits": [{"rate": 1, "key": "cookie"}]}, "expected global, client, identity or header:<name>"),
    ("headers", {"request": {"add": {"x": "${unterminated"}}}, "unterminated"),
    ("risk", {"threshold": "high"}, "threshold: expected a number"),
    ("risk", {"threshold": 1, "typo": True}, "typo: unknown key"),
])
async def test_bad_config_refuses_to_start(tmp_path, wasm, config, reason, caplog):
    yaml_text = gateway_yaml(9, [{"name": "f", "wasm": wasm, "config": config}],
                             [{"name": "r", "cluster": "backend", "filters": ["f"]}])
    await assert_start_refused(tmp_path, yaml_text, caplog, reason)
