"""One /metrics for the whole gateway, however many worker processes serve it.

The request path's counters (requests, errors, upstream latency, body bytes) live in each
worker slot's counters file (gateway/counter_page.py, in the ops store's directory): the
request path writes them there directly, GET /metrics reads every slot's file, and a worker
restarted in a slot continues the same file — so a worker killed with SIGKILL loses none of
them, and none counts twice.

The rest — gauges (connections, pools), the filters' own per-process counters (failures,
rebuilds) and the reload state — is a msgpack snapshot each worker publishes every
PUBLISH_INTERVAL_S under its slot's key in the ops store (gateway/workers.py); GET /metrics
publishes its own fresh one. A restarted worker adds its predecessor's last snapshot's counters
to its own, so those counters stay monotonic but lose the increments of the dead worker's last
interval. Gauges of a slot whose process is gone read 0.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

from abi.api import MetricSample

from .control import ControlledGateway
from .metrics import Counts, Metrics, upgraded_gauge
from .reload import state_of

log = logging.getLogger("wasmgate.metrics")

PUBLISH_INTERVAL_S = 1.0
# Gauges whose sum over workers means nothing: the gateway-wide value is the largest one.
MAX_GAUGES = {"wasmgate_upstream_endpoint_ejected", "wasmgate_redis_endpoint_ejected"}

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]


def snapshot(gw: ControlledGateway, inherited: dict[str, Any] | None = None) -> dict[str, Any]:
    """This worker's numbers as plain data (msgpack-able); ``inherited`` = predecessor's counts."""
    m: Metrics = gw.metrics
    gen = gw.generation
    local: list[MetricSample] = _pool_gauges(gen) + [upgraded_gauge(m)] + gw.tracer.samples()
    host = gen.filter_host
    if host is not None:
        # A host without the local/shared split: all its numbers count as this process's.
        fn = getattr(host, "local_metrics", None) or host.metrics
        try:
            local += list(fn())
        except Exception as e:               # filter metrics must not take the gateway's down
            m.error("filter_metrics")
            log.warning("filter metrics failed: %s", e)
    snap = {
        "pid": os.getpid(),
        "t": time.time(),
        "active": [m.active_connections, m.active_requests],
        "samples": [_pack(s) for s in local],
        "reload": _reload_view(gw),
    }
    if inherited:
        snap = merge_counters(snap, inherited)
    return snap


def _reload_view(gw: ControlledGateway) -> dict[str, Any]:
    st = state_of(gw)
    return {"generation": st.generation, "fingerprint": st.fingerprint, "ok": st.ok, "failed": st.failed,
            "last_ts": st.last_reload_ts, "last_ok": st.last_attempt_ok, "errors": st.last_errors}


def _pool_gauges(gen: Any) -> list[MetricSample]:
    pools = gen.upstreams.pools
    out = [MetricSample("wasmgate_upstream_connections", "gauge", float(p.open), {"cluster": name},
                        "Open upstream connections (busy and idle).") for name, p in pools.items()]
    out += [MetricSample("wasmgate_upstream_endpoint_ejected", "gauge", 1.0 if p.is_ejected(ep) else 0.0,
                         {"cluster": name, "endpoint": str(ep)},
                         "1 while an endpoint is skipped after refusing connections.")
            for name, p in pools.items() for ep in p.cluster.endpoints]
    return out + gen.upstreams.redis.samples() + gen.upstreams.grpc.samples()


def _pack(s: MetricSample) -> list[Any]:
    return [s.name, s.kind, s.value, s.labels, s.help]


def _unpack(v: list[Any]) -> MetricSample:
    return MetricSample(v[0], v[1], float(v[2]), dict(v[3]), v[4])


def merge_counters(snap: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``snap`` with a dead predecessor's counters added (gauges are not inherited)."""
    out = dict(snap)
    counters = [v for v in base.get("samples", []) if v[1] == "counter"]
    out["samples"] = [_pack(s) for s in sum_samples([_unpack(v) for v in counters + list(snap["samples"])])]
    rl = dict(snap["reload"])
    prev = base.get("reload", {})
    rl["ok"] = rl["ok"] + prev.get("ok", 0)
    rl["failed"] = rl["failed"] + prev.get("failed", 0)
    out["reload"] = rl
    return out


