"""Every place a client or an upstream can stall has a time limit or a bound, and a client that
goes away stops its request. Each test is named after the attack it resists; time limits are
configured short so the tests are fast, and every wait is on a condition."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from tests.conformance import watlib
from tests.gateway.conftest import basic_yaml
from tests.helpers import echo_upstream, raw_exchange, raw_upstream, read_request_head, run_gateway, until

def limits(header: float = 0.3, body: float = 0.3, send: float = 0.5) -> str:
    return (f"limits: {{request_header_timeout_s: {header}, request_body_idle_timeout_s: {body}, "
            f"response_send_timeout_s: {send}, keepalive_timeout_s: 5}}\n")


LIMITS = limits()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _requests_total(gw, status: int) -> int:
    return sum(n for (_, s), n in gw.gateway.metrics.requests.items() if s == status)


# -- downstream time limits ------------------------------------------------------------------

async def test_slowloris_head_gets_408_and_close(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port, extra=LIMITS), tmp_path) as gw:
        reader, writer = await _open(gw.port())
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
        for _ in range(3):                      # a header line now and then, never the end
            await asyncio.sleep(0.1)
            writer.write(b"x-a: b\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")
        assert upstream.requests == []
        writer.close()


async def test_a_connection_that_never_sends_is_closed(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port, extra=LIMITS), tmp_path) as gw:
        reader, writer = await _open(gw.port())
        assert await asyncio.wait_for(reader.read(), 5) == b""      # nothing to answer: closed
        writer.close()


async def test_slow_upload_gets_408_and_reaches_no_upstream(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port, extra=LIMITS), tmp_path) as gw:
        reader, writer = await _open(gw.port())
        writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"connection: close" in answer
        assert upstream.requests == []
        writer.close()
        assert gw.gateway.metrics.errors["client_timeout"] >= 1


async def test_slow_uploaders_hold_no_upstream_connection(tmp_path):
    # One upstream connection in the pool and ten clients trickling their bodies: the body is read
    # before a connection is taken, so a normal request is served at once meanwhile.
    accepted = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{request.path} {len(body)}")

    async with echo_upstream(handler) as up:
        yaml_text = basic_yaml(up.port, extra=limits(body=3),
                               cluster_extra=", max_connections: 1, connect_timeout_ms: 200")
        async with run_gateway(yaml_text, tmp_path) as gw:
            slow = [await _open(gw.port()) for _ in range(10)]
            for _, w in slow:
                w.write(b"POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\na")
            async with aiohttp.ClientSession() as s:
                for i in range(5):
                    async with s.get(gw.url(f"/fast/{i}")) as r:
                        assert r.status == 200 and await r.text() == f"/fast/{i} 0"
                        accepted.append(i)
            for _, w in slow:                       # the uploads complete, and are served too
                w.write(b"bcde")
            for r, w in slow:
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                w.close()
    assert accepted == list(range(5))


async def test_slow_reader_releases_the_upstream_and_is_closed(tmp_path):
    big = b"x" * (8 << 20)          # far beyond what the sockets buffer: the rest is spooled

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=big if request.path == "/big" else b"small")

    async with echo_upstream(handler) as up:
        yaml_text = basic_yaml(up.port, extra=LIMITS, cluster_extra=", max_connections: 1, connect_timeout_ms: 200")
        async with run_gateway(yaml_text, tmp_path) as gw:
            reader, writer = await _open(gw.port())
            writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")       # then never read again
            assert head.startswith(b"HTTP/1.1 200")
            pool = gw.gateway.generation.upstreams.pools["backend"]
            await until(lambda: pool.open == 1 and sum(map(len, pool.idle.values())) == 1)
            async with aiohttp.ClientSession() as s:     # the one upstream connection is free again
                async with s.get(gw.url("/small")) as r:
                    assert r.status == 200 and await r.read() == b"small"
            # The reader that does not read is cut off after response_send_timeout.
            await until(lambda: gw.gateway.metrics.errors["client_send_timeout"] >= 1)
            got = len(head)
            try:
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                    got += len(chunk)
            except ConnectionError:
                pass
            assert got < len(big)
            writer.close()


async def test_a_pipelining_client_that_never_reads_is_not_answered_into_memory(upstream, tmp_path):
    """200,000 pipelined requests the gateway answers itself (404: no route), and the client
    reads nothing: once the unsent answers pass the high-water mark the gateway takes no further
    request, and after response_send_timeout it closes the connection. It used to answer every
    one of them into its own memory (~30 MB here), with no timeout ever firing."""
    routes = "  - {name: only, match: {prefix: /only}, cluster: backend}\n"
    async with run_gateway(basic_yaml(upstream.port, extra=LIMITS, routes=routes), tmp_path) as gw:
        reader, writer = await _open(gw.port())
        n = 200_000
        writer.write(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n" * n)   # asyncio keeps what the socket won't take
        await until(lambda: gw.gateway.metrics.errors["client_send_timeout"] >= 1)
        answered = _requests_total(gw, 404)
        # What the two sockets' buffers hold (a few MB of 404s on loopback), not all of them.
        assert 0 < answered < n // 2, answered
        writer.transport.abort()


async def test_a_pipelining_client_does_not_starve_the_other_connections(upstream, tmp_path):
    """5,000 pipelined requests the gateway answers itself (404) on one connection, then one
    proxied request on another: the second is answered after a few of the 5,000, not after all
    that the first connection had already sent (limits.max_requests_per_io_cycle, 1 by default:
    one pipelined request, then the others' turn). It used to wait for all of them."""
    routes = "  - {name: only, match: {prefix: /only}, cluster: backend}\n"
    async with run_gateway(basic_yaml(upstream.port, routes=routes), tmp_path) as gw:
        n = 5000
        ra, wa = await _open(gw.port())

        async def count_answers() -> int:
            got = 0
            while got < n:
                got += (await ra.read(1 << 20)).count(b"HTTP/1.1 404")
            return got

        reading = asyncio.create_task(count_answers())     # the flooder reads: never held back
        wa.write(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n" * n)
        await until(lambda: _requests_total(gw, 404) > 0)
        rb, wb = await _open(gw.port())
        wb.write(b"GET /only HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await asyncio.wait_for(rb.readuntil(b"\r\n\r\n"), 10)
        served_meanwhile = _requests_total(gw, 404)
        assert head.startswith(b"HTTP/1.1 200")
        assert served_meanwhile < n // 2, served_meanwhile
        assert await asyncio.wait_for(reading, 30) == n        # and the flooder got every answer
        wa.close()
        wb.close()


async def test_idle_keepalive_connections_are_capped(upstream, tmp_path):
    extra = "limits: {max_idle_connections: 2}\n"
    async with run_gateway(basic_yaml(upstream.port, extra=extra), tmp_path) as gw:
        conns = [await _open(gw.port()) for _ in range(3)]
        heads = []
        for reader, writer in conns:
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            length = int(heads[-1].split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        assert [b"connection: close" in h for h in heads] == [False, False, True]
        assert gw.gateway.idle_connections == 2
        for _, writer in conns:
            writer.close()


# -- upstream time limits --------------------------------------------------------------------

async def _stalling_upstream(body_bytes: bytes, closed: list, length: int = 100):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % length + body_bytes)
        await writer.drain()
        closed.append(await reader.read() == b"")      # we only get here once the gateway hangs up
        writer.close()
    return raw_upstream(handler)


@pytest.mark.parametrize("sent", [b"", b"abc"], ids=["after-head", "small-body-begun"])
async def test_upstream_silent_before_anything_went_downstream_gives_504(tmp_path, sent):
    # A small body is read whole before anything goes downstream: still a clean 504.
    closed: list = []
    async with await _stalling_upstream(sent, closed) as up:
        yaml_text = basic_yaml(up.port, cluster_extra=", response_idle_timeout_ms: 300")
        async with run_gateway(yaml_text, tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 504")
            await until(lambda: closed == [True])


async def test_upstream_silent_mid_body_closes_the_client(tmp_path):
    closed: list = []
    async with await _stalling_upstream(b"abc", closed, length=1 << 20) as up:
        yaml_text = basic_yaml(up.port, cluster_extra=", response_idle_timeout_ms: 300")
        async with run_gateway(yaml_text, tmp_path) as gw:
            raw = await raw_exchange(gw.port(), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            # The head went out with the first bytes; the only honest signal left is closing.
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\nabc")
            await until(lambda: closed == [True])
            assert gw.gateway.metrics.errors["upstream_timeout"] >= 1


# -- a client that goes away -----------------------------------------------------------------

async def _hanging_upstream(seen: list, closed: list):
    """Accepts requests and never answers; records heads and when the gateway hangs up."""
    async def handler(reader, writer):
        head = await read_request_head(reader)
        if head:
            seen.append(head)
        closed.append(await reader.read() == b"")
        writer.close()
    return raw_upstream(handler)


async def test_client_gone_while_waiting_for_the_upstream_aborts_it(tmp_path):
    seen: list = []
    closed: list = []
    async with await _hanging_upstream(seen, closed) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            reader, writer = await _open(gw.port())
            writer.write(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
            await until(lambda: len(seen) == 1)
            writer.close()
            await until(lambda: closed == [True])       # the upstream exchange was aborted
            await until(lambda: _requests_total(gw, 499) == 1)
            assert gw.gateway.metrics.errors["client_closed"] == 1
            assert gw.gateway.metrics.active_requests == 0


async def test_client_gone_while_waiting_for_a_connection_sends_nothing(tmp_path):
    seen: list = []
    closed: list = []
    async with await _hanging_upstream(seen, closed) as up:
        yaml_text = basic_yaml(up.port, cluster_extra=", max_connections: 1, connect_timeout_ms: 5000")
        async with run_gateway(yaml_text, tmp_path) as gw:
            pool = gw.gateway.generation.upstreams.pools["backend"]
            connects = []
            real_connect = pool._connect

            async def counted_connect(ep):
                connects.append(ep)
                return await real_connect(ep)
            pool._connect = counted_connect
            r1, w1 = await _open(gw.port())
            w1.write(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")   # takes the only connection
            await until(lambda: len(seen) == 1)
            r2, w2 = await _open(gw.port())
            w2.write(b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")  # waits for it
            await until(lambda: len(pool._waiters) == 1)
            w2.close()
            await until(lambda: _requests_total(gw, 499) == 1)
            assert pool._waiters == []
            w1.close()                      # frees the connection: nobody may be waiting for it
            await until(lambda: _requests_total(gw, 499) == 2)
            assert len(connects) == 1 and pool.open == 0
            assert len(seen) == 1 and b"/first" in seen[0]


async def test_client_gone_while_paused_in_a_filter_runs_teardown_and_sends_nothing(tmp_path):
    # The probe filter pauses on an http_call to a cluster that never answers.
    seen: list = []
    closed: list = []
    wasm = watlib.build("strict_sdk.wat", tmp_path)
    async with echo_upstream() as backend, await _hanging_upstream(seen, closed) as hang:
        doc = {
            "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
            "access_log": {"path": None},
            "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{backend.port}"]},
                         {"name": "hang", "endpoints": [f"127.0.0.1:{hang.port}"]}],
            "routes": [{"name": "all", "cluster": "backend", "filters": ["probe"]}],
            "filters": [{"name": "probe", "wasm": str(wasm), "config": "p1"}],
        }
        async with run_gateway(json.dumps(doc), tmp_path) as gw:
            reader, writer = await _open(gw.port())
            writer.write(b"POST /pay HTTP/1.1\r\nHost: h\r\nx-act: call\r\nx-cluster: hang\r\n"
                         b"x-timeout: 30000\r\nContent-Length: 4\r\n\r\nbody")
            await until(lambda: len(seen) == 1)             # the callout is in flight
            writer.close()
            await until(lambda: _requests_total(gw, 499) == 1)
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/__trace/p1")) as r:
                    trace = (await r.text()).split()
            ctx = next(e.split(":")[1] for e in trace if e.startswith("req_hdrs:"))
            for cb in ("done", "log", "delete"):
                assert f"{cb}:{ctx}" in trace, trace
            assert backend.requests == []                   # never sent upstream
            await until(lambda: closed == [True])          # the callout was cancelled too
