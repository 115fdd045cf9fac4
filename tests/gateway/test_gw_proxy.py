"""Proxying behaviour: headers, framing, keep-alive, and every client/upstream error path."""
import asyncio
import re

import aiohttp
import pytest

from tests.gateway.conftest import basic_yaml
from tests.helpers import (echo_upstream, raw_exchange, raw_upstream, read_chunked_rest, read_request_head,
                           run_gateway, split_responses)


async def get_json(url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers, await r.json()


def hdr(pairs, name):
    vals = [v for k, v in pairs if k.lower() == name]
    return vals[0] if len(vals) == 1 else (vals or None)


async def test_forwarded_headers_request_id_and_host(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        status, _, echo = await get_json(gw.url("/a/b?q=1"), headers={"Host": "shop.example:8080"})
        assert status == 200
        assert echo["path"] == "/a/b?q=1"
        h = echo["headers"]
        assert hdr(h, "host") == "shop.example:8080"
        assert hdr(h, "x-forwarded-for") == "127.0.0.1"
        assert hdr(h, "x-forwarded-proto") == "http"
        assert hdr(h, "x-forwarded-host") == "shop.example:8080"
        assert re.fullmatch(r"[0-9a-f]{32}", hdr(h, "x-request-id"))

        status, _, echo = await get_json(gw.url("/"), headers={
            "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https", "X-Request-Id": "abc-123"})
        h = echo["headers"]
        assert hdr(h, "x-forwarded-for") == "10.0.0.1, 127.0.0.1"
        assert hdr(h, "x-forwarded-proto") == "https, http"
        assert hdr(h, "x-request-id") == "abc-123"


async def test_hop_by_hop_headers_removed_both_ways(tmp_path):
    seen = []

    async def handler(reader, writer):
        seen.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-resp-hop\r\nX-Resp-Hop: 1\r\n"
                     b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), (
                b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\n"
                b"TE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\nTrailer: x\r\n"
                b"X-Normal: 1\r\n\r\n"), timeout=1)
    head = seen[0].lower()
    for name in (b"x-hop", b"keep-alive", b"te:", b"upgrade", b"proxy-connection", b"trailer", b"connection"):
        assert name not in head, name
    assert b"x-normal: 1" in head
    (status, headers, body), = split_responses(raw)
    assert status == 200 and body == b"ok"
    assert "x-resp-hop" not in headers and "keep-alive" not in headers
    assert headers["x-kept"] == "yes"


async def test_keepalive_reuses_upstream_connection_and_pipelining(tmp_path):
    conns = []

    async def handler(reader, writer):
        conns.append(writer)
        while head := await read_request_head(reader):
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
                                     b"GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert [b for _, _, b in split_responses(raw)] == [b"/1", b"/2", b"/3"]
            async with aiohttp.ClientSession() as s:
                for i in range(5):
                    async with s.get(gw.url(f"/k{i}")) as r:
                        assert await r.read() == f"/k{i}".encode()
    assert len(conns) == 1


async def test_stale_keepalive_connection_is_retried(tmp_path):
    count = 0

    async def handler(reader, writer):
        nonlocal count
        count += 1
        await read_request_head(reader)
        # Answers as keep-alive, then closes: the next request finds a dead pooled connection.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.get(gw.url("/")) as r:
                        assert r.status == 200 and await r.read() == b"ok"
                        await asyncio.sleep(0.05)
    assert count == 3


async def test_chunked_request_and_response_bodies(tmp_path):
    got = {}

    async def handler(reader, writer):
        head = await read_request_head(reader)
        got["head"] = head.lower()
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        got["body"] = body
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                     b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()

    async def gen():
        for part in (b"abc", b"defg", b"h" * 10000):
            yield part

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url("/up"), data=gen()) as r:
                    assert r.status == 200
                    assert r.headers.get("Transfer-Encoding") == "chunked"
                    assert await r.read() == b"hello world"
    assert b"transfer-encoding: chunked" in got["head"] and b"content-length" not in got["head"]
    assert got["body"] == b"abcdefg" + b"h" * 10000


