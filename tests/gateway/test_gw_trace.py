"""The per-request filter trace (access log `filters`, x-wasmgate-trace), W3C trace context
upstream and OTLP/HTTP span export — real gateway, real filters (filters/dist + a trapping
WAT module), a real echo upstream and a real OTLP/HTTP receiver on 127.0.0.1."""
from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import wasmtime
from aiohttp import web

from gateway.tracing import parse_traceparent, valid_tracestate
from tests.abi.abi_wat import Wat
from tests.helpers import echo_upstream, run_gateway

DIST = Path(__file__).resolve().parents[2] / "filters" / "dist"
KEY = "trace-key-0123456789"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def trap_wasm(tmp_path: Path) -> Path:
    """A filter whose on_request_headers traps (wasm `unreachable`)."""
    path = tmp_path / "trap.wasm"
    path.write_bytes(wasmtime.wat2wasm(Wat().on("proxy_on_request_headers", "unreachable").render()))
    return path


def config(tmp_path: Path, up_port: int, *, access_log: dict | None = None, admin: dict | None = None,
           tracing: dict | None = None) -> str:
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0, **(admin or {})},
        "access_log": access_log or {"path": None},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": [{"name": "trap", "match": {"prefix": "/trap"}, "cluster": "backend",
                    "filters": ["auth", "trap"]},
                   {"name": "main", "cluster": "backend", "filters": ["auth", "headers"]}],
        "filters": [
            {"name": "auth", "wasm": str(DIST / "auth.wasm"),
             "config": {"api_key": {"header": "x-api-key", "keys": [{"key": KEY, "identity": "tester"}]}}},
            {"name": "headers", "wasm": str(DIST / "headers.wasm"),
             "config": {"response": {"set": {"x-served-by": "wasmgate"}}}},
            {"name": "trap", "wasm": str(trap_wasm(tmp_path)), "failure_policy": "fail_closed"},
        ],
    }
    if tracing is not None:
        doc["tracing"] = tracing
    return json.dumps(doc)


def no_us(summary: str) -> str:
    """The summary with its µs figures (which vary) replaced by N."""
    return re.sub(r"us=\d+", "us=N", summary)


ALLOWED = "auth:rqh=C,rsh=C,m=h,us=N;headers:rqh=C,rsh=C,m=h,us=N"
# auth changes no header of a request it rejects (no identity header was sent to remove)
REJECTED = "auth:rqh=L401,rsh=C,us=N;headers:-"
TRAPPED = "auth:rqh=C,rsh=C,m=h,us=N;trap:rqh=F,us=N,fail=trap"


async def test_access_log_filters_field(tmp_path):
    log_path = tmp_path / "access.log"
    async with echo_upstream() as up:
        async with run_gateway(config(tmp_path, up.port, access_log={"path": str(log_path)}), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY}) as r:
                    assert r.status == 200 and r.headers["x-served-by"] == "wasmgate"
                    assert "x-wasmgate-trace" not in r.headers      # never without the debug header
                async with s.get(gw.url("/ok")) as r:
                    assert r.status == 401
                async with s.get(gw.url("/trap"), headers={"x-api-key": KEY}) as r:
                    assert r.status == 503
            gw.gateway.access_log.flush()
            lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["path"], e["status"]) for e in lines] == [("/ok", 200), ("/ok", 401), ("/trap", 503)]
    assert [no_us(e["filters"]) for e in lines] == [ALLOWED, REJECTED, TRAPPED]
    assert all(int(us) < 1_000_000 for e in lines for us in re.findall(r"us=(\d+)", e["filters"]))


async def test_access_log_filters_off(tmp_path):
    log_path = tmp_path / "access.log"
    async with echo_upstream() as up:
        text = config(tmp_path, up.port, access_log={"path": str(log_path), "filters": False})
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY}) as r:
                    assert r.status == 200
            gw.gateway.access_log.flush()
            entry = json.loads(log_path.read_text())
    assert "filters" not in entry and entry["status"] == 200


