"""OpenTelemetry span export (``tracing.otlp_endpoint``): one SERVER span per request and a
child span per filter callback phase, sent over OTLP/HTTP by the SDK's ``OTLPSpanExporter``
behind its ``BatchSpanProcessor`` (its own thread: export never runs on the event loop).
Imported only when configured.

The request's ids are chosen when it is routed (its span id is the parent-id the upstream's
traceparent carries); its spans are built when the access log line is written, from the times
the chain recorded (abi/trace.py), as the SDK's finished-span objects (``ReadableSpan``) handed
straight to the batch processor. Going through ``Tracer.start_span`` instead (sampler, context,
locks, a live ``Span`` per phase) costs ten times the CPU for the same seven spans
(``python -m bench.otel_cost``), and the spans are complete once the request is over anyway.
Sampling is the SDK default's: parent-based (a client's unsampled traceparent → no spans),
else always on.
"""
from __future__ import annotations

import time
from random import getrandbits
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

# The phase codes of the filter trace (abi/trace.py PHASES) as the callbacks they stand for.
CALLBACKS = {"rqh": "on_request_headers", "rqb": "on_request_body", "rqt": "on_request_trailers",
             "rsh": "on_response_headers", "rsb": "on_response_body", "rst": "on_response_trailers"}
EXPORT_TIMEOUT_S = 5.0
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ERROR = Status(StatusCode.ERROR)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a base endpoint (``http://collector:4318``) gets
    ``/v1/traces`` as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL already ending in it is kept."""
    path = urlsplit(endpoint).path.rstrip("/")
    return endpoint if path.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


def _span_id() -> int:
    while True:
        n = getrandbits(64)
        if n:
            return n


class SpanExporter:
    def __init__(self, endpoint: str, service_name: str):
        self.url = traces_url(endpoint)
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("wasmgate")
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url, timeout=EXPORT_TIMEOUT_S))

    def start(self, rt: Any, name: str, incoming: tuple[str, str, int] | None, state: str | None) -> None:
        """Choose the request span's ids (a child of the client's valid traceparent, else a new
        trace) and put them on ``rt``; ``rt.span`` (its name) is set only when it is sampled."""
        if incoming is not None:
            rt.trace_id, rt.parent_id, flags = incoming
            rt.flags = flags & 0x01
        else:
            rt.trace_id = f"{getrandbits(128) or 1:032x}"
            rt.flags = 1
        rt.span_id = f"{_span_id():016x}"
        if rt.flags:
            rt.span = name
            rt.state = state

    def finish(self, rt: Any, ex: Any, client: str) -> None:
        """The request is over: its span and its filter phases' spans to the batch processor."""
        tid = int(rt.trace_id, 16)
        me = SpanContext(tid, int(rt.span_id, 16), False, _SAMPLED,
                         TraceState.from_header([rt.state]) if rt.state else None)
        parent = SpanContext(tid, int(rt.parent_id, 16), True, _SAMPLED) if rt.parent_id else None
        resource, scope, on_end = self.resource, self.scope, self.processor.on_end
        attrs = {"http.request.method": ex.method, "url.path": ex.target.partition("?")[0],
                 "http.route": ex.route, "http.response.status_code": ex.status,
                 "client.address": client.rpartition(":")[0], "wasmgate.request_id": ex.rid}
        if ex.upstream:
            attrs["server.address"] = ex.upstream
        stream = rt.stream
        if stream is not None:
            base = rt.start_ns - rt.start_perf
            for filt, phase, action, calls, start, end in stream.trace_phases():
                on_end(ReadableSpan(
                    f"{filt} {CALLBACKS[phase]}", SpanContext(tid, _span_id(), False, _SAMPLED), parent=me,
                    resource=resource, instrumentation_scope=scope, kind=SpanKind.INTERNAL,
                    attributes={"wasmgate.filter": filt, "wasmgate.phase": phase, "wasmgate.action": action,
                                "wasmgate.calls": calls},
                    start_time=base + start, end_time=base + end, status=_ERROR if action == "F" else None))
            attrs["wasmgate.filters"] = stream.trace_summary()
        # A 4xx is the client's error, not the server span's (OTel HTTP semantic conventions).
        status = Status(StatusCode.ERROR, ex.error or None) if ex.status >= 500 else None
        on_end(ReadableSpan(rt.span, me, parent=parent, resource=resource, instrumentation_scope=scope,
                            kind=SpanKind.SERVER, attributes=attrs, start_time=rt.start_ns,
                            end_time=time.time_ns(), status=status))

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the export timeout) and stop the export thread."""
        self.processor.shutdown()
