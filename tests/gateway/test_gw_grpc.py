"""gRPC callouts end to end: YAML `protocol: grpc` clusters (h2c and TLS), a filter pausing a
request on a gRPC call and resuming or rejecting it on the answer, config errors, and gRPC local
replies answered as Envoy does for gRPC and non-gRPC requests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme

from abi.pairs import serialize
from gateway.config import ConfigError, load_config
from tests.grpc_server import grpc_server
from tests.helpers import echo_upstream, run_gateway

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "abi"))
from abi_wat import OUT, Wat  # noqa: E402

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"
CTX, TOKEN = OUT + 16, OUT + 12
EFFECTIVE = f"(drop (call $proxy_set_effective_context (i32.load (i32.const {CTX}))))"


def authz_filter() -> str:
    """Kuadrant-shim-like: ask t.Svc/Check with the x-user header, Pause; allow (add a header,
    resume) on the answer, 403 on an error status."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {CTX}) (local.get $a))"
         f"(drop (call $proxy_get_header_map_value (i32.const 0) {w.s('x-user')} {O}))"
         f"(drop (call $proxy_grpc_call {w.s('authz')} {w.s('t.Svc')} {w.s('Check')} {w.s(serialize([]))} "
         f"(i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})) (i32.const 2000) (i32.const {TOKEN})))"
         " (i32.const 1)")
    w.on("proxy_on_grpc_receive",
         EFFECTIVE
         + f"(drop (call $proxy_get_buffer_bytes (i32.const 5) (i32.const 0) (i32.const -1) {O}))"
         + f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-verdict')} "
           f"(i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4}))))"
         + "(drop (call $proxy_continue_stream (i32.const 0)))")
    w.on("proxy_on_grpc_close",
         EFFECTIVE
         + f"(drop (call $proxy_get_status (i32.const {OUT + 8}) {O}))"
         + f"(drop (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) "
           f"(i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})) (i32.const 0) (i32.const 0) (i32.const -1)))")
    return w.render()


def grpc_reply_filter() -> str:
    """Rust send_grpc_response(PERMISSION_DENIED, Some("nope"), []): code 200, message as body."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_send_local_response (i32.const 200) (i32.const 0) (i32.const 0) "
         f"{w.s('nope')} (i32.const 0) (i32.const 0) (i32.const 7))) (i32.const 1)")
    return w.render()


def config(tmp_path: Path, up_port: int, authz: dict) -> str:
    (tmp_path / "authz.wat").write_text(authz_filter())
    (tmp_path / "reply.wat").write_text(grpc_reply_filter())
    return json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]},
                     {"name": "authz", "protocol": "grpc", **authz}],
        "filters": [{"name": "authz", "wasm": "authz.wat"}, {"name": "reply", "wasm": "reply.wat"}],
        "routes": [{"name": "reply", "match": {"prefix": "/reply"}, "cluster": "backend", "filters": ["reply"]},
                   {"name": "all", "cluster": "backend", "filters": ["authz"]}],
    })


async def check_authz(gw, up, grpc) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url("/x"), headers={"x-user": "alice"}) as r:
            assert r.status == 200
        async with s.get(gw.url("/x"), headers={"x-user": "bob"}) as r:
            assert (r.status, await r.read()) == (403, b"who?")
    assert up.requests[-1].header("x-verdict") == "allow"
    assert len(up.requests) == 1                       # bob never reached the upstream
    assert [(m, req) for m, req, _ in grpc.seen] == [("Check", b"alice"), ("Check", b"bob")]


async def test_filter_pauses_on_grpc_call_and_resumes_or_rejects(tmp_path):
    async with grpc_server() as (port, grpc), echo_upstream() as up:
        text = config(tmp_path, up.port, {"endpoints": [f"127.0.0.1:{port}"]})
        async with run_gateway(text, tmp_path) as gw:
            await check_authz(gw, up, grpc)
            async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
                metrics = await r.text()
    assert 'wasmgate_grpc_callouts_total{cluster="authz",code="OK"} 1' in metrics
    assert 'wasmgate_grpc_callouts_total{cluster="authz",code="PERMISSION_DENIED"} 1' in metrics


async def test_grpc_cluster_over_tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("authz.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = {"key": cert.private_key_pem.bytes(), "cert": cert.cert_chain_pems[0].bytes()}
    async with grpc_server(**tls) as (port, grpc), echo_upstream() as up:
        text = config(tmp_path, up.port, {"endpoints": [f"127.0.0.1:{port}"],
                                          "tls": {"ca": "ca.pem", "sni": "authz.test"}})
        async with run_gateway(text, tmp_path) as gw:
            await check_authz(gw, up, grpc)


async def test_grpc_local_reply_for_grpc_and_plain_requests(tmp_path):
    async with echo_upstream() as up:
        text = config(tmp_path, up.port, {"endpoints": ["127.0.0.1:1"]})
        async with run_gateway(text, tmp_path) as gw, aiohttp.ClientSession() as s:
            # Envoy sendLocalReply: grpc-status / grpc-message only for a gRPC request...
            async with s.post(gw.url("/reply"), headers={"content-type": "application/grpc"}) as r:
                assert (r.status, r.headers["grpc-status"], r.headers["grpc-message"]) == (200, "7", "nope")
                assert await r.read() == b""
            # ...any other request gets the plain HTTP reply: the code and body as given.
            async with s.get(gw.url("/reply")) as r:
                assert (r.status, await r.read()) == (200, b"nope")
                assert "grpc-status" not in r.headers and "grpc-message" not in r.headers
                assert r.headers["content-type"] == "text/plain"
    assert up.requests == []


@pytest.mark.parametrize("cluster, route_cluster, message", [
    ({"protocol": "h3"}, "backend", 'clusters[1].protocol: must be http1 or grpc, got "h3"'),
    ({"protocol": "grpc"}, "authz", 'routes[0].cluster: "authz" is a grpc cluster (protocol: grpc)'),
    ({"protocol": "grpc", "tls": {"verify": False}}, "backend",
     "clusters[1].tls.verify: verify: false is not supported with protocol: grpc"),
    ({"protocol": "grpc", "endpoints": ["a.test:1", "b.test:1"]}, "backend",
     "clusters[1].endpoints: a grpc cluster with more than one endpoint needs IP addresses"),
])
def test_config_errors(tmp_path, cluster, route_cluster, message):
    doc = {"listeners": [{"name": "main", "port": 0}],
           "clusters": [{"name": "backend", "endpoints": ["127.0.0.1:1"]},
                        {"name": "authz", "endpoints": ["127.0.0.1:2"], **cluster}],
           "routes": [{"name": "r", "cluster": route_cluster}]}
    p = tmp_path / "config.yaml"
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert any(message in e for e in info.value.errors), info.value.errors
