"""The gateway's side of the abi seam, driven by a fake FilterHost that follows abi/api.py.

The fake's behaviour is chosen per request by the `x-fake` (request side) and `x-fake-resp`
(response side) headers, so each test exercises one path of proxy.py's seam handling.
"""
import asyncio

import aiohttp
import pytest

from abi.api import (CallFailed, FilterLoadError, Forward, LocalReply, LocalReplyInterrupt, LogInfo,
                     MetricSample, StreamInfo)
from gateway.server import Gateway
from gateway.config import load_config
from tests.helpers import echo_upstream, raw_exchange, raw_upstream, read_request_head, run_gateway


def hget(headers, name):
    return next((v for k, v in headers if k == name), None)


class FakeStream:
    route_cache_cleared = False      # api.HttpStream: no clear_route_cache here

    def __init__(self, host, names, info: StreamInfo):
        self.host, self.names, self.info = host, names, info
        self.resp_mode = None

    async def request(self, headers, body):
        self.host.request_headers.append(headers)
        mode = hget(headers, "x-fake")
        self.resp_mode = hget(headers, "x-fake-resp")
        if mode == "reply":
            return LocalReply(403, [("x-by", "fake"), (":status", "403")], b"denied by fake", "fake_denied")
        if mode and mode.startswith("status-"):
            return LocalReply(int(mode[7:]), [], b"odd status body", "odd")
        if mode == "add-header":
            return Forward(headers + [("x-added", "1")], body)
        if mode == "clear-route-cache":
            self.route_cache_cleared = True
            return Forward(headers, body)
        if mode == "path":
            return Forward([(n, "/rewritten?by=filter" if n == ":path" else v) for n, v in headers], body)
        if mode == "move-pseudo":            # removed and added again, after the other headers
            return Forward([(n, v) for n, v in headers if n not in (":path", ":method")]
                           + [(":path", "/moved?by=filter"), (":method", "PUT"), (":method", "DELETE")], body)
        if mode == "drop-authority":
            return Forward([(n, v) for n, v in headers if n != ":authority"], body)
        if mode == "reject-body":
            return Forward(headers, self._reject_after(body, 1, LocalReply(400, [], b"bad chunk", "body_rejected")))
        if mode == "buffer-upper":
            data = b"".join([c async for c in body])
            return Forward([(n, v) for n, v in headers if n != "content-length"], _once(data.upper()))
        if mode == "drop-body":
            async for _ in body:
                pass
            return Forward(headers, None)
        if mode == "callout":
            try:
                resp = await self.host.services.http_call("backend", "GET", "/callout", "auth.local",
                                                          [("x-call", "1")], b"", 2.0)
                return LocalReply(200, [("x-callout-status", str(resp.status))], resp.body, "")
            except CallFailed as e:
                return LocalReply(503, [], f"callout failed: {e.reason}".encode(), "")
        if mode == "boom":
            raise RuntimeError("bug in a filter chain")
        return Forward(headers, body)

    async def response(self, status, headers, body):
        assert headers[0] == (":status", str(status))
        self.host.response_headers.append(headers)
        mode = self.resp_mode
        if mode == "reply":
            return LocalReply(451, [], b"blocked response", "resp_denied")
        if mode == "status":
            return Forward([(":status", "299")] + headers[1:] + [("x-resp", "fake")], body)
        if mode == "reject-first":
            return Forward(headers, self._reject_after(body, 0, LocalReply(502, [], b"bad body", "")))
        if mode == "reject-later":
            return Forward(headers, self._reject_after(body, 2, LocalReply(502, [], b"bad body", "")))
        if mode == "drop-length":           # headers edited, the body left alone
            return Forward([(n, v) for n, v in headers if n != "content-length"], body)
        if mode == "replace":
            async for _ in body:
                pass
            return Forward([(n, v) for n, v in headers if n != "content-length"], _once(b"replaced"))
        return Forward(headers, body)

    async def _reject_after(self, body, n, reply):
        i = 0
        async for chunk in body:
            if i >= n:
                raise LocalReplyInterrupt(reply)
            i += 1
            yield chunk
        if i >= n:
            raise LocalReplyInterrupt(reply)

    async def finish(self, log: LogInfo):
        self.host.finished.append((self.info, log))