@pytest.mark.parametrize("cidrs, honoured", [(["127.0.0.0/8"], True), (["10.0.0.0/8", "::1/128"], False),
                                             ([], False)])
async def test_debug_header_only_from_allowed_cidrs(tmp_path, cidrs, honoured):
    async with echo_upstream() as up:
        text = config(tmp_path, up.port, admin={"trace_allowed_cidrs": cidrs})
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                for path, key, expected in [("/ok", KEY, ALLOWED), ("/ok", None, REJECTED),
                                            ("/trap", KEY, TRAPPED)]:
                    headers = {"x-wasmgate-trace": "1", **({"x-api-key": key} if key else {})}
                    async with s.get(gw.url(path), headers=headers) as r:
                        got = r.headers.get("x-wasmgate-trace")
                        assert (no_us(got) if got else None) == (expected if honoured else None)
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY}) as r:
                    assert "x-wasmgate-trace" not in r.headers          # not asked for
    # Neither filters nor the upstream ever see the request header.
    assert up.requests and all(rq.header("x-wasmgate-trace") is None for rq in up.requests)


def test_traceparent_validation():
    assert parse_traceparent([f"00-{TRACE_ID}-{PARENT_ID}-01"]) == (TRACE_ID, PARENT_ID, 1)
    assert parse_traceparent([f" 00-{TRACE_ID}-{PARENT_ID}-00\t"]) == (TRACE_ID, PARENT_ID, 0)
    # A future version may carry more fields after a "-"; version 00 may not.
    assert parse_traceparent([f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds"]) == (TRACE_ID, PARENT_ID, 1)
    for bad in [f"00-{TRACE_ID}-{PARENT_ID}-01-extra", f"ff-{TRACE_ID}-{PARENT_ID}-01",
                f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", f"00-{'0' * 32}-{PARENT_ID}-01",
                f"00-{TRACE_ID}-{'0' * 16}-01", f"00-{TRACE_ID}-{PARENT_ID}-1", f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
                "", f"cc-{TRACE_ID}-{PARENT_ID}-01.x"]:
        assert parse_traceparent([bad]) is None, bad
    assert parse_traceparent([f"00-{TRACE_ID}-{PARENT_ID}-01"] * 2) is None     # two headers
    assert valid_tracestate(["rojo=00f067aa0ba902b7", " congo=t61rcWkgMzE,"]) == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert valid_tracestate(["tenant@vendor=x"]) == "tenant@vendor=x"
    for bad in [["Rojo=1"], ["a=1,a=2"], ["a"], ["a=b=c"], [",".join(f"k{i}=v" for i in range(33))]]:
        assert valid_tracestate(bad) is None, bad


TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


async def test_traceparent_propagated_and_created(tmp_path):
    async with echo_upstream() as up:
        async with run_gateway(config(tmp_path, up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                sent = [
                    {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "rojo=00f067aa0ba902b7"},
                    {},                                                           # absent: created
                    {"traceparent": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", "tracestate": "rojo=1"},  # invalid
                ]
                for h in sent:
                    async with s.get(gw.url("/ok"), headers={"x-api-key": KEY, **h}) as r:
                        assert r.status == 200
    given, created, replaced = up.requests
    m = TRACEPARENT.fullmatch(given.header("traceparent"))
    assert m and m.group(1) == TRACE_ID and m.group(2) != PARENT_ID and m.group(3) == "01"
    assert given.header("tracestate") == "rojo=00f067aa0ba902b7"
    for rq in (created, replaced):
        m = TRACEPARENT.fullmatch(rq.header("traceparent"))
        assert m and m.group(1) not in (TRACE_ID, TRACE_ID.upper(), "0" * 32) and m.group(2) != "0" * 16
        assert m.group(3) == "00"           # no exporter: this gateway samples nothing
        assert rq.header("tracestate") is None          # only beside a valid traceparent
    assert sum(1 for k, _ in given.headers if k.lower() == "traceparent") == 1


async def test_propagation_off_passes_headers_through(tmp_path):
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with echo_upstream() as up:
        async with run_gateway(config(tmp_path, up.port, tracing={"propagate": False}), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY, "traceparent": incoming,
                                                         "tracestate": "rojo=1"}) as r:
                    assert r.status == 200
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY}) as r:
                    assert r.status == 200
    assert up.requests[0].header("traceparent") == incoming and up.requests[0].header("tracestate") == "rojo=1"
    assert up.requests[1].header("traceparent") is None


@asynccontextmanager
async def otlp_receiver(statuses: tuple[int, ...] = (), headers: list | None = None):
    """An OTLP/HTTP collector on 127.0.0.1:0 keeping every ExportTraceServiceRequest it gets
    (and into ``headers`` each POST's headers); it answers the first POSTs with ``statuses`` (an
    error: spans not taken), then 200."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                          ExportTraceServiceResponse)
    got: list = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        got.append(msg)
        if headers is not None:
            headers.append(request.headers)
        if len(got) <= len(statuses):
            return web.Response(status=statuses[len(got) - 1])
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", got
    finally:
        await runner.cleanup()


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


async def test_otlp_export(tmp_path):
    async with otlp_receiver() as (endpoint, got), echo_upstream() as up:
        text = config(tmp_path, up.port, tracing={"otlp_endpoint": endpoint, "service_name": "edge-test"})
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/ok?q=1"), headers={"x-api-key": KEY,
                                                             "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as r:
                    assert r.status == 200
                async with s.get(gw.url("/trap"), headers={"x-api-key": KEY}) as r:
                    assert r.status == 503
                unsampled = f"00-{TRACE_ID[::-1]}-{PARENT_ID}-00"     # the client's sampler said no
                async with s.get(gw.url("/ok"), headers={"x-api-key": KEY, "traceparent": unsampled}) as r:
                    assert r.status == 200
        # Gateway.stop flushed the batch processor: everything has been received now.
        spans, services = [], set()
        for msg in got:
            for rs in msg.resource_spans:
                services |= {kv.value.string_value for kv in rs.resource.attributes if kv.key == "service.name"}
                for ss in rs.scope_spans:
                    spans += list(ss.spans)
    assert services == {"edge-test"}
    servers = {s.name: s for s in spans if s.kind == s.SPAN_KIND_SERVER}
    assert set(servers) == {"GET main", "GET trap"}
    assert not [s for s in spans if s.trace_id.hex() == TRACE_ID[::-1]]             # not sampled: none
    m = TRACEPARENT.fullmatch(up.requests[-1].header("traceparent"))
    assert m and m.group(1) == TRACE_ID[::-1] and m.group(2) != PARENT_ID and m.group(3) == "00"
    ok = servers["GET main"]
    assert ok.trace_id.hex() == TRACE_ID and ok.parent_span_id.hex() == PARENT_ID
    attrs = _attrs(ok)
    assert attrs["http.response.status_code"] == 200 and attrs["http.route"] == "main"
    assert attrs["url.path"] == "/ok" and attrs["http.request.method"] == "GET"
    assert no_us(attrs["wasmgate.filters"]) == ALLOWED
    # The upstream's traceparent names the gateway's span as its parent.
    assert up.requests[0].header("traceparent") == f"00-{TRACE_ID}-{ok.span_id.hex()}-01"
    children = sorted((s.name, _attrs(s)["wasmgate.action"]) for s in spans
                      if s.parent_span_id == ok.span_id)
    assert children == [("auth on_request_headers", "C"), ("auth on_response_headers", "C"),
                        ("headers on_request_headers", "C"), ("headers on_response_headers", "C")]
    for s in spans:
        if s.parent_span_id == ok.span_id:
            assert s.trace_id == ok.trace_id and ok.start_time_unix_nano <= s.start_time_unix_nano
            assert s.start_time_unix_nano <= s.end_time_unix_nano <= ok.end_time_unix_nano
    trap = servers["GET trap"]
    assert trap.parent_span_id == b"" and trap.trace_id.hex() != TRACE_ID       # a new trace
    assert trap.status.code == trap.status.STATUS_CODE_ERROR
    failed = [s for s in spans if s.parent_span_id == trap.span_id and s.name == "trap on_request_headers"]
    assert len(failed) == 1 and _attrs(failed[0])["wasmgate.action"] == "F"
    assert failed[0].status.code == failed[0].status.STATUS_CODE_ERROR


def test_config_errors(tmp_path):
    from gateway.config import ConfigError, parse_config
    text = f"""
listeners: [{{name: a, port: 0}}]
admin:
  port: 0
  trace_allowed_cidrs: [10.0.0.0/8, not-a-net]
clusters: [{{name: c, endpoints: ["127.0.0.1:1"]}}]
routes: [{{name: r, cluster: c}}]
access_log: {{path: null, filters: maybe}}
tracing:
  otlp_endpoint: grpc://collector:4317
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "config.yaml", tmp_path)
    assert e.value.errors == [
        'config.yaml:5 admin.trace_allowed_cidrs[1]: "not-a-net" is not an IP network (write 10.0.0.0/8, '
        '127.0.0.1 or ::1/128)',
        "config.yaml:8 access_log.filters: expected true or false, got 'maybe'",
        'config.yaml:10 tracing.otlp_endpoint: "grpc://collector:4317" is not an http:// or https:// URL '
        '(the OTLP/HTTP collector, e.g. http://127.0.0.1:4318)',
    ]


def test_no_opentelemetry_import_unless_configured(tmp_path):
    """Tracing off (no otlp_endpoint): the gateway never imports OpenTelemetry."""
    import subprocess
    import sys
    code = f"""
import sys
from pathlib import Path
from gateway.config import parse_config
from gateway.server import Gateway
config = parse_config('''
listeners: [{{name: a, port: 0}}]
clusters: [{{name: c, endpoints: ["127.0.0.1:1"]}}]
routes: [{{name: r, cluster: c}}]
access_log: {{path: null}}
''', "config.yaml", Path({str(tmp_path)!r}))
gw = Gateway(config)
assert gw.tracer.active and gw.tracer.exporter is None
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"



def test_begin_makes_a_request_trace_only_when_something_records(tmp_path):
    """Propagation alone (the default) still sends a traceparent upstream, without per-request
    trace state; the access log's filters field (as the debug header or export) needs one."""
    from gateway.config import parse_config
    from gateway.tracing import Tracer, TraceHeaders
    plain = Tracer(parse_config(config(tmp_path, 9), "c.yaml", tmp_path))
    logged = Tracer(parse_config(config(tmp_path, 9, access_log={"path": str(tmp_path / "a.log")}), "c.yaml",
                                 tmp_path))
    for tracer, records in ((plain, False), (logged, True)):
        got = TraceHeaders()
        got.traceparent.append(f"00-{TRACE_ID}-{PARENT_ID}-01")
        headers = [("accept", "*/*")]
        rt = tracer.begin(got, "127.0.0.1", headers, "GET", "main")
        assert (rt is not None) == records and (rt is None or rt.records)
        assert [n for n, _ in headers] == ["accept", "traceparent"]
        trace_id, parent_id, flags = parse_traceparent([headers[-1][1]])
        assert trace_id == TRACE_ID and parent_id != PARENT_ID and flags == 1     # continued, sampled
        headers = []
        rt = tracer.begin(TraceHeaders(), "127.0.0.1", headers, "GET", "main")
        assert (rt is not None) == records
        trace_id, _, flags = parse_traceparent([headers[-1][1]])
        assert trace_id != TRACE_ID and flags == 0                                # a new trace, not sampled
