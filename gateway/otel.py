"""OpenTelemetry span export (``tracing.otlp_endpoint``): one SERVER span per request and a
child span per filter callback phase, sent over OTLP/HTTP by the SDK's batch span processor
(its own thread: export never runs on the event loop). Imported only when configured.

The request span starts when the request is routed (its span id is the parent-id the
upstream's traceparent carries) and ends when the access log line is written; the filter
spans are made then, from the times the chain recorded (abi/trace.py), so recording them
costs the request path nothing more than the filter trace itself.
"""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                                 TraceState, set_span_in_context)

# The phase codes of the filter trace (abi/trace.py PHASES) as the callbacks they stand for.
CALLBACKS = {"rqh": "on_request_headers", "rqb": "on_request_body", "rqt": "on_request_trailers",
             "rsh": "on_response_headers", "rsb": "on_response_body", "rst": "on_response_trailers"}
EXPORT_TIMEOUT_S = 5.0


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a base endpoint (``http://collector:4318``) gets
    ``/v1/traces`` as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL already ending in it is kept."""
    path = urlsplit(endpoint).path.rstrip("/")
    return endpoint if path.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


class SpanExporter:
    def __init__(self, endpoint: str, service_name: str):
        self.url = traces_url(endpoint)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=self.url, timeout=EXPORT_TIMEOUT_S)))
        self.tracer = self.provider.get_tracer("wasmgate")

    def start(self, rt: Any, name: str, incoming: tuple[str, str, int] | None, state: str | None) -> None:
        """Start the request span (child of the client's traceparent, if valid) and put its
        ids on ``rt`` (the sampler is the SDK default: parent-based, else always on)."""
        ctx = None
        if incoming is not None:
            trace_id, parent_id, flags = incoming
            parent = SpanContext(int(trace_id, 16), int(parent_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(flags & 0x01),
                                 trace_state=TraceState.from_header([state]) if state else None)
            ctx = set_span_in_context(NonRecordingSpan(parent))
            rt.parent_id = parent_id
        span = self.tracer.start_span(name, context=ctx, kind=SpanKind.SERVER, start_time=rt.start_ns)
        sc = span.get_span_context()
        rt.span = span
        rt.trace_id = format(sc.trace_id, "032x")
        rt.span_id = format(sc.span_id, "016x")
        rt.flags = int(sc.trace_flags) & 0x01

    def finish(self, rt: Any, ex: Any, client: str) -> None:
        span = rt.span
        if not span.is_recording():          # not sampled (the client's traceparent said so)
            return
        stream = rt.stream
        if stream is not None:
            parent = set_span_in_context(span)
            base, perf0 = rt.start_ns, rt.start_perf
            for filt, phase, action, calls, start, end in stream.trace_phases():
                child = self.tracer.start_span(f"{filt} {CALLBACKS[phase]}", context=parent,
                                               kind=SpanKind.INTERNAL, start_time=base + start - perf0,
                                               attributes={"wasmgate.filter": filt, "wasmgate.phase": phase,
                                                           "wasmgate.action": action, "wasmgate.calls": calls})
                if action == "F":
                    child.set_status(Status(StatusCode.ERROR))
                child.end(end_time=base + end - perf0)
            span.set_attribute("wasmgate.filters", stream.trace_summary())
        span.set_attributes({"http.request.method": ex.method, "url.path": ex.target.partition("?")[0],
                             "http.route": ex.route, "http.response.status_code": ex.status,
                             "client.address": client.rpartition(":")[0], "wasmgate.request_id": ex.rid})
        if ex.upstream:
            span.set_attribute("server.address", ex.upstream)
        if ex.status >= 500:             # a 4xx is the client's error, not the server span's
            span.set_status(Status(StatusCode.ERROR, ex.error or None))
        span.end(end_time=time.time_ns())

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the export timeout) and stop the export thread."""
        self.provider.shutdown()