def sum_samples(samples: Iterable[MetricSample]) -> list[MetricSample]:
    """Same name and labels → one sample: counters and most gauges add up, MAX_GAUGES take the max."""
    acc: dict[SampleKey, MetricSample] = {}
    for s in samples:
        key = (s.name, s.kind, tuple(sorted(s.labels.items())))
        have = acc.get(key)
        if have is None:
            acc[key] = MetricSample(s.name, s.kind, s.value, dict(s.labels), s.help)
        elif s.name in MAX_GAUGES:
            have.value = max(have.value, s.value)
        else:
            have.value += s.value
    return list(acc.values())


def pid_alive(pid: int) -> bool:
    """Whether a worker process still exists (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render(gw: ControlledGateway, snaps: list[dict[str, Any]], counts: Counts,
           extra: dict[str, Any] | None = None) -> str:
    """Prometheus text: ``counts`` (summed over every slot's counters) and the sum of ``snaps``
    (one per worker slot; the first is this worker)."""
    active = [0, 0]
    samples: list[MetricSample] = []
    for snap in snaps:
        live = pid_alive(snap["pid"])
        if live:
            active = [a + b for a, b in zip(active, snap["active"])]
        samples += [_unpack(v) for v in snap["samples"] if live or v[1] == "counter"]
    samples = sum_samples(samples) + _reload_samples(snaps, extra or {})
    host = gw.generation.filter_host
    if host is not None:
        shared = getattr(host, "shared_metrics", None)
        try:
            # Filter-defined metrics live in the (gateway-wide) store: counted once, not per worker.
            samples += list(shared()) if shared is not None else []
        except Exception as e:
            gw.metrics.error("filter_metrics")
            log.warning("filter metrics failed: %s", e)
    return counts.render(active[0], active[1], extra=samples)


def _reload_samples(snaps: list[dict[str, Any]], extra: dict[str, Any]) -> list[MetricSample]:
    rl = [s["reload"] for s in snaps if pid_alive(s["pid"])] or [snaps[0]["reload"]]
    out = [
        MetricSample("wasmgate_reloads_total", "counter", float(sum(s["reload"]["ok"] for s in snaps)),
                     {"result": "ok"}, "Config reload attempts per worker, by result."),
        MetricSample("wasmgate_reloads_total", "counter", float(sum(s["reload"]["failed"] for s in snaps)),
                     {"result": "failed"}, "Config reload attempts per worker, by result."),
        MetricSample("wasmgate_config_generation", "gauge", float(max(r["generation"] for r in rl)), {},
                     "Config generation of this worker process (1 = as started; +1 per applied reload)."),
        MetricSample("wasmgate_config_last_reload_timestamp_seconds", "gauge",
                     float(max(r["last_ts"] for r in rl)), {},
                     "Unix time of the last applied reload (0: none since start)."),
        MetricSample("wasmgate_config_last_reload_ok", "gauge", float(min(int(r["last_ok"]) for r in rl)), {},
                     "0 while the last reload attempt of some worker was refused."),
    ]
    by_fp: dict[str, int] = {}
    for r in rl:
        by_fp[r["fingerprint"]] = by_fp.get(r["fingerprint"], 0) + 1
    out += [MetricSample("wasmgate_config_workers", "gauge", float(n), {"fingerprint": fp},
                         "Live workers serving each config (fingerprint = config text + wasm sha256s).")
            for fp, n in sorted(by_fp.items())]
    for name, (kind, value, help_text) in extra.items():
        out.append(MetricSample(name, kind, float(value), {}, help_text))
    return out