async def _once(data):
    yield data


class FakeHost:
    def __init__(self, specs, services):
        self.specs, self.services = specs, services
        self.streams = []
        self.request_headers, self.response_headers, self.finished = [], [], []
        self.closed = False

    def stream(self, names, info):
        s = FakeStream(self, names, info)
        self.streams.append(s)
        return s

    def metrics(self):
        return [MetricSample("wasmgate_filter_fake_total", "counter", 7, {"filter": "auth"}, "fake samples")]

    async def close(self):
        self.closed = True


def yaml_for(tmp_path, up_port):
    (tmp_path / "f.wasm").write_bytes(b"\0asm\1\0\0\0")
    return f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
admin: {{address: 127.0.0.1, port: 0}}
access_log: {{path: null}}
clusters: [{{name: backend, endpoints: ["127.0.0.1:{up_port}"]}}]
routes:
  - {{name: plain, match: {{prefix: /plain}}, cluster: backend}}
  - {{name: filtered, cluster: backend, filters: [auth, hdr], rewrite: {{host: rewritten.host}}, match: {{prefix: /}}}}
filters:
  - {{name: auth, wasm: f.wasm, config: {{api_token: s3cret, mode: strict}}}}
  - {{name: hdr, wasm: f.wasm}}
"""


@pytest.fixture
async def setup(tmp_path):
    hosts = []

    async def factory(specs, services):
        hosts.append(FakeHost(specs, services))
        return hosts[-1]

    async with echo_upstream() as up:
        async with run_gateway(yaml_for(tmp_path, up.port), tmp_path, filter_host_factory=factory) as gw:
            yield gw, up, hosts[0]
    assert hosts[0].closed


async def request(method, url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            return r.status, r.headers, await r.read()


async def test_route_without_filters_never_opens_a_stream(setup):
    gw, up, host = setup
    status, _, _ = await request("GET", gw.url("/plain/x"))
    assert status == 200 and host.streams == []
    assert [s.name for s in host.specs] == ["auth", "hdr"]


async def test_passthrough_with_pseudo_headers_and_stream_info(setup):
    gw, up, host = setup
    status, headers, body = await request("POST", gw.url("/f?q=1"), data=b"payload",
                                          headers={"x-request-id": "rid-1", "Host": "orig.host"})
    assert status == 200
    sent = host.request_headers[0]
    assert sent[:4] == [(":method", "POST"), (":path", "/f?q=1"), (":authority", "orig.host"), (":scheme", "http")]
    assert hget(sent, "content-length") == "7" and hget(sent, "x-forwarded-for") == "127.0.0.1"
    assert host.response_headers[0][0] == (":status", "200")
    stream = host.streams[0]
    assert list(stream.names) == ["auth", "hdr"]      # the route's tuple, handed as is
    info = stream.info
    assert (info.request_id, info.route_name, info.cluster_name) == ("rid-1", "filtered", "backend")
    assert info.client_addr[0] == "127.0.0.1" and info.local_addr[1] == gw.port()
    assert info.protocol == "HTTP/1.1" and info.start_time_ns > 0
    received = up.requests[0]
    assert received.body == b"payload" and received.header("content-length") == "7"
    assert received.header("host") == "rewritten.host"          # rewrite applied after the chain
    await asyncio.sleep(0)
    (finfo, log), = host.finished
    assert log.status == 200 and log.bytes_in == 7 and log.bytes_out == len(body)
    assert log.upstream_address == up.endpoint and log.duration_ns > 0


async def test_request_local_reply(setup):
    gw, up, host = setup
    status, headers, body = await request("GET", gw.url("/x"), headers={"x-fake": "reply"})
    assert (status, body, headers["x-by"]) == (403, b"denied by fake", "fake")
    assert up.requests == [] and host.finished[0][1].status == 403


async def test_request_header_and_path_changes_reach_upstream(setup):
    gw, up, host = setup
    await request("GET", gw.url("/x"), headers={"x-fake": "add-header"})
    await request("GET", gw.url("/x"), headers={"x-fake": "path"})
    assert up.requests[0].header("x-added") == "1"
    assert up.requests[1].path == "/rewritten?by=filter"


async def test_moved_or_removed_pseudo_headers(setup):
    # The last of each pseudo-header wherever a filter put it; a removed one keeps the
    # request's own value; none of them goes upstream as a header.
    gw, up, host = setup
    await request("GET", gw.url("/x"), headers={"x-fake": "move-pseudo"})
    await request("GET", gw.url("/x?q=1"), headers={"x-fake": "drop-authority", "Host": "orig.host"})
    moved, dropped = up.requests
    assert (moved.method, moved.path) == ("DELETE", "/moved?by=filter")
    assert (dropped.method, dropped.path) == ("GET", "/x?q=1")        # (its host: the route's rewrite)
    assert not any(k.startswith(":") for r in (moved, dropped) for k, _ in r.headers)


async def test_request_body_interrupt_aborts_upstream_and_replies(setup):
    gw, up, host = setup

    async def chunks():
        for i in range(5):
            yield b"x" * 1000
            await asyncio.sleep(0.01)
    status, _, body = await request("POST", gw.url("/x"), data=chunks(), headers={"x-fake": "reject-body"})
    assert (status, body) == (400, b"bad chunk")
    await asyncio.sleep(0.05)
    assert up.requests == [] or up.requests[0].body_length < 5000   # the upstream never got a whole body


async def test_replaced_and_dropped_request_bodies(setup):
    gw, up, host = setup
    await request("POST", gw.url("/x"), data=b"abc", headers={"x-fake": "buffer-upper"})
    await request("POST", gw.url("/x"), data=b"abc", headers={"x-fake": "drop-body"})
    assert up.requests[0].body == b"ABC"
    assert up.requests[1].body_length == 0 and up.requests[1].header("content-length") == "0"


async def test_response_local_reply_and_status_change(setup):
    gw, up, host = setup
    status, _, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "reply"})
    assert (status, body) == (451, b"blocked response")
    status, headers, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "status"})
    assert status == 299 and headers["x-resp"] == "fake" and b'"method": "GET"' in body
    status, headers, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "replace"})
    assert status == 200 and body == b"replaced"


async def test_response_interrupt_before_headers_is_clean_reply(setup):
    gw, up, host = setup
    status, _, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "reject-first"})
    assert (status, body) == (502, b"bad body")


async def test_response_interrupt_after_headers_closes_connection(tmp_path):
    async def handler(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")

    async def factory(specs, services):
        return FakeHost(specs, services)

    async with raw_upstream(handler) as up:
        async with run_gateway(yaml_for(tmp_path, up.port), tmp_path, filter_host_factory=factory) as gw:
            raw = await raw_exchange(gw.port(), b"GET /x HTTP/1.1\r\nHost: h\r\nx-fake-resp: reject-later\r\n\r\n",
                                     timeout=3)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"hello" in body and not body.endswith(b"0\r\n\r\n")    # cut off, no terminating chunk


async def test_callout_through_host_services(setup):
    gw, up, host = setup
    status, headers, body = await request("GET", gw.url("/x"), headers={"x-fake": "callout"})
    assert status == 200 and headers["x-callout-status"] == "200"
    assert b'"path": "/callout"' in body
    call = up.requests[0]
    assert call.header("host") == "auth.local" and call.header("x-call") == "1"
    assert host.services.has_cluster("backend") and not host.services.has_cluster("nope")


async def test_chain_bug_is_500_not_traceback(setup):
    gw, up, host = setup
    status, _, body = await request("GET", gw.url("/x"), headers={"x-fake": "boom"})
    assert status == 500 and b"Traceback" not in body and len(body) < 200


async def test_filter_metrics_and_redacted_config_on_admin(setup):
    gw, up, host = setup
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        async with s.get(gw.admin_url + "/config") as r:
            cfg = await r.json()
    assert '# TYPE wasmgate_filter_fake_total counter' in text
    assert 'wasmgate_filter_fake_total{filter="auth"} 7' in text
    auth = cfg["filters"][0]
    assert auth["config"] == {"api_token": "[redacted]", "mode": "strict"}
    assert "s3cret" not in str(cfg)


async def test_filter_load_error_starts_nothing(tmp_path):
    async with echo_upstream() as up:
        (tmp_path / "config.yaml").write_text(yaml_for(tmp_path, up.port))
        config = load_config(tmp_path / "config.yaml")

        async def failing(specs, services):
            raise FilterLoadError("auth", "f.wasm: not a wasm module")
        with pytest.raises(FilterLoadError, match='filter "auth"'):
            await Gateway.start(config, filter_host_factory=failing)


async def test_http_call_failures(tmp_path):
    from gateway.upstream import Upstreams
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def slow(reader, writer):
        await read_request_head(reader)
        await asyncio.sleep(3)

    async with raw_upstream(slow) as up:
        (tmp_path / "config.yaml").write_text(f"""
