"""Request tracing: W3C trace context upstream, the filter trace in the access log and the
``x-wasmgate-trace`` debug header, and (when configured) spans exported by gateway/otel.py.

One ``Tracer`` per gateway (built from the config at start, like the access log). Per request
``Tracer.begin`` takes the client's trace headers (collected by request_head.upstream_headers),
decides what is recorded, and returns the headers the upstream (and the filters) get; a
``RequestTrace`` rides on the Exchange until ``log_exchange`` (``RequestTrace.done``).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
from typing import Any

from .config import Config
from .random_ids import random_hex

log = logging.getLogger("wasmgate.tracing")

DEBUG_HEADER = "x-wasmgate-trace"

# W3C Trace Context §3.2: version-traceid-parentid-flags, lower-case hex. A future version
# (not ff) may append fields after a "-"; version 00 has exactly these four.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# §3.3.1: list-member = key "=" value; at most 32 members.
_TS_KEY = r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
_TS_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TS_MEMBER = re.compile(f"{_TS_KEY}={_TS_VALUE}")
_TS_MAX_MEMBERS = 32


class TraceHeaders:
    """What a client sent of the trace headers (filled by request_head.upstream_headers)."""
    __slots__ = ("traceparent", "tracestate", "debug")

    def __init__(self) -> None:
        self.traceparent: list[str] = []
        self.tracestate: list[str] = []
        self.debug = False          # x-wasmgate-trace: 1


def parse_traceparent(values: list[str]) -> tuple[str, str, int] | None:
    """(trace-id, parent-id, flags) of a valid traceparent; None when absent or invalid
    (also when the request had more than one)."""
    if len(values) != 1:
        return None
    m = _TRACEPARENT.fullmatch(values[0].strip(" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def valid_tracestate(values: list[str]) -> str | None:
    """The tracestate headers joined (§3.3: several headers are one list), or None when a
    member is malformed, a key repeats or there are more than 32 members."""
    joined = ",".join(values)
    members = [m.strip(" \t") for m in joined.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > _TS_MAX_MEMBERS:
        return None
    keys = set()
    for m in members:
        if _TS_MEMBER.fullmatch(m) is None:
            return None
        keys.add(m.partition("=")[0])
    if len(keys) != len(members):
        return None
    return ",".join(members)


def in_cidrs(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class RequestTrace:
    """One request's tracing state, from ``Tracer.begin`` until ``done``."""
    __slots__ = ("stream", "header", "log", "span", "trace_id", "span_id", "parent_id", "flags",
                 "state", "start_ns", "start_perf")

    def __init__(self, header: bool, log_filters: bool):
        self.stream: Any = None      # the filter stream (abi.api.HttpStream) once it is opened
        self.header = header         # answer with x-wasmgate-trace
        self.log = log_filters       # the access log's filters field
        self.span: str | None = None     # the request span's name when it is exported (sampled)
        self.trace_id = ""
        self.span_id = ""
        self.parent_id = ""
        self.flags = 0
        self.state: str | None = None    # the client's tracestate (valid beside its traceparent)
        self.start_ns = 0
        self.start_perf = 0

    @property
    def records(self) -> bool:
        """Whether the filter chain must record its trace."""
        return self.header or self.log or self.span is not None

    def summary(self) -> str:
        s = self.stream
        return s.trace_summary() if s is not None else ""



class Tracer:
    """The gateway's tracing settings, and the span exporter when one is configured."""

    def __init__(self, config: Config):
        t = config.tracing
        self.propagate = t.propagate
        self.log_filters = config.access_log_path is not None and config.access_log_filters
        admin = config.admin
        self.debug_networks = tuple(ipaddress.ip_network(c, strict=False)
                                    for c in (admin.trace_allowed_cidrs if admin else ()))
        self.exporter: Any = None
        if t.otlp_endpoint:
            from .otel import SpanExporter     # deferred: no OpenTelemetry import unless configured
            self.exporter = SpanExporter(t.otlp_endpoint, t.service_name)
        # Something to do per request beyond stripping x-wasmgate-trace.
        self.active = self.propagate or self.log_filters or bool(self.debug_networks) or self.exporter is not None
        # The default settings: nothing recorded, only a traceparent for the upstream.
        self._propagate_only = self.propagate and not (self.log_filters or self.debug_networks or self.exporter)

    def begin(self, got: TraceHeaders, client_ip: str, headers: list[tuple[str, str]],
              method: str, route: str) -> RequestTrace | None:
        """Start tracing a request: append traceparent/tracestate to ``headers`` (propagation on)
        and start its span (export on; named "``method`` ``route``"). ``got``: the client's
        trace headers, already removed from ``headers``. None when nothing of the request is
        recorded (no export, no filter trace asked for): the trace headers are all it gets."""
        if self._propagate_only and not got.traceparent:
            # Most requests: the last case below (a new trace, not sampled), decided in one test.
            ids = random_hex(24)
            headers.append(("traceparent", f"00-{ids[:32]}-{ids[32:]}-00"))
            return None
        header = got.debug and bool(self.debug_networks) and in_cidrs(client_ip, self.debug_networks)
        incoming = parse_traceparent(got.traceparent) if got.traceparent else None
        state = valid_tracestate(got.tracestate) if incoming is not None and got.tracestate else None
        exporter = self.exporter
        rt = RequestTrace(header, self.log_filters) if header or self.log_filters or exporter is not None \
            else None
        if not self.propagate:           # not ours to change: the client's go on as they were
            headers += [("traceparent", v) for v in got.traceparent]
            headers += [("tracestate", v) for v in got.tracestate]
        if exporter is not None:
            rt.start_ns = time.time_ns()
            rt.start_perf = time.perf_counter_ns()
            exporter.start(rt, f"{method} {route}", incoming, state)
            trace_id, span_id, flags = rt.trace_id, rt.span_id, rt.flags
        elif not self.propagate:
            return rt
        elif incoming is not None:
            trace_id, _, flags = incoming
            flags &= 0x01                # level 1: only "sampled" is defined; others are zeroed
            span_id = random_hex(8)
        else:
            # A new trace; not sampled: this gateway records no span of it, and must not make
            # every upstream record every request.
            ids = random_hex(24)         # trace id (16 bytes) and span id (8) in one draw
            trace_id, span_id, flags = ids[:32], ids[32:], 0
        if self.propagate:
            headers.append(("traceparent", f"00-{trace_id}-{span_id}-{flags:02x}"))
            if state:
                headers.append(("tracestate", state))
        return rt

    def done(self, rt: RequestTrace, ex: Any, client: str) -> None:
        """The request is over (logged): end and hand its spans to the exporter."""
        if rt.span is not None:
            self.exporter.finish(rt, ex, client)

    def samples(self) -> list[Any]:
        """The span exporter's counters for /metrics (none when export is off)."""
        return self.exporter.samples() if self.exporter is not None else []

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.shutdown()
