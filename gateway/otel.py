"""OpenTelemetry span export (``tracing.otlp_endpoint``): one SERVER span per request and a
child span per filter callback phase, POSTed as OTLP/HTTP protobuf by a thread of its own
(export never runs on the event loop). Imported only when configured.

The request's ids are chosen when it is routed (its span id is the parent-id the upstream's
traceparent carries). When the access log line is written, ``finish`` queues one record — the
ids, times and attributes the request already has, and the chain's phase times (abi/trace.py) —
and returns. The export thread wakes when ``BATCH_SPANS`` spans are queued or every
``SCHEDULE_DELAY_S``, encodes the records straight to the wire format (gateway/otlp_wire.py) and
POSTs them. That is the SDK's ``BatchSpanProcessor`` + ``OTLPSpanExporter`` behaviour (same
defaults: 2048 queued spans, batches of 512, 5 s delay, 5 s timeout, retries with backoff on
429/502/503/504 and connection errors) without the SDK's per-span objects and protobuf messages,
which cost 200–350 µs of CPU per request of seven spans, ten times this (``python -m bench.otel_cost``).

Memory stays bounded when the collector is slow or down: past ``MAX_QUEUE_SPANS`` queued spans a
request's spans are dropped and counted, and a batch whose export failed (after its retries) is
counted and let go; ``wasmgate_otlp_spans_total{outcome="exported|dropped|failed"}`` on
/metrics, and one warning per outage in the log. The resource is the SDK's
(``Resource.create``: ``service.name`` plus ``telemetry.sdk.*`` and ``OTEL_RESOURCE_ATTRIBUTES``).
Sampling: parent-based (a client's unsampled traceparent → no spans), else always on.
"""
from __future__ import annotations

import gzip
import http.client
import logging
import os
import ssl
import threading
import time
from collections import deque
from functools import lru_cache
from random import getrandbits
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.util.re import parse_env_headers

from abi.api import MetricSample

from .otlp_wire import (FLAGS_LOCAL_PARENT, FLAGS_REMOTE_PARENT, KIND_SERVER, Encoder, attribute_key, child_head,
                        child_span, name_and_kind, parent_field, span, status_error, string_attribute)

log = logging.getLogger("wasmgate.otel")

# The phase codes of the filter trace (abi/trace.py PHASES) as the callbacks they stand for.
CALLBACKS = {"rqh": "on_request_headers", "rqb": "on_request_body", "rqt": "on_request_trailers",
             "rsh": "on_response_headers", "rsb": "on_response_body", "rst": "on_response_trailers"}
# The SDK's defaults (OTEL_BSP_* and OTEL_EXPORTER_OTLP_TIMEOUT).
MAX_QUEUE_SPANS = 2048
BATCH_SPANS = 512
SCHEDULE_DELAY_S = 5.0
EXPORT_TIMEOUT_S = 5.0
_RETRY_STATUS = frozenset((429, 502, 503, 504))
_FIRST_BACKOFF_S = 0.5
_HEADERS = {"Content-Type": "application/x-protobuf", "User-Agent": "wasmgate-otlp"}
_OUTCOMES = ("exported", "dropped", "failed")
_URL_PATH, _REQUEST_ID, _FILTERS = (attribute_key(k) for k in ("url.path", "wasmgate.request_id", "wasmgate.filters"))


