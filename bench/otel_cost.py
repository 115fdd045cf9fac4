"""`python -m bench.otel_cost`: where OTLP export's CPU goes, per request of the bench chain
(7 spans: one per request, one per filter callback phase of auth → ratelimit → headers).

Figures in one process, the SDK's ways and gateway/otel.py's:
  - the 7 spans built through ``Tracer.start_span`` / ``end`` (the SDK's usual way);
  - the 7 spans built as ``ReadableSpan`` objects (what gateway/otel.py handed the SDK's
    processor before it encoded spans itself);
  - the SDK's OTLP protobuf encoding of them (``encode_spans``; the exporter's thread does it);
  - gateway/otel.py: ``SpanExporter.finish`` (the request path: one queued record) and the
    export thread's encoding of those records to the same protobuf bytes (gateway/otlp_wire.py).
No network, no export thread: the encoders' cost is what the export thread adds per request.
"""
from __future__ import annotations

import argparse
import os
import time
from random import getrandbits

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, set_span_in_context

PHASES = [(f, cb) for f in ("auth", "ratelimit", "headers") for cb in ("on_request_headers", "on_response_headers")]
REQUEST_ATTRS = {"http.request.method": "GET", "url.path": "/bench", "http.route": "bench",
                 "http.response.status_code": 200, "client.address": "127.0.0.1",
                 "wasmgate.request_id": "0123456789abcdef0123456789abcdef",
                 "wasmgate.filters": "auth:rqh=C,rsh=C,m=h,us=24;ratelimit:rqh=C,rsh=C,m=h,us=36;"
                                     "headers:rqh=C,rsh=C,m=h,us=18"}


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list = []

    def export(self, spans) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def via_tracer(n: int) -> float:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(SimpleSpanProcessor(_Keep()))
    tracer = provider.get_tracer("wasmgate")
    t0 = time.process_time()
    for _ in range(n):
        span = tracer.start_span("GET bench", kind=SpanKind.SERVER, start_time=time.time_ns())
        ctx = set_span_in_context(span)
        for f, cb in PHASES:
            child = tracer.start_span(f"{f} {cb}", context=ctx, kind=SpanKind.INTERNAL, start_time=time.time_ns(),
                                      attributes={"wasmgate.filter": f, "wasmgate.phase": "rqh",
                                                  "wasmgate.action": "C", "wasmgate.calls": 1})
            child.end(end_time=time.time_ns())
        span.set_attributes(REQUEST_ATTRS)
        span.end()
    return (time.process_time() - t0) / n * 1e6


def as_readable(n: int) -> tuple[float, list]:
    resource, scope, flags = Resource.create({"service.name": "bench"}), InstrumentationScope("wasmgate"), TraceFlags(1)
    out: list = []
    t0 = time.process_time()
    for _ in range(n):
        tid = getrandbits(128)
        me = SpanContext(tid, getrandbits(64), False, flags)
        now = time.time_ns()
        for f, cb in PHASES:
            out.append(ReadableSpan(f"{f} {cb}", SpanContext(tid, getrandbits(64), False, flags), parent=me,
                                    resource=resource, instrumentation_scope=scope, kind=SpanKind.INTERNAL,
                                    attributes={"wasmgate.filter": f, "wasmgate.phase": "rqh",
                                                "wasmgate.action": "C", "wasmgate.calls": 1},
                                    start_time=now, end_time=now + 1000))
        out.append(ReadableSpan("GET bench", me, parent=None, resource=resource, instrumentation_scope=scope,
                                kind=SpanKind.SERVER, attributes=REQUEST_ATTRS, start_time=now,
                                end_time=time.time_ns()))
    return (time.process_time() - t0) / n * 1e6, out


def wasmgate(n: int) -> tuple[float, float]:
    """gateway/otel.py: µs/request of ``finish`` (queueing) and of encoding the queued records."""
    from types import SimpleNamespace

    from gateway.otel import SpanExporter
    exporter = SpanExporter("http://127.0.0.1:1", "bench", max_queue=10**9, batch=10**9, delay=3600)
    exporter._pid = os.getpid()          # as if its export thread ran: none does, the records stay queued
    t = time.perf_counter_ns()
    phases = [(f, p, "C", 1, t + i * 1000, t + i * 1000 + 500) for i, (f, p) in
              enumerate((f, p) for f in ("auth", "ratelimit", "headers") for p in ("rqh", "rsh"))]
    stream = SimpleNamespace(trace_phases=lambda: list(phases), trace_summary=lambda: REQUEST_ATTRS["wasmgate.filters"])
    ex = SimpleNamespace(method="GET", target="/bench", route="bench", status=200,
                         rid=REQUEST_ATTRS["wasmgate.request_id"], upstream="127.0.0.1:8081", error="")
    rts = [SimpleNamespace(trace_id=f"{getrandbits(128):032x}", span_id=f"{getrandbits(64):016x}", parent_id="",
                           state=None, span="GET bench", start_ns=time.time_ns(), start_perf=t, stream=stream)
           for _ in range(n)]
    t0 = time.process_time()
    for rt in rts:
        exporter.finish(rt, ex, "127.0.0.1:40000")
    finish_us = (time.process_time() - t0) / n * 1e6
    t0 = time.process_time()
    while True:
        records, _ = exporter._take()
        if not records:
            break
        exporter.encoder.request([s for rec in records for s in exporter._encode(rec)])
    return finish_us, (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="requests per measurement")
    n = ap.parse_args().n
    tracer_us = via_tracer(n)
    readable_us, spans = as_readable(n)
    t0 = time.process_time()
    for i in range(0, len(spans), 512):            # the batch processor's export batches
        encode_spans(spans[i:i + 512]).SerializeToString()
    encode_us = (time.process_time() - t0) / n * 1e6
    per = len(PHASES) + 1
    print(f"{per} spans per request, {n} requests")
    print(f"  Tracer.start_span/end:  {tracer_us:8.1f} µs/request")
    print(f"  ReadableSpan objects:   {readable_us:8.1f} µs/request")
    print(f"  SDK OTLP encoding:      {encode_us:8.1f} µs/request ({encode_us / per:.1f} per span)")
    finish_us, ours_us = wasmgate(n)
    print(f"  wasmgate finish():      {finish_us:8.1f} µs/request (request path: one queued record)")
    print(f"  wasmgate OTLP encoding: {ours_us:8.1f} µs/request ({ours_us / per:.1f} per span; export thread)")


if __name__ == "__main__":
    main()
