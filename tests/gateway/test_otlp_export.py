"""gateway/otel.py's OTLP export. Encoding (gateway/otlp_wire.py): the bytes we write parse to
exactly the ExportTraceServiceRequest the OpenTelemetry SDK's own encoder (``encode_spans``) makes
of the same spans as ReadableSpans — ids, parents, tracestate, times, kinds, attributes of every
type, statuses, flags, resource and scope. Export: bounded queue with counted drops, retries of a
collector answering 503, a gateway whose collector is down (real sockets on 127.0.0.1)."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from types import SimpleNamespace

import aiohttp

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.otel import CALLBACKS, SpanExporter
from gateway.otlp_wire import Encoder, attributes, key_value
from tests.gateway.test_gw_trace import KEY, config, otlp_receiver
from tests.helpers import echo_upstream, run_gateway

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
T0 = 1_764_000_000_000_000_000

# (trace id, span id, parent id ("" = none), tracestate, name, status, error, phases)
REQUESTS = [
    ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "a0b1c2d3e4f50617", "rojo=00f067aa0ba902b7,congo=t61",
     "GET main", 200, None, [("auth", "rqh", "C", 1, 100, 2_100), ("auth", "rsh", "C", 1, 9_000, 9_500),
                             ("headers", "rsb", "P", 3, 9_600, 30_000)]),
    ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "", None,
     "POST trap", 503, "filter trap failed: unreachable", [("trap", "rqh", "F", 1, 50, 700)]),
    ("0af7651916cd43dd8448eb211c80319d", "b7ad6b7169203332", "", None, "GET héllo", 502, "", []),
    ("0af7651916cd43dd8448eb211c80319e", "b7ad6b7169203333", "1111111111111111", None,
     "GET main", 401, None, [("auth", "rqh", "L401", 1, 10, 90)]),
]


def _records() -> list[tuple]:
    out = []
    for tid, sid, parent, state, name, status, error, phases in REQUESTS:
        shared = (("http.request.method", name.split()[0]), ("http.route", name.split()[1]),
                  ("http.response.status_code", status), ("client.address", "127.0.0.1"))
        if status != 401:
            shared += (("server.address", "127.0.0.1:8081"),)
        attrs = (shared, "/ü/x", "r" * 32, f"{name}:rqh=C,us=1" if phases else None)
        out.append((tid, sid, parent, state, name, T0, T0 + 50_000, attrs, error, phases, T0))
    return out


def _sdk_spans(resource: Resource, children: list[list[int]]) -> list[ReadableSpan]:
    """The same requests as the SDK's ReadableSpans (what gateway/otel.py handed the SDK before)."""
    scope = InstrumentationScope("wasmgate")
    out = []
    for rec, ids in zip(_records(), children):
        tid_hex, sid_hex, parent_hex, state, name, start, end, attrs, error, phases, base = rec
        tid = int(tid_hex, 16)
        me = SpanContext(tid, int(sid_hex, 16), False, SAMPLED, TraceState.from_header([state]) if state else None)
        for (filt, phase, action, calls, s, e), cid in zip(phases, ids):
            out.append(ReadableSpan(
                f"{filt} {CALLBACKS[phase]}", SpanContext(tid, cid, False, SAMPLED), parent=me, resource=resource,
                instrumentation_scope=scope, kind=SpanKind.INTERNAL,
                attributes={"wasmgate.filter": filt, "wasmgate.phase": phase, "wasmgate.action": action,
                            "wasmgate.calls": calls},
                start_time=base + s, end_time=base + e, status=Status(StatusCode.ERROR) if action == "F" else None))
        parent = SpanContext(tid, int(parent_hex, 16), True, SAMPLED) if parent_hex else None
        shared, path, rid, summary = attrs
        attributes = {**dict(shared), "url.path": path, "wasmgate.request_id": rid}
        if summary is not None:
            attributes["wasmgate.filters"] = summary
        out.append(ReadableSpan(name, me, parent=parent, resource=resource, instrumentation_scope=scope,
                                kind=SpanKind.SERVER, attributes=attributes, start_time=start, end_time=end,
                                status=Status(StatusCode.ERROR, error or None) if error is not None else None))
    return out


def test_spans_encode_as_the_sdk_does():
    exporter = SpanExporter("http://127.0.0.1:1", "edge-test")
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(exporter.encoder.request([s for rec in _records() for s in exporter._encode(rec)]))
    # The child span ids are random: take ours into the SDK's spans.
    spans = list(ours.resource_spans[0].scope_spans[0].spans)
    children, i = [], 0
    for rec in REQUESTS:
        children.append([int.from_bytes(s.span_id, "big") for s in spans[i:i + len(rec[7])]])
        i += len(rec[7]) + 1
    sdk = encode_spans(_sdk_spans(Resource.create({"service.name": "edge-test"}), children))
    assert len(spans) == 9
    assert ours == sdk


