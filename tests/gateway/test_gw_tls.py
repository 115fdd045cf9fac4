"""TLS listeners with real clients and real handshakes: SNI picks the certificate, old protocol
versions are refused, client certificates are verified and visible to filters, certificates
rotate by reload under a request in flight, and garbage or a stalled handshake costs nothing."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest
from aiohttp import web

from gateway.reload import reload_gateway
from tests.helpers import echo_upstream, run_cli_gateway, run_gateway, split_responses

ROOT = Path(__file__).resolve().parents[2]
HEADERS_WASM = ROOT / "filters" / "dist" / "headers.wasm"


def tls_yaml(up_port: int, tls: str, *, filters: str = "", route_filters: str = "") -> str:
    """A plain listener and a TLS one ("main", with the given `tls:` flow mapping) on one route."""
    return (
        "listeners:\n"
        "  - {name: plain, address: 127.0.0.1, port: 0}\n"
        f"  - {{name: main, address: 127.0.0.1, port: 0, tls: {tls}}}\n"
        "admin: {address: 127.0.0.1, port: 0}\n"
        "access_log: {path: null}\n"
        f"clusters: [{{name: backend, endpoints: [\"127.0.0.1:{up_port}\"]}}]\n"
        f"routes: [{{name: all, cluster: backend{route_filters}}}]\n" + filters
    )


def default_tls(pki) -> str:
    return (f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}, certificates: ["
            f"{{server_names: [a.test], cert: {pki.path('a.pem')}, key: {pki.path('a.key')}}}, "
            f"{{server_names: ['*.b.test'], cert: {pki.path('b.pem')}, key: {pki.path('b.key')}}}]}}")


async def https_get(port: int, path: str, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1",
                    headers: dict[str, str] | None = None) -> tuple[int, dict, bytes, bytes]:
    """One request on a new TLS connection: (status, headers, body, DER of the served certificate)."""
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname)
        try:
            lines = [f"GET {path} HTTP/1.1", f"host: {server_hostname}", "connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            raw = await reader.read(-1)
            der = writer.get_extra_info("ssl_object").getpeercert(True)
        finally:
            writer.close()
    if not raw:     # TLS 1.3: the client's handshake is done before the server refuses it
        raise ConnectionResetError("closed without a response")
    status, hdrs, body = split_responses(raw)[0]
    return status, hdrs, body, der


def echoed(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


async def test_sni_chooses_the_certificate_and_plain_listener_works_beside(tmp_path, pki, upstream):
    async with run_gateway(tls_yaml(upstream.port, default_tls(pki)), tmp_path) as gw:
        port = gw.port("main")
        status, _, body, der = await https_get(port, "/x", pki.client(), "a.test")
        assert status == 200 and der == pki.der("a")
        assert echoed(body)["x-forwarded-proto"] == "https"
        _, _, _, der = await https_get(port, "/x", pki.client(), "api.b.test")     # *.b.test
        assert der == pki.der("b")
        _, _, _, der = await https_get(port, "/x", pki.client(), "127.0.0.1")      # an IP: no SNI
        assert der == pki.der("default")
        # A name no certificate lists gets the default one (the client then refuses it).
        with pytest.raises(ssl.SSLCertVerificationError):
            await https_get(port, "/x", pki.client(), "other.test")
        # The plain listener beside it: same routes, X-Forwarded-Proto http.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("plain"))
        writer.write(b"GET /p HTTP/1.1\r\nhost: x\r\nx-forwarded-proto: https\r\nconnection: close\r\n\r\n")
        status, _, body = split_responses(await reader.read(-1))[0]
        writer.close()
        assert status == 200 and echoed(body)["x-forwarded-proto"] == "https, http"
        # Two keep-alive requests on one TLS connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client(), server_hostname="a.test")
        for i in range(2):
            writer.write(f"GET /k{i} HTTP/1.1\r\nhost: a.test\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            assert head.startswith(b"HTTP/1.1 200") and json.loads(await reader.readexactly(length))["path"] == f"/k{i}"
        writer.close()


def old_client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():          # "ssl.TLSVersion.TLSv1 is deprecated": that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
    ctx.set_ciphers("ALL:@SECLEVEL=0")        # let this OpenSSL offer TLS 1.0/1.1 at all
    return ctx


async def test_tls_10_and_11_refused_12_and_13_served(tmp_path, pki, upstream, caplog):
    caplog.set_level(logging.DEBUG, logger="wasmgate")
    tls = f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}"
    async with run_gateway(tls_yaml(upstream.port, tls), tmp_path) as gw:
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            # asyncio drops the connection without flushing OpenSSL's alert: a reset, client side.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await https_get(gw.port("main"), "/", old_client(version))
        assert gw.gateway.metrics.errors["tls_handshake"] == 2
        refused = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
        assert refused == ['listener "main": TLS handshake failed: unsupported protocol'] * 2
        for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            ctx = pki.client()
            ctx.minimum_version = ctx.maximum_version = version
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("main"), ssl=ctx,
                                                           server_hostname="127.0.0.1")
            assert writer.get_extra_info("ssl_object").version() == name
            writer.close()
    # min_version: TLSv1.3 refuses a TLS 1.2 client.
    tls = f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}, min_version: TLSv1.3}}"
    async with run_gateway(tls_yaml(upstream.port, tls), tmp_path) as gw:
        ctx = pki.client()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https_get(gw.port("main"), "/", ctx)


def mtls_yaml(pki, up_port: int, require: bool) -> str:
    tls = (f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}, "
           f"client_ca: {pki.path('client_ca.pem')}, require_client_cert: {str(require).lower()}}}")
    properties = {"x-peer-subject": "connection.subject_peer_certificate", "x-mtls": "connection.mtls",
                  "x-tls-version": "connection.tls_version", "x-sni": "connection.requested_server_name",
                  "x-scheme": "request.scheme", "x-local-subject": "connection.subject_local_certificate",
                  "x-peer-dns-san": "connection.dns_san_peer_certificate"}
    config = {"request": {"set": {h: "${" + p + "}" for h, p in properties.items()}}}
    filters = f"filters: [{{name: hdr, wasm: {HEADERS_WASM}, config: {json.dumps(config)}}}]\n"
    return tls_yaml(up_port, tls, filters=filters, route_filters=", filters: [hdr]")


async def test_mtls_required_subject_visible_to_a_filter(tmp_path, pki, upstream):
    async with run_gateway(mtls_yaml(pki, upstream.port, require=True), tmp_path) as gw:
        port = gw.port("main")
        status, _, body, _ = await https_get(port, "/who", pki.client(cert="alice"), "localhost")
        seen = echoed(body)
        assert status == 200
        # RFC 2253, most specific first, specials escaped: what Envoy (and openssl -nameopt RFC2253) print.
        assert seen["x-peer-subject"] == r"CN=alice,OU=payments\+ops,O=Example\, Inc."
        assert seen["x-mtls"] == "true" and seen["x-tls-version"] == "TLSv1.3"
        assert seen["x-sni"] == "localhost" and seen["x-scheme"] == "https"
        assert seen["x-peer-dns-san"] == "alice.test"
        assert seen["x-local-subject"].startswith("CN=gateway-default,")
        # No certificate, or one from a CA that is not client_ca: refused in the handshake.
        for ctx in (pki.client(), pki.client(cert="mallory")):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await https_get(port, "/who", ctx, "localhost")
        assert gw.gateway.metrics.errors["tls_handshake"] == 2
        assert not [r for r in upstream.requests if r.path == "/who"][1:]    # only alice got through


async def test_mtls_optional(tmp_path, pki, upstream):
    async with run_gateway(mtls_yaml(pki, upstream.port, require=False), tmp_path) as gw:
        status, _, body, _ = await https_get(gw.port("main"), "/", pki.client())      # no client cert
        assert status == 200 and echoed(body)["x-mtls"] == "false"
        assert "x-peer-subject" not in echoed(body)                    # renders empty: not set
        status, _, body, _ = await https_get(gw.port("main"), "/", pki.client(cert="alice"))
        assert echoed(body)["x-mtls"] == "true"
        with pytest.raises((ssl.SSLError, ConnectionError)):          # presented, so verified
            await https_get(gw.port("main"), "/", pki.client(cert="mallory"))
        # On the plain listener the same filter sees mtls false and no TLS version.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("plain"))
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        _, _, body = split_responses(await reader.read(-1))[0]
        writer.close()
        seen = echoed(body)
        assert seen["x-mtls"] == "false" and seen["x-scheme"] == "http" and "x-tls-version" not in seen


async def test_certificate_rotation_by_reload_keeps_a_request_in_flight(tmp_path, pki):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(pki.path("a.pem")).read_bytes())
    key.write_bytes(Path(pki.path("a.key")).read_bytes())
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/slow":
            arrived.set()
            await release.wait()
        return web.Response(text=request.path)

    async with echo_upstream(slow) as up:
        async with run_gateway(tls_yaml(up.port, f"{{cert: {cert}, key: {key}}}"), tmp_path) as gw:
            port = gw.port("main")
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client(),
                                                           server_hostname="a.test")
            writer.write(b"GET /slow HTTP/1.1\r\nhost: a.test\r\n\r\n")
            await asyncio.wait_for(arrived.wait(), 20)
            # New files (a wildcard certificate) under the same names, then a reload.
            cert.write_bytes(Path(pki.path("b.pem")).read_bytes())
            key.write_bytes(Path(pki.path("b.key")).read_bytes())
            result = await reload_gateway(gw.gateway)
            assert result.ok and "tls reloaded for new connections: listener main" in result.changes
            _, _, _, der = await https_get(port, "/new", pki.client(), "x.b.test")
            assert der == pki.der("b")                                   # new connections: new cert
            release.set()
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"/slow"
                # The old connection keeps its certificate and carries another request.
                assert writer.get_extra_info("ssl_object").getpeercert(True) == pki.der("a")
                writer.write(b"GET /again HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n")
                status, _, body = split_responses(await reader.read(-1))[0]
            writer.close()
            assert status == 200 and body == b"/again"
            # A reload with a key that no longer matches is refused; the running certificate stays.
            key.write_bytes(Path(pki.path("a.key")).read_bytes())
            result = await reload_gateway(gw.gateway)
            assert not result.ok and "does not match the certificate" in result.errors[0]
            _, _, _, der = await https_get(port, "/still", pki.client(), "x.b.test")
            assert der == pki.der("b")


async def test_garbage_instead_of_client_hello(tmp_path, pki, upstream):
    tls = f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}"
    async with run_gateway(tls_yaml(upstream.port, tls), tmp_path) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("main"))
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")            # plain HTTP to the TLS port
        async with asyncio.timeout(20):
            data = await reader.read(-1)
        writer.close()
        assert not data.startswith(b"HTTP/")                          # closed, nothing served
        assert gw.gateway.metrics.errors["tls_handshake"] == 1
        status, _, _, _ = await https_get(gw.port("main"), "/", pki.client())
        assert status == 200 and not upstream.requests[:-1]


async def test_a_handshake_that_never_finishes_times_out(tmp_path, pki, upstream):
    tls = f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}, handshake_timeout_s: 0.5}}"
    async with run_gateway(tls_yaml(upstream.port, tls), tmp_path) as gw:
        for opening in (b"", b"\x16\x03\x01\x02\x00\x01"):      # silence; a record header, then silence
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("main"))
            t0 = time.monotonic()
            writer.write(opening)
            async with asyncio.timeout(20):
                data = await reader.read(-1)
            elapsed = time.monotonic() - t0
            writer.close()
            assert data == b"" and elapsed >= 0.45               # closed by the timeout, not at once
        status, _, _, _ = await https_get(gw.port("main"), "/", pki.client())
        assert status == 200


async def test_under_uvloop_tls_both_ways(tmp_path, pki):
    """`wasmgate run` (uvloop): SNI, a client certificate seen by a filter, and an HTTPS upstream."""
    async with echo_upstream(ssl_context=pki.server("default")) as up:
        yaml_text = mtls_yaml(pki, up.port, require=False).replace(
            f'clusters: [{{name: backend, endpoints: ["127.0.0.1:{up.port}"]}}]',
            f'clusters: [{{name: backend, endpoints: ["127.0.0.1:{up.port}"], tls: {{ca: {pki.path("ca.pem")}}}}}]')
        yaml_text = yaml_text.replace(f"key: {pki.path('default.key')}, ", f"key: {pki.path('default.key')}, "
                                      f"certificates: [{{server_names: [a.test], cert: {pki.path('a.pem')}, "
                                      f"key: {pki.path('a.key')}}}], ")
        (tmp_path / "config.yaml").write_text(yaml_text)
        async with run_cli_gateway(tmp_path / "config.yaml") as gw:
            assert any("listener main on https://" in line for line in gw.output)
            status, _, body, der = await https_get(gw.ports["main"], "/u", pki.client(cert="alice"), "a.test")
            assert status == 200 and der == pki.der("a")
            seen = echoed(body)
            assert seen["x-peer-subject"] == r"CN=alice,OU=payments\+ops,O=Example\, Inc."
            assert seen["x-sni"] == "a.test" and seen["x-forwarded-proto"] == "https"
            assert up.requests[-1].path == "/u"


async def test_stop_does_not_wait_out_the_drain_for_an_idle_tls_client(tmp_path, pki, upstream, caplog):
    """A pooled client idle on a keep-alive TLS connection never answers close_notify; stop must
    not hold the drain for it (nor call it a request in flight)."""
    from gateway.config import load_config
    from gateway.server import Gateway
    (tmp_path / "config.yaml").write_text(
        tls_yaml(upstream.port, f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}"))
    gw = await Gateway.start(load_config(tmp_path / "config.yaml"))
    port = gw.listener_ports["main"]

    def idle_client():                           # a blocking client: one request, then no reads
        sock = pki.client().wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                        server_hostname="127.0.0.1")
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"
        return sock

    sock = await asyncio.to_thread(idle_client)
    try:
        t0 = time.monotonic()
        await gw.stop(drain_timeout_s=30)
        assert time.monotonic() - t0 < 15                    # the grace (1 s), not the 30 s drain
        assert not [r for r in caplog.records if "in flight" in r.getMessage()]
    finally:
        sock.close()


async def test_error_replies_reach_a_tls_client_still_sending(tmp_path, pki, upstream):
    """431 and 413 while the client is still sending: the reply arrives (read-and-drop over TLS)."""
    tls = f"{{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}"
    text = tls_yaml(upstream.port, tls) + "limits: {max_header_bytes: 4096, max_request_body_bytes: 1000}\n"
    async with run_gateway(text, tmp_path) as gw:
        for status, data in ((431, b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n"),
                             (413, b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5000000\r\n\r\n"
                                   + b"x" * 2_000_000)):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port("main"), ssl=pki.client(),
                                                           server_hostname="127.0.0.1")
            writer.write(data)
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            assert head.startswith(f"HTTP/1.1 {status} ".encode())