listeners: [{{name: main, port: 0}}]
clusters:
  - {{name: dead, endpoints: ["127.0.0.1:{dead}"]}}
  - {{name: slow, endpoints: ["127.0.0.1:{up.port}"]}}
routes: [{{name: r, cluster: dead}}]
""")
        ups = Upstreams(load_config(tmp_path / "config.yaml").clusters)
        with pytest.raises(CallFailed, match="refused"):
            await ups.http_call("dead", "GET", "/", "a", [], b"", 1.0)
        with pytest.raises(CallFailed, match="timeout"):
            await ups.http_call("slow", "POST", "/", "a", [], b"body", 0.2)
        with pytest.raises(CallFailed, match="no cluster"):
            await ups.http_call("ghost", "GET", "/", "a", [], b"", 1.0)
        ups.close()
        assert ups.pools["slow"].open == 0


async def test_upstream_error_reply_passes_the_chains_response_side(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    hosts = []

    async def factory(specs, services):
        hosts.append(FakeHost(specs, services))
        return hosts[-1]

    text = yaml_for(tmp_path, dead)
    async with run_gateway(text, tmp_path, filter_host_factory=factory) as gw:
        status, headers, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "status"})
        assert status == 299 and headers["x-resp"] == "fake" and b"upstream unreachable" in body
        status, headers, body = await request("GET", gw.url("/x"))
        assert status == 502 and b"upstream unreachable" in body
        status, _, body = await request("GET", gw.url("/x"), headers={"x-fake-resp": "reject-first"})
        assert (status, body) == (502, b"bad body")
    seen = hosts[0].response_headers[0]
    assert seen[0] == (":status", "502") and hget(seen, "content-type").startswith("text/plain")
    assert [log.status for _, log in hosts[0].finished] == [299, 502, 502]


@pytest.mark.parametrize("code,expected", [(99, 500), (101, 500), (0, 500), (1000, 500), (204, 204), (304, 304)])
async def test_local_reply_status_is_always_a_well_formed_final_response(setup, code, expected):
    gw, up, host = setup
    raw = await raw_exchange(gw.port(), f"GET /x HTTP/1.1\r\nHost: h\r\nx-fake: status-{code}\r\n\r\n"
                             "GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode(), timeout=3)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(f"HTTP/1.1 {expected} ".encode())
    if expected in (204, 304):
        assert b"content-length" not in first.lower() and rest.startswith(b"HTTP/1.1 200")
    else:
        assert rest.startswith(b"odd status body") and b"HTTP/1.1 200" in rest


async def test_http_call_returns_body_and_trailers(tmp_path):
    from gateway.upstream import Upstreams

    async def handler(reader, writer):
        while head := await read_request_head(reader):
            body = await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\nx-checksum: abc\r\n\r\n" % (len(body), body))
            await writer.drain()

    async with raw_upstream(handler) as up:
        (tmp_path / "config.yaml").write_text(f"""