@lru_cache(maxsize=1024)
def _name_kind(name: str) -> bytes:
    """A request span's name (``<METHOD> <route>``: few) and kind, encoded."""
    return name_and_kind(name, KIND_SERVER)


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
    def __init__(self, endpoint: str, service_name: str, *, max_queue: int = MAX_QUEUE_SPANS,
                 batch: int = BATCH_SPANS, delay: float = SCHEDULE_DELAY_S, timeout: float = EXPORT_TIMEOUT_S):
        self.url = traces_url(endpoint)
        resource = Resource.create({"service.name": service_name})
        self.encoder = Encoder(resource.attributes.items(), "wasmgate")
        self.max_queue, self.batch, self.delay, self.timeout = max_queue, batch, delay, timeout
        self.counts = dict.fromkeys(_OUTCOMES, 0)          # spans, by outcome
        self._queue: deque = deque()
        self._queued = 0                                   # spans in _queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._dropping = False
        self._post = _Poster(self.url, timeout)

    # -- the request path ----------------------------------------------------------------------

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
        """The request is over: queue its span and its filter phases' (encoded by the thread)."""
        end = time.time_ns()
        # Those most requests share (encoded once: Encoder.attributes), then those of this one.
        shared = (("http.request.method", ex.method), ("http.route", ex.route),
                  ("http.response.status_code", ex.status), ("client.address", client.rpartition(":")[0]))
        if ex.upstream:
            shared += (("server.address", ex.upstream),)
        stream = rt.stream
        phases: list = []
        summary = None
        if stream is not None:
            phases = stream.trace_phases()
            summary = stream.trace_summary()
        # A 4xx is the client's error, not the server span's (OTel HTTP semantic conventions).
        error = (ex.error or "") if ex.status >= 500 else None
        self._put((rt.trace_id, rt.span_id, rt.parent_id, rt.state, rt.span, rt.start_ns, end,
                   (shared, ex.target.partition("?")[0], ex.rid, summary), error,
                   phases, rt.start_ns - rt.start_perf), 1 + len(phases))

    def _put(self, record: tuple, spans: int) -> None:
        if self._pid != os.getpid():          # first span of this process (a worker forks)
            self._start_thread()
        with self._lock:
            if self._queued + spans > self.max_queue:
                self.counts["dropped"] += spans
                if not self._dropping:
                    self._dropping = True
                    log.warning("OTLP export to %s: %d spans queued, dropping new spans until it catches up "
                                "(counted in wasmgate_otlp_spans_total{outcome=\"dropped\"})", self.url, self._queued)
                return
            self._queue.append(record)
            self._queued += spans
            if self._queued >= self.batch and not self._wake.is_set():   # set() takes a lock
                self._wake.set()

    # -- the export thread ---------------------------------------------------------------------

    def _start_thread(self) -> None:
        self._pid = os.getpid()
        self._queue.clear()                   # a parent's records are the parent's to send
        self._queued = 0
        self._thread = threading.Thread(target=self._run, name="wasmgate-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            full = self._wake.wait(self.delay)
            self._wake.clear()
            stopping = self._stop.is_set()
            # Woken by a full batch: full batches only (a part-filled one waits for more spans,
            # or for the timer); on the timer and at shutdown, everything.
            while self._queued >= self.batch or (self._queue and (stopping or not full)):
                records, spans = self._take()
                if not self._export(records, spans, retry=not stopping) and stopping:
                    self._give_up()          # shutdown waits for one failed try, not one per batch
            if stopping:
                return

    def _take(self) -> tuple[list, int]:
        """Up to a batch of records (at least one) off the queue, with their span count."""
        out: list = []
        n = 0
        with self._lock:
            q = self._queue
            while q and (not out or n + 1 + len(q[0][9]) <= self.batch):
                rec = q.popleft()
                out.append(rec)
                n += 1 + len(rec[9])
            self._queued -= n
        return out, n

    def _export(self, records: list, spans: int, retry: bool) -> bool:
        body = self.encoder.request([s for rec in records for s in self._encode(rec)])
        if self._post.send(body, retry=retry, stop=self._stop):
            self.counts["exported"] += spans
            self._dropping = False
            return True
        self.counts["failed"] += spans
        return False

    def _give_up(self) -> None:
        with self._lock:
            self.counts["failed"] += self._queued
            self._queue.clear()
            self._queued = 0

    def _encode(self, rec: tuple) -> list[bytes]:
        trace_hex, span_hex, parent_hex, state, name, start, end, attrs, error, phases, base = rec
        tid, me = bytes.fromhex(trace_hex), bytes.fromhex(span_hex)
        enc = self.encoder
        children = enc.children
        head, parent = child_head(tid), parent_field(me)
        out = []
        for filt, phase, action, calls, s, e in phases:
            key = (filt, phase, action, calls)
            parts = children.get(key) or enc.child_parts(
                key, f"{filt} {CALLBACKS[phase]}", [("wasmgate.filter", filt), ("wasmgate.phase", phase),
                                                    ("wasmgate.action", action), ("wasmgate.calls", calls)],
                action == "F")
            out.append(child_span(head, _span_id().to_bytes(8, "big"), parent, parts, base + s, base + e))
        shared, path, rid, summary = attrs
        at = enc.attributes(shared) + string_attribute(_URL_PATH, path) + string_attribute(_REQUEST_ID, rid)
        if summary is not None:
            at += string_attribute(_FILTERS, summary)
        out.append(span(tid, me, state, bytes.fromhex(parent_hex) if parent_hex else b"",
                        _name_kind(name), start, end, at,
                        status_error(error or None) if error is not None else b"",
                        FLAGS_REMOTE_PARENT if parent_hex else FLAGS_LOCAL_PARENT))
        return out

    # -- the rest of the gateway ---------------------------------------------------------------

    def samples(self) -> list[MetricSample]:
        out = [MetricSample("wasmgate_otlp_spans_total", "counter", float(self.counts[o]), {"outcome": o},
                            "Spans by what became of them: exported to the OTLP collector, dropped (queue "
                            "full) or failed (the collector refused or did not answer)") for o in _OUTCOMES]
        out.append(MetricSample("wasmgate_otlp_queued_spans", "gauge", float(self._queued), {},
                                "Spans waiting for the OTLP export thread"))
        return out

    def shutdown(self) -> None:
        """Send what is queued (one try per batch, each bounded by the export timeout; after a
        failed one the rest is counted failed) and stop the export thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join()
        self._post.close()


def _env(name: str) -> str:
    """An OTLP exporter setting as the SDK's exporter reads it: OTEL_EXPORTER_OTLP_TRACES_<name>,
    else OTEL_EXPORTER_OTLP_<name>."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}", "")