def test_attribute_values_of_every_type():
    from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
    values = {"s": "ü", "empty": "", "t": True, "f": False, "zero": 0, "big": 2**62, "neg": -5, "d": 1.25}
    ours = Span()
    ours.ParseFromString(attributes(values.items()))
    assert list(ours.attributes) == list(_encode_attributes(values))
    assert key_value("k", "v") == _encode_attributes({"k": "v"})[0].SerializeToString()


def test_encoding_caches_are_bounded():
    enc = Encoder([("service.name", "x")], "wasmgate")
    for n in range(5000):
        enc.child_parts(("f", "rsb", "C", n), "f on_response_body", [("wasmgate.calls", n)], False)
        enc.attributes((("wasmgate.calls", n),))
    assert len(enc.children) <= 4096 and len(enc._attrs) <= 4096


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RT = SimpleNamespace(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7", parent_id="",
                     state=None, span="GET main", start_ns=T0, start_perf=0, stream=None)
EX = SimpleNamespace(method="GET", target="/x?y", route="main", status=200, rid="r", upstream="", error="")


def test_export_thread_drops_and_counts_when_the_queue_is_full():
    """A collector that never answers: queued spans stay within the bound, the rest are counted."""
    exporter = SpanExporter(f"http://127.0.0.1:{_closed_port()}", "edge-test", max_queue=20, batch=8, delay=3600)
    exporter._pid = os.getpid()     # as if its thread ran: none does, the queue only fills
    for _ in range(25):
        exporter.finish(RT, EX, "127.0.0.1:5000")
    assert exporter._queued == 20 and exporter.counts["dropped"] == 5
    exporter._stop.set()            # shutdown's signal; the export loop run here, not in a thread
    exporter._run()                 # one try of the first batch (8 spans): refused; the other 12 given up
    assert exporter._queued == 0
    assert exporter.counts == {"exported": 0, "dropped": 5, "failed": 20}
    samples = {s.labels.get("outcome"): s.value for s in exporter.samples()}
    assert samples == {"exported": 0.0, "dropped": 5.0, "failed": 20.0, None: 0.0}


async def test_collector_answering_503_is_retried():
    """The first POST gets 503 (retryable): the export thread backs off and sends it again."""
    async with otlp_receiver(statuses=(503,)) as (endpoint, got):
        exporter = SpanExporter(endpoint, "edge-test", batch=3, delay=3600)
        try:
            for _ in range(3):
                exporter.finish(RT, EX, "127.0.0.1:5000")
            deadline = time.monotonic() + 30
            while exporter.counts["exported"] < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await asyncio.to_thread(exporter.shutdown)
    assert [sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans) for msg in got] == [3, 3]
    assert exporter.counts == {"exported": 3, "dropped": 0, "failed": 0}


async def test_exporter_environment(monkeypatch):
    """The SDK exporter's OTEL_EXPORTER_OTLP_* headers and gzip compression settings hold."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=edge,authorization=Bearer%20abc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    seen: list = []
    async with otlp_receiver(headers=seen) as (endpoint, got):
        exporter = SpanExporter(endpoint, "edge-test")
        exporter.finish(RT, EX, "127.0.0.1:5000")
        await asyncio.to_thread(exporter.shutdown)
    assert exporter.counts["exported"] == 1 and len(got) == 1 and got[0].resource_spans[0].scope_spans[0].spans
    assert seen[0]["x-tenant"] == "edge" and seen[0]["authorization"] == "Bearer abc"
    assert seen[0]["content-encoding"] == "gzip"


async def test_gateway_serves_while_the_collector_is_down(tmp_path):
    """Nothing listens at otlp_endpoint: requests are served as usual, the spans wait in the
    bounded queue (on /metrics), and at shutdown the one try fails and they are counted."""
    async with echo_upstream() as up:
        text = config(tmp_path, up.port, tracing={"otlp_endpoint": f"http://127.0.0.1:{_closed_port()}"})
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.get(gw.url("/ok"), headers={"x-api-key": KEY}) as r:
                        assert r.status == 200
                async with s.get(f"{gw.admin_url}/metrics") as r:
                    metrics = await r.text()
            exporter = gw.gateway.tracer.exporter
    # 3 requests × (the request span + auth and headers, request and response headers each).
    assert "wasmgate_otlp_queued_spans 15" in metrics
    assert 'wasmgate_otlp_spans_total{outcome="exported"} 0' in metrics
    assert exporter.counts == {"exported": 0, "dropped": 0, "failed": 15}