listeners: [{{name: main, port: 0}}]
clusters: [{{name: svc, endpoints: ["127.0.0.1:{up.port}"]}}]
routes: [{{name: r, cluster: svc}}]
""")
        ups = Upstreams(load_config(tmp_path / "config.yaml").clusters)
        for _ in range(2):      # the second call reuses the pooled connection
            resp = await ups.http_call("svc", "POST", "/cb", "svc.local", [("x-a", "1")], b"payload", 2.0)
            assert (resp.status, resp.body) == (201, b"payload")
            assert ("x-up", "1") in resp.headers and resp.trailers == [("x-checksum", "abc")]
        assert ups.pools["svc"].open == 1
        ups.close()


async def test_reroute_on_a_header_a_route_matches_and_on_route_cache_cleared(tmp_path):
    """A header some route matches on, added by the chain, sends the request to that route's
    cluster; route_cache_cleared alone re-matches (to the same route: nothing it matches on
    changed)."""
    hosts = []

    async def factory(specs, services):
        hosts.append(FakeHost(specs, services))
        return hosts[-1]

    async with echo_upstream() as up, echo_upstream() as other:
        (tmp_path / "f.wasm").write_bytes(b"\0asm\1\0\0\0")
        text = f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
access_log: {{path: null}}
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:{up.port}"]}}
  - {{name: other, endpoints: ["127.0.0.1:{other.port}"], metadata: {{lb: {{zone: b}}}}}}
routes:
  - {{name: tagged, cluster: other, match: {{headers: {{x-added: "1"}}}}, metadata: {{p: {{k: v}}}}}}
  - {{name: filtered, cluster: backend, filters: [auth]}}
filters: [{{name: auth, wasm: f.wasm}}]
"""
        async with run_gateway(text, tmp_path, filter_host_factory=factory) as gw:
            router = gw.gateway.generation.router
            matched = []
            real_match = router.match
            router.match = lambda *a: matched.append(a[2]) or real_match(*a)
            status, _, _ = await request("GET", gw.url("/x"), headers={"x-fake": "add-header"})
            assert status == 200
            assert (len(up.requests), len(other.requests)) == (0, 1)
            info = hosts[0].streams[0].info
            assert (info.route_name, info.cluster_name) == ("tagged", "other")
            assert (info.route_metadata, info.cluster_metadata) == ({"p": {"k": "v"}}, {"lb": {"zone": "b"}})
            assert matched == ["/x", "/x"]                    # once before the chain, once after
            matched.clear()
            status, _, _ = await request("GET", gw.url("/y"))
            assert status == 200 and matched == ["/y"]         # untouched: no second match
            matched.clear()
            status, _, _ = await request("GET", gw.url("/z"), headers={"x-fake": "clear-route-cache"})
            assert status == 200 and matched == ["/z", "/z"]
            assert hosts[0].streams[-1].info.route_name == "filtered"
            assert len(up.requests) == 2


async def test_small_untouched_body_one_read_exact_length_connection_reused(setup):
    """A filter that edits the response headers (drops Content-Length) but not the body: the
    body is read in one piece, the client still gets its exact Content-Length, and the upstream
    connection goes back to the pool read to its end (the next request reuses it)."""
    gw, up, host = setup
    pool = gw.gateway.generation.upstreams.pools["backend"]
    async with aiohttp.ClientSession() as s:
        conns = []
        for i in range(2):
            async with s.get(gw.url(f"/small/{i}"), headers={"x-fake-resp": "drop-length"}) as r:
                body = await r.read()
                assert r.status == 200 and r.headers["content-length"] == str(len(body))
                assert f'"path": "/small/{i}"'.encode() in body
            idle = [c for conns_ in pool.idle.values() for c in conns_]
            assert len(idle) == 1
            conns.append(idle[0])
    assert conns[0] is conns[1]
