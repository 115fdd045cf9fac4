"""`python -m bench.otel_cost`: where OTLP export's CPU goes, per request of the bench chain
(7 spans: one per request, one per filter callback phase of auth → ratelimit → headers).

Three figures, in one process, with the SDK gateway/otel.py uses:
  - the 7 spans built through ``Tracer.start_span`` / ``end`` (the SDK's usual way);
  - the 7 spans built as ``ReadableSpan`` objects (what gateway/otel.py hands the processor);
  - the SDK's OTLP protobuf encoding of them (``encode_spans``; the exporter's thread does it).
No network, no processor thread: the encoder's cost is what the export thread adds per request.
"""
from __future__ import annotations

import argparse
import time

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
    from random import getrandbits
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


if __name__ == "__main__":
    main()