class _Poster:
    """POSTs export bodies to the collector over one kept-alive connection (the export thread's).
    Honours the SDK exporter's environment: ``…_HEADERS`` (``k=v,k2=v2``, URL-encoded),
    ``…_COMPRESSION`` (``gzip``), ``…_CERTIFICATE`` (the CA file for https), ``…_CLIENT_CERTIFICATE``
    and ``…_CLIENT_KEY`` (mTLS)."""

    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        self.url = url
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname or "", u.port
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.timeout = timeout
        self.headers = {**_HEADERS, **parse_env_headers(_env("HEADERS"), liberal=True)}
        self.gzip = _env("COMPRESSION").strip().lower() == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self._conn: http.client.HTTPConnection | None = None
        self._failing = False

    def _connect(self) -> http.client.HTTPConnection:
        if self.https:
            context = ssl.create_default_context(cafile=_env("CERTIFICATE") or None)
            if _env("CLIENT_CERTIFICATE"):
                context.load_cert_chain(_env("CLIENT_CERTIFICATE"), _env("CLIENT_KEY") or None)
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def send(self, body: bytes, retry: bool, stop: threading.Event) -> bool:
        """Whether the collector took ``body`` (2xx); retries, with exponential backoff within
        the export timeout, what the OTLP spec calls retryable."""
        deadline = time.monotonic() + self.timeout
        backoff = _FIRST_BACKOFF_S
        if self.gzip:
            body = gzip.compress(body, compresslevel=6)
        while True:
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.request("POST", self.path, body, self.headers)
                resp = self._conn.getresponse()
                resp.read()
                if resp.will_close:
                    self.close()
                if 200 <= resp.status < 300:
                    if self._failing:
                        self._failing = False
                        log.info("OTLP export to %s works again", self.url)
                    return True
                error, retryable = f"HTTP {resp.status} {resp.reason}", resp.status in _RETRY_STATUS
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if reused:           # the collector closed the idle kept-alive connection: once more
                    continue
                error, retryable = f"{type(e).__name__}: {e}", True
            if not (retry and retryable) or time.monotonic() + backoff > deadline or stop.wait(backoff):
                if not self._failing:
                    self._failing = True
                    log.warning("OTLP export to %s failed (%s): spans are dropped until it answers "
                                "(counted in wasmgate_otlp_spans_total{outcome=\"failed\"})", self.url, error)
                return False
            backoff *= 2

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
