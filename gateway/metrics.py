"""A small Prometheus registry for the gateway's own numbers (no client library needed).

The request path's counters live in a CounterPage (gateway/counter_page.py): a memory mapping
that a worker process's successor continues and its siblings read; one process alone keeps it
in private memory. An increment is one store into the mapping. Rendering happens only on
GET /metrics, from ``Counts`` — plain numbers, one worker's or several workers' sum.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Iterable

from abi.api import MetricSample

from .counter_page import CounterPage, Key

# Upstream latency buckets in seconds: sub-millisecond loopback up to long backends.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_SLOTS = len(BUCKETS) + 2           # one count per bucket incl. +Inf, then the sum in ns


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0


class Counts:
    """Counter values as plain numbers: one worker's, or the sum over workers (``add``)."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)   # (route, status)
        self.errors: defaultdict[str, int] = defaultdict(int)                 # kind
        self.upstream_latency: dict[str, Histogram] = {}                      # cluster
        self.upgraded: defaultdict[str, int] = defaultdict(int)               # route
        self.bytes_in = 0
        self.bytes_out = 0

    @classmethod
    def from_page(cls, items: Iterable[tuple[Key, list[int]]]) -> "Counts":
        c = cls()
        for key, values in items:
            kind = key[0]
            if kind == "r":
                c.requests[(key[1], key[2])] += values[0]
            elif kind == "e":
                c.errors[key[1]] += values[0]
            elif kind == "l" and len(values) == _LATENCY_SLOTS:
                h = Histogram()
                h.counts = values[:-1]
                h.count = sum(h.counts)
                h.total = values[-1] / 1e9
                c.upstream_latency[key[1]] = h
            elif kind == "b":
                c.bytes_in += values[0]
                c.bytes_out += values[1]
            elif kind == "u":
                c.upgraded[key[1]] += values[0]
        return c

    def add(self, other: "Counts") -> None:
        for k, n in other.requests.items():
            self.requests[k] += n
        for k, n in other.errors.items():
            self.errors[k] += n
        for k, n in other.upgraded.items():
            self.upgraded[k] += n
        for cluster, h in other.upstream_latency.items():
            mine = self.upstream_latency.setdefault(cluster, Histogram())
            mine.counts = [a + b for a, b in zip(mine.counts, h.counts)]
            mine.total += h.total
            mine.count += h.count
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out

    def render(self, active_connections: int = 0, active_requests: int = 0,
               extra: Iterable[MetricSample] = ()) -> str:
        out: list[str] = []
        _family(out, "wasmgate_requests_total", "counter", "Requests answered, by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'wasmgate_requests_total{{route="{_esc(route)}",status="{status}"}} {n}')
        _family(out, "wasmgate_errors_total", "counter", "Errors by kind.")
        for kind, n in sorted(self.errors.items()):
            out.append(f'wasmgate_errors_total{{kind="{_esc(kind)}"}} {n}')
        _family(out, "wasmgate_upstream_latency_seconds", "histogram",
                "Time from sending a request upstream to its response headers.")
        for cluster, h in sorted(self.upstream_latency.items()):
            lab = f'cluster="{_esc(cluster)}"'
            cum = 0
            for bound, c in zip(BUCKETS, h.counts):
                cum += c
                out.append(f'wasmgate_upstream_latency_seconds_bucket{{{lab},le="{bound}"}} {cum}')
            out.append(f'wasmgate_upstream_latency_seconds_bucket{{{lab},le="+Inf"}} {h.count}')
            out.append(f"wasmgate_upstream_latency_seconds_sum{{{lab}}} {h.total:.6f}")
            out.append(f"wasmgate_upstream_latency_seconds_count{{{lab}}} {h.count}")
        _family(out, "wasmgate_active_connections", "gauge", "Open downstream connections.")
        out.append(f"wasmgate_active_connections {active_connections}")
        _family(out, "wasmgate_active_requests", "gauge", "Requests in flight.")
        out.append(f"wasmgate_active_requests {active_requests}")
        _family(out, "wasmgate_body_bytes_total", "counter", "Body bytes received from and sent to clients.")
        out.append(f'wasmgate_body_bytes_total{{direction="in"}} {self.bytes_in}')
        out.append(f'wasmgate_body_bytes_total{{direction="out"}} {self.bytes_out}')
        _family(out, "wasmgate_upgraded_connections_total", "counter",
                "Connections switched to another protocol (WebSocket...) after a 101, by route.")
        for route, n in sorted(self.upgraded.items()):
            out.append(f'wasmgate_upgraded_connections_total{{route="{_esc(route)}"}} {n}')
        render_samples(out, list(extra))
        return "\n".join(out) + "\n"


class Metrics:
    """The request path's counters (in a CounterPage) and this process's gauges."""

    def __init__(self, page: CounterPage | None = None) -> None:
        self.page = page or CounterPage()
        self._index()
        self.active_connections = 0
        self.active_requests = 0
        self.active_upgraded = 0            # spliced (upgraded) connections open now

    def _index(self) -> None:
        # Slot of each key seen, one dict per kind: the hot path's lookup stays one dict.get.
        self._requests: dict[tuple[str, int], int] = {}
        self._errors: dict[str, int] = {}
        self._latency: dict[str, int] = {}
        self._upgraded: dict[str, int] = {}
        self._bytes = self.page.slot(("b",), 2)

    def request_done(self, route: str, status: int, bytes_in: int, bytes_out: int) -> None:
        i = self._requests.get((route, status))
        if i is None:
            i = self._requests[(route, status)] = self.page.slot(("r", route, status))
        v = self.page.values
        v[i] += 1
        v[self._bytes] += bytes_in
        v[self._bytes + 1] += bytes_out

    def error(self, kind: str) -> None:
        i = self._errors.get(kind)
        if i is None:
            i = self._errors[kind] = self.page.slot(("e", kind))
        self.page.values[i] += 1

    def upgraded(self, route: str) -> None:
        i = self._upgraded.get(route)
        if i is None:
            i = self._upgraded[route] = self.page.slot(("u", route))
        self.page.values[i] += 1

    def upstream(self, cluster: str, seconds: float) -> None:
        i = self._latency.get(cluster)
        if i is None:
            i = self._latency[cluster] = self.page.slot(("l", cluster), _LATENCY_SLOTS)
        v = self.page.values
        v[i + bisect.bisect_left(BUCKETS, seconds)] += 1
        v[i + _LATENCY_SLOTS - 1] += int(seconds * 1e9)

    def move_to(self, page: CounterPage) -> None:
        """Count in ``page`` from now on, carrying over what was counted so far (added to what
        ``page`` already holds: a restarted worker's predecessor's counts)."""
        old = self.page
        for key, values in old.items():
            base = page.slot(key, len(values))
            v = page.values
            for j, n in enumerate(values):
                v[base + j] += n
        self.page = page
        self._index()
        old.close()

    def counts(self) -> Counts:
        return Counts.from_page(self.page.items())

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        return self.counts().requests

    @property
    def errors(self) -> dict[str, int]:
        return self.counts().errors

    def render(self, extra: Iterable[MetricSample] = ()) -> str:
        return self.counts().render(self.active_connections, self.active_requests,
                                    [upgraded_gauge(self)] + list(extra))


def upgraded_gauge(m: Metrics) -> MetricSample:
    return MetricSample("wasmgate_upgraded_connections_active", "gauge", float(m.active_upgraded), {},
                        "Upgraded (spliced) connections open now.")


def render_samples(out: list[str], samples: list[MetricSample]) -> None:
    """Samples from elsewhere (pools, filters), grouped into families with one # TYPE each.

    Histogram samples arrive as name_bucket / name_sum / name_count; their family is `name`.
    Order within a family is kept (bucket bounds ascend as given).
    """
    families: dict[str, list[MetricSample]] = {}
    for s in samples:
        families.setdefault(_family_name(s), []).append(s)
    for family in sorted(families):
        group = families[family]
        kind = group[0].kind if group[0].kind in ("counter", "gauge", "histogram") else "untyped"
        _family(out, family, kind, group[0].help)
        for s in group:
            labels = ",".join(f'{k}="{_esc(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {_num(s.value)}" if labels else f"{s.name} {_num(s.value)}")


def _family_name(s: MetricSample) -> str:
    if s.kind == "histogram":
        for suffix in ("_bucket", "_sum", "_count"):
            if s.name.endswith(suffix):
                return s.name[: -len(suffix)]
    return s.name


def _num(v: float) -> str:
    # "%g" would print 1234567 as 1.23457e+06: integers must stay exact.
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    if help_text:
        out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
