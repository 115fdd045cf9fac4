"""TLS to upstreams: an aiohttp HTTPS upstream with a test CA, verification failures as 502 with a
log line naming the cluster, endpoint and reason, SNI, client certificates, and http_call."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from aiohttp import web

from abi.api import CallFailed
from gateway.config import load_config
from gateway.reload import reload_gateway
from gateway.upstream import Upstreams
from tests.helpers import echo_upstream, run_gateway, split_responses


def cluster_yaml(up_port: int, tls: str) -> str:
    return (
        "listeners: [{name: main, address: 127.0.0.1, port: 0}]\n"
        "admin: {address: 127.0.0.1, port: 0}\n"
        "access_log: {path: null}\n"
        f"clusters: [{{name: secure, endpoints: [\"127.0.0.1:{up_port}\"], tls: {tls}}}]\n"
        "routes: [{name: all, cluster: secure}]\n"
    )


async def get(port: int, path: str) -> tuple[int, bytes]:
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        raw = await reader.read(-1)
        writer.close()
    status, _, body = split_responses(raw)[0]
    return status, body


async def test_https_upstream_verified_with_the_test_ca(tmp_path, pki):
    async with echo_upstream(ssl_context=pki.server("default")) as up:
        async with run_gateway(cluster_yaml(up.port, f"{{ca: {pki.path('ca.pem')}}}"), tmp_path) as gw:
            for i in range(3):                   # the pool reuses the TLS connection
                status, body = await get(gw.port(), f"/hello{i}")
                assert status == 200 and json.loads(body)["path"] == f"/hello{i}"
            assert len(up.requests) == 3


async def test_verification_failure_is_a_502_with_a_log_line(tmp_path, pki, caplog):
    ca = tmp_path / "upstream-ca.pem"
    shutil.copy(pki.path("client_ca.pem"), ca)           # the wrong CA: it did not sign the upstream
    async with echo_upstream(ssl_context=pki.server("default")) as up:
        async with run_gateway(cluster_yaml(up.port, f"{{ca: {ca}}}"), tmp_path) as gw:
            status, body = await get(gw.port(), "/x")
            assert status == 502 and b"upstream TLS handshake failed" in body
            line = (f'route "all": cluster "secure": TLS handshake with 127.0.0.1:{up.port} failed: '
                    f"certificate verify failed: unable to get local issuer certificate")
            assert line in [r.getMessage() for r in caplog.records]
            assert gw.gateway.metrics.errors["upstream_tls"] == 1 and not up.requests
            # The right CA under the same file name: a reload rebuilds the cluster's pool.
            shutil.copy(pki.path("ca.pem"), ca)
            result = await reload_gateway(gw.gateway)
            assert result.ok and "clusters new or changed: secure" in result.changes
            status, _ = await get(gw.port(), "/y")
            assert status == 200 and up.requests[-1].path == "/y"


async def test_sni_and_host_name_verification(tmp_path, pki):
    names: list[str | None] = []
    server = pki.server("upstream")                       # a certificate for upstream.test only
    server.sni_callback = lambda conn, name, ctx: names.append(name)
    async with echo_upstream(ssl_context=server) as up:
        tls = f"{{ca: {pki.path('ca.pem')}, sni: upstream.test}}"
        async with run_gateway(cluster_yaml(up.port, tls), tmp_path) as gw:
            assert (await get(gw.port(), "/"))[0] == 200
        assert names == ["upstream.test"]
        # Without sni the name verified is the endpoint's host, 127.0.0.1 (and no SNI is sent).
        async with run_gateway(cluster_yaml(up.port, f"{{ca: {pki.path('ca.pem')}}}"), tmp_path) as gw:
            assert (await get(gw.port(), "/"))[0] == 502
        assert names[1:] == [None]
        async with run_gateway(cluster_yaml(up.port, "{verify: false}"), tmp_path) as gw:
            assert (await get(gw.port(), "/"))[0] == 200            # nothing verified at all


async def test_client_certificate_to_the_upstream(tmp_path, pki):
    async def who(request: web.Request) -> web.Response:
        cert = request.transport.get_extra_info("peercert")
        return web.Response(text=dict(x[0] for x in cert["subject"])["commonName"])

    async with echo_upstream(who, ssl_context=pki.server("default", client_ca="client_ca")) as up:
        tls = f"{{ca: {pki.path('ca.pem')}, cert: {pki.path('alice.pem')}, key: {pki.path('alice.key')}}}"
        async with run_gateway(cluster_yaml(up.port, tls), tmp_path) as gw:
            assert await get(gw.port(), "/") == (200, b"alice")
        async with run_gateway(cluster_yaml(up.port, f"{{ca: {pki.path('ca.pem')}}}"), tmp_path) as gw:
            assert (await get(gw.port(), "/"))[0] == 502          # the upstream wants a certificate


async def test_http_call_to_a_tls_cluster(tmp_path, pki):
    async with echo_upstream(ssl_context=pki.server("default")) as up:
        (tmp_path / "config.yaml").write_text(
            "listeners: [{name: main, port: 0}]\n"
            "clusters:\n"
            f"  - {{name: secure, endpoints: [\"127.0.0.1:{up.port}\"], tls: {{ca: {pki.path('ca.pem')}}}}}\n"
            f"  - {{name: untrusted, endpoints: [\"127.0.0.1:{up.port}\"], tls: {{}}}}\n"  # system CAs
            "routes: [{name: all, cluster: secure}]\n")
        ups = Upstreams(load_config(tmp_path / "config.yaml").clusters)
        try:
            resp = await ups.http_call("secure", "GET", "/callout", "x", [], b"", 10)
            assert resp.status == 200 and json.loads(resp.body)["path"] == "/callout"
            with pytest.raises(CallFailed) as e:
                await ups.http_call("untrusted", "GET", "/callout", "x", [], b"", 10)
            assert e.value.reason == (f'cluster "untrusted": TLS handshake with 127.0.0.1:{up.port} failed: '
                                      "certificate verify failed: unable to get local issuer certificate")
        finally:
            ups.close()
