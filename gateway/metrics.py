"""A small Prometheus registry for the gateway's own numbers (no client library needed).

Counters are plain dict increments on the hot path; rendering happens only on GET /metrics.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Iterable

from abi.api import MetricSample

# Upstream latency buckets in seconds: sub-millisecond loopback up to long backends.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)   # (route, status)
        self.errors: defaultdict[str, int] = defaultdict(int)                 # kind
        self.upstream_latency: dict[str, Histogram] = {}                      # cluster
        self.active_connections = 0
        self.active_requests = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def request_done(self, route: str, status: int, bytes_in: int, bytes_out: int) -> None:
        self.requests[(route, status)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def upstream(self, cluster: str, seconds: float) -> None:
        h = self.upstream_latency.get(cluster)
        if h is None:
            h = self.upstream_latency[cluster] = Histogram()
        h.observe(seconds)

    def render(self, extra: Iterable[MetricSample] = (), gauges: Iterable[MetricSample] = ()) -> str:
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
        out.append(f"wasmgate_active_connections {self.active_connections}")
        _family(out, "wasmgate_active_requests", "gauge", "Requests in flight.")
        out.append(f"wasmgate_active_requests {self.active_requests}")
        _family(out, "wasmgate_body_bytes_total", "counter", "Body bytes received from and sent to clients.")
        out.append(f'wasmgate_body_bytes_total{{direction="in"}} {self.bytes_in}')
        out.append(f'wasmgate_body_bytes_total{{direction="out"}} {self.bytes_out}')
        render_samples(out, list(gauges) + list(extra))
        return "\n".join(out) + "\n"


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
