"""HTTP/2 downstream (gateway/client_h2.py) with real clients: httpx[http2], curl --http2-prior-knowledge
and a raw h2 client (tests/h2client.py) for windows, resets, GOAWAY and bytes no library sends.

Every stream runs the route's real filter chain (filters/dist auth → ratelimit → headers, risk)
and reaches an HTTP/1.1 upstream.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from pathlib import Path

import h2.errors
import httpx
import pytest
from aiohttp import web
from hpack import Encoder
from hyperframe.frame import HeadersFrame, SettingsFrame

from tests.h2client import RawH2, StreamState
from tests.helpers import (echo_upstream, raw_exchange, raw_upstream, read_chunked_rest, read_request_head,
                           run_gateway, until)

DIST = Path(__file__).resolve().parents[2] / "filters" / "dist"
KEY = "key-h2-alice"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def config(up_port: int, limits: str = "", http2: str = "", access_log: str = "null") -> str:
    return f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0{http2}}}]
admin: {{address: 127.0.0.1, port: 0}}
access_log: {{path: {access_log}}}
limits: {{max_header_bytes: 8192{limits}}}
clusters: [{{name: backend, endpoints: ["127.0.0.1:{up_port}"]}}]
routes:
  - {{name: pay, cluster: backend, match: {{prefix: /pay}}, filters: [auth, risk]}}
  - {{name: api, cluster: backend, match: {{prefix: /api}}, filters: [auth, ratelimit, headers]}}
  - {{name: plain, cluster: backend}}
filters:
  - name: auth
    wasm: {DIST / "auth.wasm"}
    config: {{identity_header: x-auth-identity, strip_credentials: true, api_key: {{header: x-api-key, keys: [{{key: {KEY}, identity: h2-alice}}]}}}}
  - name: ratelimit
    wasm: {DIST / "ratelimit.wasm"}
    config: {{limits: [{{name: h2-per-key, key: identity, rate: 1000, period_s: 1, burst: 1000}}]}}
  - name: headers
    wasm: {DIST / "headers.wasm"}
    config: {{request: {{set: {{x-stream-id-seen: "${{request.id}}"}}}}, response: {{set: {{x-served-by: wasmgate}}}}}}
  - name: risk
    wasm: {DIST / "risk.wasm"}
    config: {{field: amount, threshold: 100, max_body_bytes: 4096}}
"""


def h2_client() -> httpx.AsyncClient:
    # http:// with http1=False: HTTP/2 with prior knowledge (h2c), one connection for all streams.
    return httpx.AsyncClient(http1=False, http2=True, timeout=30)


async def test_concurrent_streams_through_the_chain_on_one_connection(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, access_log=str(tmp_path / "access.log")), tmp_path) as gw:
            async with h2_client() as c:
                good = [c.get(gw.url(f"/api/item/{i}"), headers={"x-api-key": KEY}) for i in range(40)]
                bad = [c.get(gw.url(f"/api/denied/{i}")) for i in range(10)]
                rs = await asyncio.gather(*good, *bad)
            assert gw.gateway.metrics.counts().requests[("api", 200)] == 40
    for r in rs[:40]:
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.headers["x-served-by"] == "wasmgate" and "ratelimit-limit" in r.headers
        seen = dict((k, v) for k, v in r.json()["headers"])
        assert seen["x-auth-identity"] == "h2-alice" and "x-api-key" not in seen
        assert seen["x-forwarded-proto"] == "http" and seen["host"].startswith("127.0.0.1:")
    # A filter's local reply on some streams leaves the others alone.
    assert [r.status_code for r in rs[40:]] == [401] * 10
    assert all(r.headers.get("www-authenticate") for r in rs[40:])
    paths = {rq.path for rq in up.requests}
    assert len(paths) == 40 and all("/denied/" not in p for p in paths)
    # All fifty went over one connection: the access log names one client port.
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert len(lines) == 50 and len({line["client"] for line in lines}) == 1