async def test_head_request_keeps_content_length_without_body(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        raw = await raw_exchange(gw.port(), b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n"
                                 b"Connection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert int(re.search(rb"content-length: (\d+)", head.lower()).group(1)) > 0
    # The next response starts right after the HEAD response's head: no body was sent.
    assert rest.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].method == "HEAD"


async def test_expect_100_continue(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        # Too large: refused without asking for the body.
        raw = await raw_exchange(gw.port(), b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999999\r\n"
                                 b"Expect: 100-continue\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 413")
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("expect") is None
    assert len(upstream.requests) == 1


async def test_upstream_interim_responses_are_skipped(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert split_responses(raw)[0][0] == 201 and split_responses(raw)[0][2] == b"x"


async def test_http10_client_gets_close_delimited_response(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"abc"


# -- error paths --------------------------------------------------------------------------------

async def test_no_route_is_404_with_short_body(upstream, tmp_path):
    routes = "  - {name: api, match: {prefix: /api}, cluster: backend}\n"
    async with run_gateway(basic_yaml(upstream.port, routes=routes), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url("/other")) as r:
                body = await r.text()
                assert r.status == 404 and "no route" in body and len(body) < 200
            async with s.get(gw.url("/api/x")) as r:      # keep-alive survives the 404
                assert r.status == 200
    assert [r.path for r in upstream.requests] == ["/api/x"]


async def test_refused_upstream_is_502_and_endpoint_ejected(upstream, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    text = f"""\
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
admin: {{address: 127.0.0.1, port: 0}}
access_log: {{path: null}}
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:{dead}"]}}
  - {{name: mixed, endpoints: ["127.0.0.1:{dead}", "127.0.0.1:{upstream.port}"], eject_ms: 60000}}
routes:
  - {{name: two, match: {{prefix: /two}}, cluster: mixed}}
  - {{name: all, cluster: backend}}
"""
    async with run_gateway(text, tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url("/x")) as r:
                body = await r.text()
                assert r.status == 502 and "upstream unreachable" in body and "Traceback" not in body
            # Round robin with one dead endpoint: every request still succeeds.
            for _ in range(4):
                async with s.get(gw.url("/two")) as r:
                    assert r.status == 200
            async with s.get(gw.admin_url + "/metrics") as r:
                metrics = await r.text()
    assert f'wasmgate_upstream_endpoint_ejected{{cluster="mixed",endpoint="127.0.0.1:{dead}"}} 1' in metrics
    assert 'wasmgate_errors_total{kind="upstream_refused"} 1' in metrics
    assert len(upstream.requests) == 4


async def test_round_robin_across_endpoints(tmp_path):
    async with echo_upstream() as a, echo_upstream() as b:
        text = basic_yaml(a.port).replace(f'"127.0.0.1:{a.port}"', f'"127.0.0.1:{a.port}", "127.0.0.1:{b.port}"')
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                for _ in range(6):
                    async with s.get(gw.url("/")) as r:
                        assert r.status == 200
    assert len(a.requests) == 3 and len(b.requests) == 3


async def test_upstream_timeout_is_504(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        await asyncio.sleep(5)

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port, cluster_extra=", request_timeout_ms: 200"), tmp_path) as gw:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            status, _, _ = (await get_status(gw.url("/slow")))
            assert status == 504
            assert loop.time() - t0 < 2


async def get_status(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, r.headers, await r.read()


async def test_bad_upstream_response_is_502(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            status, _, body = await get_status(gw.url("/"))
    assert status == 502 and b"invalid upstream response" in body


async def test_upstream_reset_mid_response_closes_client(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    log = tmp_path / "access.log"
    async with raw_upstream(handler) as up:
        text = basic_yaml(up.port).replace("access_log: {path: null}", f"access_log: {{path: {log}}}")
        async with run_gateway(text, tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", timeout=3)
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.admin_url + "/metrics") as r:
                    metrics = await r.text()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < 100000   # connection closed early
    assert 'wasmgate_errors_total{kind="upstream_reset"} 1' in metrics
    assert '"error":"upstream reset mid-response"' in log.read_text()


async def test_body_over_limit_is_413(upstream, tmp_path):
    text = basic_yaml(upstream.port, extra="limits: {max_request_body_bytes: 1000}\n")
    async with run_gateway(text, tmp_path) as gw:
        raw = await raw_exchange(gw.port(), b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n" + b"a" * 1001)
        assert raw.startswith(b"HTTP/1.1 413")
        assert len(raw) < 500
        # Chunked: discovered while streaming.
        raw = await raw_exchange(gw.port(), b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"1f4\r\n" + b"a" * 500 + b"\r\n" + b"1f4\r\n" + b"a" * 500 + b"\r\n"
                                 + b"1f4\r\n" + b"a" * 500 + b"\r\n0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 413")
        raw = await raw_exchange(gw.port(), b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n"
                                 b"Connection: close\r\n\r\n" + b"a" * 1000)
        assert raw.startswith(b"HTTP/1.1 200")
    assert [r.body_length for r in upstream.requests] == [1000]


async def test_headers_over_limit_are_431(upstream, tmp_path):
    text = basic_yaml(upstream.port, extra="limits: {max_header_bytes: 2048}\n")
    async with run_gateway(text, tmp_path) as gw:
        raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 431")
        # Beyond the read buffer too: no endless buffering.
        raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 431")
    assert upstream.requests == []


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",                                                    # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",                         # obs-fold
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n",                              # bare LF
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET nopath HTTP/1.1\r\nHost: h\r\n\r\n",
])
async def test_malformed_requests_are_400(upstream, tmp_path, request_bytes):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        raw = await raw_exchange(gw.port(), request_bytes, timeout=2)
    assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
    assert b"Traceback" not in raw and len(raw) < 600
    # A bad chunk may be found after the upstream got the head, but never a complete request.
    assert all(r.body is None or r.body_length <= 3 for r in upstream.requests)
    assert all(r.method != "GET" or r.path != "/admin" for r in upstream.requests)


@pytest.mark.parametrize("smuggle", [
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n",                                 # CL.TE
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",                                          # TE.CL
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
    b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n",                                  # TE.TE
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n",                                  # space before colon
])
async def test_request_smuggling_never_reaches_upstream(upstream, tmp_path, smuggle):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        raw = await raw_exchange(gw.port(), smuggle, timeout=2)
    assert raw.startswith(b"HTTP/1.1 400")
    assert len(split_responses(raw)) == 1           # connection closed after the 400
    assert upstream.requests == []


async def test_client_disconnect_mid_upload_does_not_break_gateway(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()
        await asyncio.sleep(0.1)
        status, _, _ = await get_json(gw.url("/fine"))
        assert status == 200


async def test_max_connections_queues_then_503(tmp_path):
    active = peak = conns = 0

    async def handler(reader, writer):
        nonlocal active, peak, conns
        conns += 1
        while await read_request_head(reader):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.1)
            active -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_upstream(handler) as up:
        text = basic_yaml(up.port, cluster_extra=", max_connections: 1, connect_timeout_ms: 1000")
        async with run_gateway(text, tmp_path) as gw:
            results = await asyncio.gather(*(get_status(gw.url(f"/{i}")) for i in range(3)))
            assert [r[0] for r in results] == [200, 200, 200]
            assert peak == 1 and conns == 1          # one connection, reused in turn
        text = basic_yaml(up.port, cluster_extra=", max_connections: 1, connect_timeout_ms: 50")
        async with run_gateway(text, tmp_path) as gw:
            results = await asyncio.gather(*(get_status(gw.url(f"/{i}")) for i in range(2)))
            assert sorted(r[0] for r in results) == [200, 503]


async def test_upstream_short_small_body_is_502(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        writer.close()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            status, _, body = await get_status(gw.url("/"))
    assert status == 502 and b"upstream connection reset" in body


async def test_upstream_close_delimited_and_bodyless_statuses(tmp_path):
    async def handler(reader, writer):
        while head := await read_request_head(reader):
            path = head.split(b" ")[1]
            if path == b"/eof":
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
                await writer.drain()
                writer.close()
                return
            status = path[1:].decode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode() if status == "304"
                         else f"HTTP/1.1 {status} X\r\n\r\n".encode())
            await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET /eof HTTP/1.1\r\nHost: h\r\n\r\nGET /204 HTTP/1.1\r\nHost: h\r\n\r\n"
                                     b"GET /304 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 3, raw
    head204 = raw.index(b"HTTP/1.1 204")
    head304 = raw.index(b"HTTP/1.1 304")
    assert raw[head204:head304].endswith(b"\r\n\r\n") and b"content-length" not in raw[head204:head304]
    first = split_responses(raw[:head204])[0]
    third = split_responses(raw[head304:])[0]
    assert first[0] == 200 and first[1]["transfer-encoding"] == "chunked" and first[2] == b"until the end"
    assert third[0] == 304 and third[2] == b""


async def test_concurrent_clients_all_served_and_counters_settle(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port, cluster_extra=", max_connections: 16"), tmp_path) as gw:
        async def client(i):
            async with aiohttp.ClientSession() as s:
                for j in range(6):
                    async with s.post(gw.url(f"/c{i}/{j}"), data=b"x" * (i * 100 + j)) as r:
                        echo = await r.json()
                        assert echo["body_length"] == i * 100 + j and echo["path"] == f"/c{i}/{j}"
        async with asyncio.timeout(30):
            await asyncio.gather(*(client(i) for i in range(50)))
        pools = gw.gateway.generation.upstreams.pools
        assert pools["backend"].open <= 16
        assert gw.gateway.metrics.active_requests == 0
        assert gw.gateway.metrics.requests[("all", 200)] == 300
    assert len(upstream.requests) == 300


async def test_old_idle_upstream_connections_are_not_reused(tmp_path, monkeypatch):
    import gateway.upstream
    monkeypatch.setattr(gateway.upstream, "IDLE_REUSE_S", 0.1)
    conns = 0

    async def handler(reader, writer):
        nonlocal conns
        conns += 1
        while await read_request_head(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            for pause in (0, 0.2):
                await asyncio.sleep(pause)
                assert (await get_status(gw.url("/")))[0] == 200
            assert (await get_status(gw.url("/")))[0] == 200
            assert gw.gateway.generation.upstreams.pools["backend"].open == 1
    assert conns == 2       # reused right away, replaced after sitting idle too long


async def test_sockets_have_tcp_nodelay(tmp_path):
    """Small trailing writes (last chunk) must not wait for a delayed ACK (~40 ms)."""
    import socket
    import time
    seen = {}

    async def handler(reader, writer):
        while await read_request_head(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            pool = gw.gateway.generation.upstreams.pools["backend"]
            async with aiohttp.ClientSession() as s:
                samples = []
                for _ in range(12):
                    t = time.perf_counter()
                    async with s.get(gw.url("/")) as r:
                        assert await r.read() == b"hello"
                    samples.append(time.perf_counter() - t)
            conn = pool.idle[pool.cluster.endpoints[0]][0]
            seen["up"] = conn.writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert seen["up"] != 0
    samples.sort()
    assert samples[len(samples) // 2] < 0.02, samples


async def test_chunked_trailers_pass_both_ways(tmp_path):
    got = {}

    async def handler(reader, writer):
        await read_request_head(reader)
        got["body"] = await read_chunked_rest(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-resp-trailer\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nx-resp-trailer: t1\r\nContent-Length: 99\r\n\r\n")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                     b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-req-trailer: r1\r\n"
                                     b"Host: evil\r\n\r\n")
    assert got["body"].endswith(b"5\r\nhello\r\n0\r\nx-req-trailer: r1\r\n\r\n")     # host dropped
    assert raw.endswith(b"5\r\nhello\r\n0\r\nx-resp-trailer: t1\r\n\r\n")             # framing dropped
