"""What a client may not decide: headers only the gateway sets, its request id, a bad Host; a
head in bare LFs is answered at once; credentials in the query never reach the access log."""
from __future__ import annotations

import asyncio
import json

from tests.gateway.conftest import basic_yaml
from tests.helpers import raw_exchange, run_gateway, split_responses


async def _one(port: int, head: bytes) -> tuple[int, dict, bytes]:
    raw = await raw_exchange(port, head)
    (status, headers, body), = split_responses(raw)
    return status, headers, body


async def test_a_client_cannot_send_the_identity_header(upstream, tmp_path):
    # x-auth-identity is trustworthy at the backend only because no client can set it.
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        status, _, _ = await _one(gw.port(), b"GET /a HTTP/1.1\r\nHost: h\r\nX-Auth-Identity: admin\r\n"
                                             b"x-auth-identity: root\r\nConnection: close\r\n\r\n")
        assert status == 200
        assert upstream.requests[-1].header("x-auth-identity") is None


async def test_internal_headers_are_configurable(upstream, tmp_path):
    extra = "internal_headers: [x-user, x-role]\n"
    async with run_gateway(basic_yaml(upstream.port, extra=extra), tmp_path) as gw:
        await _one(gw.port(), b"GET /a HTTP/1.1\r\nHost: h\r\nx-user: u\r\nx-role: r\r\n"
                              b"x-auth-identity: i\r\nConnection: close\r\n\r\n")
        seen = upstream.requests[-1]
        assert seen.header("x-user") is None and seen.header("x-role") is None
        assert seen.header("x-auth-identity") == "i"         # the list replaces the default


async def test_a_forged_request_id_is_replaced(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        for rid, kept in [("abc-123.x:y_z", True), ("a" * 128, True), ("a" * 129, False),
                          ("has space", False), ("inject\"quote", False), ("ünï", False), ("", False)]:
            head = f"GET /a HTTP/1.1\r\nHost: h\r\nx-request-id: {rid}\r\nConnection: close\r\n\r\n"
            status, headers, _ = await _one(gw.port(), head.encode("utf-8"))
            assert status == 200
            got = [v for k, v in upstream.requests[-1].headers if k.lower() == "x-request-id"]
            assert len(got) == 1
            if kept:
                assert got[0] == rid
            else:
                assert got[0] != rid and len(got[0]) == 32 and int(got[0], 16) >= 0
        # Two ids: neither is trusted.
        await _one(gw.port(), b"GET /a HTTP/1.1\r\nHost: h\r\nx-request-id: one\r\nx-request-id: two\r\n"
                              b"Connection: close\r\n\r\n")
        got = [v for k, v in upstream.requests[-1].headers if k.lower() == "x-request-id"]
        assert len(got) == 1 and got[0] not in ("one", "two")


async def test_bad_host_headers_are_refused(upstream, tmp_path):
    bad = [
        b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",                                  # missing
        b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",            # two
        b"GET /a HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",                     # space
        b"GET /a HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: user@a\r\nConnection: close\r\n\r\n",                  # userinfo
        b"GET /a HTTP/1.1\r\nHost: a:99999x\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a..b\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",                        # empty
        b"GET http://user@a/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",         # absolute form
        b"GET http://a b/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ]
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        for head in bad:
            raw = await raw_exchange(gw.port(), head)
            assert raw.startswith(b"HTTP/1.1 400"), (head, raw[:80])
        assert upstream.requests == []
        good = [(b"Host: example.com:8080", "example.com:8080"), (b"Host: [::1]:80", "[::1]:80"),
                (b"Host: 10.0.0.1", "10.0.0.1")]
        for line, want in good:
            status, _, _ = await _one(gw.port(), b"GET /a HTTP/1.1\r\n" + line + b"\r\nConnection: close\r\n\r\n")
            assert status == 200 and upstream.requests[-1].header("host") == want
        # Absolute form: its authority becomes Host.
        status, _, _ = await _one(gw.port(), b"GET http://other.example/x HTTP/1.1\r\nHost: a\r\n"
                                             b"Connection: close\r\n\r\n")
        assert status == 200 and upstream.requests[-1].header("host") == "other.example"


async def test_bare_lf_heads_are_answered_at_once(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        loop = asyncio.get_running_loop()
        for head in (b"GET / HTTP/1.1\nHost: h\n\n", b"GET / HTTP/1.1\r\nHost: h\n\r\n"):
            t0 = loop.time()
            raw = await raw_exchange(gw.port(), head, timeout=10)
            assert raw.startswith(b"HTTP/1.1 400"), raw[:80]
            assert loop.time() - t0 < 5        # not the header timeout, not the idle sweep
        assert upstream.requests == []


async def test_query_credentials_are_redacted_in_the_access_log(upstream, tmp_path):
    log = tmp_path / "access.log"
    yaml_text = basic_yaml(upstream.port).replace("access_log: {path: null}",
                                                  f"access_log: {{path: {json.dumps(str(log))}}}")
    async with run_gateway(yaml_text, tmp_path) as gw:
        await _one(gw.port(), b"GET /a?api_key=s3cret&x=1&access_token=t0ken HTTP/1.1\r\nHost: h\r\n"
                              b"Connection: close\r\n\r\n")
        assert upstream.requests[-1].path == "/a?api_key=s3cret&x=1&access_token=t0ken"   # forwarded as is
    text = log.read_text()
    assert "s3cret" not in text and "t0ken" not in text
    assert json.loads(text.splitlines()[-1])["path"] == "/a?api_key=[redacted]&x=1&access_token=[redacted]"


async def test_a_client_cannot_choose_a_route_by_an_internal_header(upstream, tmp_path):
    # Routes match on the headers as the filters and the upstream get them: a route on the
    # identity header must not be chosen by a value the client sent.
    routes = ("  - {name: admins, cluster: backend, match: {prefix: /, headers: {x-auth-identity: admin}},"
              " rewrite: {prefix: /admins/}}\n"
              "  - {name: all, cluster: backend}\n")
    async with run_gateway(basic_yaml(upstream.port, routes=routes), tmp_path) as gw:
        status, _, _ = await _one(gw.port(), b"GET /a HTTP/1.1\r\nHost: h\r\nx-auth-identity: admin\r\n"
                                             b"Connection: close\r\n\r\n")
        assert status == 200
        assert upstream.requests[-1].path == "/a"