async def test_curl_http2_prior_knowledge(tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    async with echo_upstream() as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            proc = await asyncio.create_subprocess_exec(
                curl, "-s", "-i", "--http2-prior-knowledge", "-H", f"x-api-key: {KEY}", gw.url("/api/hello"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
    assert proc.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/2 200") and "x-served-by: wasmgate" in head
    assert json.loads(body)["path"] == "/api/hello"


async def test_h1_and_h2c_share_a_listener_and_http2_false_turns_h2c_off(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with httpx.AsyncClient() as c1, h2_client() as c2:
                r1, r2 = await c1.get(gw.url("/a")), await c2.get(gw.url("/b"))
            assert (r1.http_version, r2.http_version) == ("HTTP/1.1", "HTTP/2")
        async with run_gateway(config(up.port, http2=", http2: false"), tmp_path) as gw:
            raw = await raw_exchange(gw.port(), PREFACE, timeout=5)
            assert raw.startswith(b"HTTP/1.1 400") or raw.startswith(b"HTTP/1.1 505")


async def test_large_upload_is_flow_controlled_end_to_end(tmp_path):
    """With nothing spooled, a client can run ahead of an upstream that does not read by no
    more than the stream window plus socket buffers: its window closes, then everything arrives."""
    release = asyncio.Event()
    got = {}

    async def slow_reader(request: web.Request) -> web.Response:
        await release.wait()
        digest, n = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            n += len(chunk)
        got.update(n=n, sha=digest.hexdigest())
        return web.Response(text="stored")

    body = bytes(range(256)) * (64 * 1024 * 4)           # 64 MiB
    view = memoryview(body)
    limits = ", request_buffer_bytes: 65536, spool_max_bytes: 0, http2_stream_window_bytes: 65535"
    async with echo_upstream(slow_reader) as up:
        async with run_gateway(config(up.port, limits), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                sid = c.request("POST", "/upload", headers=[("content-length", str(len(body)))], end=False)
                sent = 0
                while sent < len(body):
                    sent += c.send_body(sid, view[sent:])
                    try:
                        # Stuck = the gateway hands no window back for a second.
                        await c.wait(lambda: c.h2.local_flow_control_window(sid) > 0, timeout=1.0)
                    except TimeoutError:
                        break
                # Its window shut after the stream window, the request buffer and socket
                # buffers: far from the whole body, none of it held for the client.
                assert sent < len(body) // 2, sent
                release.set()
                await c.send_all(sid, view[sent:])
                await c.wait(lambda: c.streams[sid].ended, timeout=60)
                assert c.streams[sid].status == 200 and bytes(c.streams[sid].data) == b"stored"
    assert got == {"n": len(body), "sha": hashlib.sha256(body).hexdigest()}


async def test_filter_rejecting_mid_body_answers_then_resets_only_that_stream(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                big = c.request("POST", "/pay/charge", headers=[("x-api-key", KEY)], end=False)
                ok = c.request("POST", "/pay/charge", headers=[("x-api-key", KEY)], body=b'{"amount": 5}')
                c.send_body(big, b'{"pad": "' + b"x" * 8192)   # over risk's max_body_bytes, not ended
                await c.wait(lambda: c.streams[big].reset is not None and c.streams[ok].ended)
                assert c.streams[big].status == 413 and b"payload_too_large" in c.streams[big].data
                assert c.streams[big].reset == h2.errors.ErrorCodes.NO_ERROR    # RFC 9113 §8.1
                assert c.streams[ok].status == 200
                # The connection goes on.
                again = c.request("GET", "/other")
                await c.wait(lambda: c.streams[again].ended)
                assert c.streams[again].status == 200 and c.goaway is None
    assert [r.path for r in up.requests] == ["/pay/charge", "/other"]


async def test_response_trailers_and_request_trailers(tmp_path):
    seen = {}

    async def handler(reader, writer):
        seen["head"] = await read_request_head(reader)
        seen["body"] = await read_chunked_rest(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
                     b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-checksum: abc\r\n\r\n")
        await writer.drain()

    async with raw_upstream(handler) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                sid = c.request("POST", "/t", headers=[("te", "trailers")], body=b"data", end=False)
                c.h2.send_headers(sid, [("x-req-trailer", "1")], end_stream=True)
                c.flush()
                await c.wait(lambda: c.streams[sid].ended)
                st = c.streams[sid]
    assert st.status == 200 and bytes(st.data) == b"hello"
    assert st.trailers == [("grpc-status", "0"), ("x-checksum", "abc")]
    assert b"transfer-encoding: chunked" in seen["head"].lower()
    assert b"x-req-trailer: 1" in seen["body"]


async def test_client_reset_cancels_its_stream_only(tmp_path):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/slow":
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return web.Response(text="fast")

    async with echo_upstream(handler) as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                slow = c.request("GET", "/slow")
                await asyncio.wait_for(started.wait(), 10)
                c.h2.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)
                c.flush()
                await asyncio.wait_for(cancelled.wait(), 10)     # the upstream exchange was aborted
                fast = c.request("GET", "/fast")
                await c.wait(lambda: c.streams[fast].ended)
                assert bytes(c.streams[fast].data) == b"fast"
            counts = gw.gateway.metrics.counts()
    assert counts.requests[("plain", 499)] == 1 and counts.errors["client_closed"] == 1


async def test_malformed_frames_get_goaway_never_a_traceback(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    bad_inputs = [
        SettingsFrame(0).serialize() + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x",   # DATA on stream 0
        SettingsFrame(0).serialize() + b"\x00\x00\x05\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff\xff",  # bad HPACK
        SettingsFrame(0).serialize() + _headers(1, [(b":method", b"GET"), (b":path", b"/"),
                                                         (b":scheme", b"http"), (b":authority", b"h"),
                                                         (b"x-evil", b"a\r\nInjected: 1")]),
        SettingsFrame(0).serialize() + _headers(1, [(b":method", b"GET"), (b":path", b"/"),
                                                         (b":scheme", b"http"), (b":authority", b"h"),
                                                         (b"Upper", b"1")]),
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",        # HTTP/1.1 bytes after the h2 preface
    ]
    async with echo_upstream() as up:
        async with run_gateway(config(up.port), tmp_path) as gw:
            for data in bad_inputs:
                async with RawH2.connect(gw.port()) as c:
                    c.send_raw(data)
                    await c.wait(lambda: c.closed)
                    assert c.goaway is not None, data
                    assert c.goaway.error_code in (h2.errors.ErrorCodes.PROTOCOL_ERROR,
                                                   h2.errors.ErrorCodes.COMPRESSION_ERROR,
                                                   h2.errors.ErrorCodes.FRAME_SIZE_ERROR), c.goaway
            async with h2_client() as c:
                assert (await c.get(gw.url("/still-serving"))).status_code == 200
            assert gw.gateway.metrics.counts().errors["h2_protocol_error"] == len(bad_inputs)
    assert up.requests and all("Injected" not in str(r.headers) for r in up.requests)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _headers(sid: int, headers: list) -> bytes:
    f = HeadersFrame(sid, data=Encoder().encode(headers))
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    return f.serialize()


async def test_header_list_limit_and_settings(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, ", http2_max_concurrent_streams: 7"), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                await c.wait(lambda: c.remote_settings)
                assert c.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
                assert c.remote_settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 8192
                big = c.request("GET", "/big", headers=[("x-big", "v" * 9000)])
                small = c.request("GET", "/small")
                await c.wait(lambda: c.streams[big].ended and c.streams[small].ended)
                assert c.streams[big].status == 431 and c.streams[small].status == 200
                assert c.goaway is None
    assert [r.path for r in up.requests] == ["/small"]


async def test_rapid_reset_is_refused_then_goaway(tmp_path):
    """HEADERS + RST_STREAM pairs faster than streams finish: past max_concurrent_streams new
    streams are refused, and a client that keeps at it gets GOAWAY(ENHANCE_YOUR_CALM)."""
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, ", http2_max_concurrent_streams: 4"), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                await c.wait(lambda: c.remote_settings)
                for _ in range(300):
                    sid = c.request("GET", "/r")
                    c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                c.flush()
                await c.wait(lambda: c.goaway is not None)
                assert c.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            errors = gw.gateway.metrics.counts().errors
            assert errors["h2_refused_stream"] > 100 and errors["h2_flood"] == 1
            async with h2_client() as hc:          # the gateway itself is fine
                assert (await hc.get(gw.url("/after"))).status_code == 200


def _burst(c: RawH2, n: int, path: str) -> list[int]:
    """n GET streams in one write (one read for the gateway, as a flooding client sends them)."""
    sids = []
    for i in range(n):
        sid = c.h2.get_next_available_stream_id()
        c.streams[sid] = StreamState()
        c.h2.send_headers(sid, [(":method", "GET"), (":path", f"{path}/{i}"), (":scheme", "http"),
                                (":authority", "gw.test")], end_stream=True)
        sids.append(sid)
    c.flush()
    return sids


async def test_one_connections_burst_of_streams_does_not_hold_up_the_others(tmp_path):
    """1,000 streams in one read, each answered 401 by the auth filter, then one request on
    another connection: it is answered after some of the 1,000, not after all of them
    (limits.http2_max_streams_per_io_cycle: the streams a read brought start a few per event-loop
    turn, the other connections' events in between). It used to wait for all of them."""
    limits = ", http2_max_concurrent_streams: 1000, http2_max_streams_per_io_cycle: 1"
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, limits), tmp_path) as gw:
            denied = lambda: gw.gateway.metrics.requests.get(("api", 401), 0)   # noqa: E731
            async with RawH2.connect(gw.port()) as c:
                await c.wait(lambda: c.remote_settings)
                n = 1000
                sids = _burst(c, n, "/api/denied")
                await until(lambda: denied() > 0, timeout=20, interval=0.005)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
                writer.write(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                served_meanwhile = denied()
                assert head.startswith(b"HTTP/1.1 200")
                assert served_meanwhile < n // 2, served_meanwhile
                await c.wait(lambda: all(c.streams[s].ended for s in sids))   # and every one answered
                assert [c.streams[s].status for s in sids] == [401] * n
                writer.close()


async def test_streams_waiting_to_start_are_served_or_logged_when_the_client_leaves(tmp_path):
    """Streams the per-turn limit holds back are never lost: when the client goes before they
    started, each is still logged and counted, as a vanished client's (499) or answered."""
    limits = ", http2_max_concurrent_streams: 500, http2_max_streams_per_io_cycle: 1"
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, limits), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                await c.wait(lambda: c.remote_settings)
                _burst(c, 300, "/gone")
            def by_status() -> dict[int, int]:      # route "-": gone before it was routed
                got: dict[int, int] = {}
                for (route, status), n in gw.gateway.metrics.requests.items():
                    if route in ("plain", "-"):
                        got[status] = got.get(status, 0) + n
                return got
            await until(lambda: sum(by_status().values()) == 300, timeout=20, interval=0.005)
            assert by_status().get(499, 0) > 0, by_status()
            assert set(by_status()) <= {200, 499}, by_status()
            assert gw.gateway.generation.active == 0
            async with h2_client() as hc:          # the gateway itself is fine
                assert (await hc.get(gw.url("/after"))).status_code == 200


async def test_body_idle_timeout_is_per_stream(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, ", request_body_idle_timeout_s: 0.5"), tmp_path) as gw:
            async with RawH2.connect(gw.port()) as c:
                stalled = c.request("POST", "/stalled", headers=[("content-length", "10")], end=False)
                c.send_body(stalled, b"12345")
                await c.wait(lambda: c.streams[stalled].ended or c.streams[stalled].reset is not None)
                assert c.streams[stalled].status == 408
                other = c.request("GET", "/other")
                await c.wait(lambda: c.streams[other].ended)
                assert c.streams[other].status == 200 and c.goaway is None
            assert gw.gateway.metrics.counts().errors["client_timeout"] == 1


async def test_drain_sends_goaway_and_finishes_open_streams(tmp_path):
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="finished")

    async with echo_upstream(handler) as up:
        async with run_gateway(config(up.port), tmp_path, drain_timeout_s=20) as gw:
            async with RawH2.connect(gw.port()) as c:
                sid = c.request("GET", "/long")
                await asyncio.wait_for(started.wait(), 10)
                stop = asyncio.ensure_future(gw.gateway.stop(drain_timeout_s=20))
                await c.wait(lambda: c.goaway is not None)
                assert c.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
                assert c.goaway.last_stream_id == sid
                release.set()
                await c.wait(lambda: c.streams[sid].ended and c.closed)
                assert bytes(c.streams[sid].data) == b"finished"
                await asyncio.wait_for(stop, 20)


def test_config_keys_for_protocols_are_checked(tmp_path):
    from gateway.config import ConfigError, parse_config
    text = """
listeners: [{name: main, port: 0, http2: "yes"}]
limits: {http2_max_concurrent_streams: 0, http2_stream_window_bytes: 100, upgrade_idle_timeout_s: 0, http2_max_streams_per_io_cycle: 0}
clusters: [{name: b, endpoints: ["127.0.0.1:1"]}]
routes: [{name: r, cluster: b, upgrades: 1}]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "config.yaml", tmp_path)
    errors = "\n".join(e.value.errors)
    assert "config.yaml:2 listeners[0].http2: expected true or false" in errors
    assert "limits.http2_max_concurrent_streams: must be 1..2147483647, got 0" in errors
    assert "limits.http2_stream_window_bytes: must be 65535..2147483647, got 100" in errors
    assert "limits.upgrade_idle_timeout_s: must be >= 0.001" in errors
    assert "limits.http2_max_streams_per_io_cycle: must be >= 1, got 0" in errors
    assert "config.yaml:5 routes[0].upgrades: expected true or false, got 1" in errors
    ok = parse_config(text.replace('http2: "yes"', "http2: false").replace("upgrades: 1", "upgrades: false")
                      .replace("limits: {http2_max_concurrent_streams: 0, http2_stream_window_bytes: 100, "
                               "upgrade_idle_timeout_s: 0, http2_max_streams_per_io_cycle: 0}",
                               "limits: {http2_max_concurrent_streams: 8}"),
                      "config.yaml", tmp_path)
    assert ok.listeners[0].http2 is False and ok.routes[0].upgrades is False
    assert ok.limits.http2_max_concurrent_streams == 8 and ok.limits.http2_stream_window_bytes == 65535
    assert ok.limits.http2_max_streams_per_io_cycle == 8           # the default


async def test_a_stream_whose_window_stays_shut_is_reset_after_the_send_timeout(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(up.port, ", response_send_timeout_s: 0.5"), tmp_path) as gw:
            settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
            async with RawH2.connect(gw.port(), settings=settings) as c:
                shut = c.request("GET", "/shut")
                open_ = c.request("GET", "/open")
                c.h2.increment_flow_control_window(1 << 20)                 # the connection's
                c.h2.increment_flow_control_window(1 << 20, stream_id=open_)
                c.flush()
                await c.wait(lambda: c.streams[open_].ended and c.streams[shut].reset is not None)
                assert c.streams[open_].status == 200 and json.loads(c.streams[open_].data)["path"] == "/open"
                assert c.streams[shut].status == 200 and not c.streams[shut].data     # head, then no window
                assert c.streams[shut].reset == h2.errors.ErrorCodes.CANCEL
                assert c.goaway is None
            assert gw.gateway.metrics.counts().errors["client_send_timeout"] == 1


def tls_config(up_port: int, pki, http2: str = "") -> str:
    return config(up_port).replace(
        "listeners: [{name: main, address: 127.0.0.1, port: 0}]",
        f"listeners: [{{name: main, address: 127.0.0.1, port: 0, "
        f"tls: {{cert: {pki.path('default.pem')}, key: {pki.path('default.key')}}}{http2}}}]")


async def test_tls_alpn_h2_runs_the_chain_per_stream(tmp_path, pki):
    async with echo_upstream() as up:
        async with run_gateway(tls_config(up.port, pki), tmp_path) as gw:
            url = f"https://127.0.0.1:{gw.port()}"
            async with httpx.AsyncClient(http2=True, verify=pki.client(), timeout=30) as c:
                rs = await asyncio.gather(*[c.get(f"{url}/api/s{i}", headers={"x-api-key": KEY}) for i in range(20)],
                                          c.get(f"{url}/api/nokey"))
            async with httpx.AsyncClient(verify=pki.client()) as c1:       # ALPN http/1.1 still
                r1 = await c1.get(f"{url}/api/h1", headers={"x-api-key": KEY})
    assert {r.http_version for r in rs} == {"HTTP/2"} and r1.http_version == "HTTP/1.1"
    assert [r.status_code for r in rs] == [200] * 20 + [401]
    seen = dict((k, v) for k, v in rs[0].json()["headers"])
    assert seen["x-forwarded-proto"] == "https" and seen["x-auth-identity"] == "h2-alice"
    assert rs[0].headers["x-served-by"] == "wasmgate" and r1.status_code == 200


async def test_curl_http2_over_tls(tmp_path, pki):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    async with echo_upstream() as up:
        async with run_gateway(tls_config(up.port, pki), tmp_path) as gw:
            proc = await asyncio.create_subprocess_exec(
                curl, "-s", "-i", "-k", "--http2", f"https://127.0.0.1:{gw.port()}/api/hello",
                "-H", f"x-api-key: {KEY}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
    assert proc.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/2 200") and "x-served-by: wasmgate" in head
    assert json.loads(body)["path"] == "/api/hello"


async def test_tls_listener_with_http2_off_offers_only_http1(tmp_path, pki):
    import ssl
    async with echo_upstream() as up:
        async with run_gateway(tls_config(up.port, pki, ", http2: false"), tmp_path) as gw:
            ctx = pki.client()
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port(), ssl=ctx)
            try:
                assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            finally:
                writer.close()
            async with httpx.AsyncClient(http2=True, verify=pki.client()) as c:
                r = await c.get(f"https://127.0.0.1:{gw.port()}/x")
    assert r.http_version == "HTTP/1.1" and r.status_code == 200 and isinstance(ssl.OPENSSL_VERSION, str)


async def test_http1_bytes_after_alpn_h2_get_goaway(tmp_path, pki):
    """ALPN chose h2, then the client speaks HTTP/1.1: the preface is wrong, GOAWAY and close."""
    async with echo_upstream() as up:
        async with run_gateway(tls_config(up.port, pki), tmp_path) as gw:
            ctx = pki.client()
            ctx.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port(), ssl=ctx)
            try:
                assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                data = b""
                async with asyncio.timeout(10):
                    while chunk := await reader.read(65536):
                        data += chunk
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
            assert gw.gateway.metrics.counts().errors["h2_protocol_error"] == 1
    # The server's SETTINGS, then GOAWAY(PROTOCOL_ERROR): frame type 7, error code 1.
    goaway = data.find(b"\x07\x00\x00\x00\x00\x00")
    assert goaway > 0 and data[goaway + 10:goaway + 14] == b"\x00\x00\x00\x01"
    assert up.requests == []
