"""The ABI host behind the real gateway: WAT filters through real HTTP on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from abi.pairs import serialize
from tests.helpers import echo_upstream, run_gateway

from abi_wat import OUT, Wat

# The chain's behaviour on both filter call paths: NativeFilter's C and Filter's Python.
pytestmark = pytest.mark.usefixtures("crossing_impl")

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"


def tagger(tag: str) -> Wat:
    """Appends its tag to x-chain on the request and x-chain-resp on the response."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-chain')} {w.s(tag)})) (i32.const 0)")
    w.on("proxy_on_response_headers",
         f"(drop (call $proxy_add_header_map_value (i32.const 2) {w.s('x-chain-resp')} {w.s(tag)})) (i32.const 0)")
    return w


def denier() -> Wat:
    w = Wat()
    hdrs = serialize([(b"x-denied-by", b"deny")])
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) {w.s('go away')} {w.s(hdrs)} (i32.const -1))) (i32.const 1)")
    return w


def looper() -> Wat:
    return Wat().on("proxy_on_request_headers", "(loop $l (br $l)) (i32.const 0)")


def config(tmp_path, up_port: int, modules: dict[str, Wat], routes: list[dict], **filter_kw) -> str:
    filters = []
    for name, w in modules.items():
        (tmp_path / f"{name}.wat").write_text(w.render())
        entry = {"name": name, "wasm": f"{name}.wat", "limits": {"callback_ms": 50}}
        entry.update(filter_kw.get(name, {}))
        filters.append(entry)
    return json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": routes,
        "filters": filters,
    })


async def test_chain_order_local_reply_and_isolation_over_http(tmp_path):
    modules = {"a": tagger("a"), "b": tagger("b"), "c": tagger("c"), "deny": denier(), "loop": looper()}
    routes = [
        {"name": "chain", "match": {"prefix": "/chain"}, "cluster": "backend", "filters": ["a", "b", "c"]},
        {"name": "deny", "match": {"prefix": "/deny"}, "cluster": "backend", "filters": ["a", "deny", "c"]},
        {"name": "loop", "match": {"prefix": "/loop"}, "cluster": "backend", "filters": ["loop"]},
        {"name": "open", "match": {"prefix": "/open"}, "cluster": "backend", "filters": ["loop", "a"]},
    ]
    async with echo_upstream() as up:
        yaml_text = config(tmp_path, up.port, modules, routes)
        async with run_gateway(yaml_text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/chain")) as r:
                    assert r.status == 200
                    # request in YAML order, response in reverse
                    assert r.headers.getall("x-chain-resp") == ["c", "b", "a"]
                    echoed = await r.json()
                assert [v for k, v in echoed["headers"] if k.lower() == "x-chain"] == ["a", "b", "c"]

                seen = len(up.requests)
                async with s.get(gw.url("/deny")) as r:
                    assert r.status == 403 and await r.read() == b"go away"
                    assert r.headers["x-denied-by"] == "deny"
                    # filters that saw the request see the local reply's response headers
                    assert r.headers.getall("x-chain-resp") == ["a"]
                assert len(up.requests) == seen          # the upstream was never called

                # A looping filter fails closed with 503 while other routes keep answering.
                async def get(path):
                    async with s.get(gw.url(path)) as r:
                        await r.read()
                        return r.status
                statuses = await asyncio.gather(get("/loop"), *[get("/chain") for _ in range(10)])
                assert statuses[0] == 503 and statuses[1:] == [200] * 10

            async with aiohttp.ClientSession() as s:
                async with s.get(gw.admin_url + "/metrics") as r:
                    text = await r.text()
            assert prom_value(text, "wasmgate_filter_failures_total",
                              filter="loop", callback="proxy_on_request_headers", kind="deadline") == 1


def prom_value(text: str, name: str, **labels: str) -> float | None:
    """Value of the sample `name` with exactly these labels (any order) in a Prometheus text."""
    for line in text.splitlines():
        m = re.fullmatch(r'([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)', line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return None


async def test_fail_open_over_http(tmp_path):
    modules = {"loop": looper(), "a": tagger("a")}
    routes = [{"name": "open", "match": {"prefix": "/"}, "cluster": "backend", "filters": ["loop", "a"]}]
    async with echo_upstream() as up:
        yaml_text = config(tmp_path, up.port, modules, routes, loop={"failure_policy": "fail_open"})
        async with run_gateway(yaml_text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/x")) as r:
                    assert r.status == 200
                    assert r.headers.getall("x-chain-resp") == ["a"]


async def test_request_body_modified_by_filter_over_http(tmp_path):
    w = Wat()
    # Remove content-length in headers (body size changes), upper-case marker on the last chunk.
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_remove_header_map_value (i32.const 0) {w.s('content-length')})) (i32.const 0)")
    w.on("proxy_on_request_body",
         "(if (i32.eqz (local.get $c)) (then (return (i32.const 1))))"
         f"(drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) {w.s('|tail')})) (i32.const 0)")
    routes = [{"name": "r", "match": {"prefix": "/"}, "cluster": "backend", "filters": ["body"]}]
    async with echo_upstream() as up:
        async with run_gateway(config(tmp_path, up.port, {"body": w}, routes), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url("/p"), data=b"x" * 5000) as r:
                    assert r.status == 200
                    assert (await r.json())["body_length"] == 5005
            assert up.requests[-1].body == b"x" * 5000 + b"|tail"
