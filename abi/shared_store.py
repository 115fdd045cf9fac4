"""Shared data (§5.4), shared queues (§5.5) and filter-defined metrics (§5.6).

Everything that outlives one filter instance and is shared between filters lives behind
``SharedStore`` so a cross-worker backend can replace ``LocalStore`` without touching the
host. Methods return proxy statuses (abi.enums.Status) exactly as the host hands them to
the guest, so a backend decides semantics in one place.
"""
from __future__ import annotations

import re
import threading
from collections import deque
from typing import Callable, Protocol

from .api import MetricSample
from .enums import MetricType, Status

QueueCallback = Callable[[int], None]

# Envoy's default histogram buckets (ms-oriented), reused for Prometheus exposition.
HISTOGRAM_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                     30000, 60000, 300000, 600000, 1800000, 3600000)
_U64 = (1 << 64) - 1


class SharedStore(Protocol):
    def get(self, key: bytes) -> tuple[bytes, int] | None: ...
    def set(self, key: bytes, value: bytes, cas: int) -> int: ...
    def register_queue(self, name: str) -> int: ...
    def resolve_queue(self, name: str) -> int | None: ...
    def enqueue(self, qid: int, data: bytes) -> int: ...
    def dequeue(self, qid: int) -> bytes | int: ...
    def on_enqueue(self, callback: QueueCallback) -> None: ...
    def define_metric(self, kind: int, name: str) -> int | None: ...   # None: full
    def increment_metric(self, metric_id: int, delta: int) -> int: ...
    def record_metric(self, metric_id: int, value: int) -> int: ...
    def get_metric(self, metric_id: int) -> tuple[int, int]: ...
    def metric_samples(self) -> list[MetricSample]: ...


class _Metric:
    __slots__ = ("kind", "name", "value", "count", "sum", "buckets")

    def __init__(self, kind: int, name: str):
        self.kind = kind
        self.name = name
        self.value = 0
        self.count = 0
        self.sum = 0
        self.buckets = [0] * len(HISTOGRAM_BUCKETS)


class LocalStore:
    """In-process store for one worker (the default backend).

    Used from the event loop and from the threads that build filter instances (a start
    sequence may set shared data, define metrics or register queues): every read-modify-write
    holds ``_lock``; single dict reads need not. Enqueue callbacks run outside the lock.
    """

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_queue_items: int = 10000,
                 max_metrics: int = 10000):
        self.max_bytes = max_bytes
        self.max_queue_items = max_queue_items
        self.max_metrics = max_metrics
        self._data: dict[bytes, tuple[bytes, int]] = {}
        self._bytes = 0
        self._next_cas = 1
        self._queue_ids: dict[str, int] = {}
        self._queues: dict[int, deque[bytes]] = {}
        self._callbacks: list[QueueCallback] = []
        self.queue_refusals = 0
        self._metric_ids: dict[int, _Metric] = {}
        self._metrics_by_name: dict[tuple[int, str], _Metric] = {}
        self._next_metric = [MetricType.COUNTER, MetricType.GAUGE, MetricType.HISTOGRAM]
        self._lock = threading.Lock()

    # -- shared data (cpp-host shared_data.cc) --------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self._data.get(key)

    def set(self, key: bytes, value: bytes, cas: int) -> int:
        with self._lock:
            old = self._data.get(key)
            if old is not None and cas != 0 and cas != old[1]:
                return Status.CAS_MISMATCH
            grown = len(value) - (len(old[0]) if old else -len(key))
            if grown > 0 and self._bytes + grown > self.max_bytes:
                return Status.INTERNAL_FAILURE
            self._bytes += grown
            self._data[key] = (value, self._fresh_cas())
            return Status.OK

    def _fresh_cas(self) -> int:
        cas = self._next_cas
        # Never 0 (Rust maps it to None) and never 0xFFFFFFFF, which filters may send as
        # "create only if absent" (a cas no stored entry can hold), as ShmStore does.
        self._next_cas = cas + 1 if cas < 0xFFFFFFFE else 1
        return cas

    # -- queues (cpp-host shared_queue.cc) --------------------------------------------------

    def register_queue(self, name: str) -> int:
        with self._lock:
            qid = self._queue_ids.get(name)
            if qid is None:
                qid = len(self._queue_ids) + 1
                self._queues[qid] = deque()
                self._queue_ids[name] = qid
            return qid

    def resolve_queue(self, name: str) -> int | None:
        return self._queue_ids.get(name)

    def enqueue(self, qid: int, data: bytes) -> int:
        with self._lock:
            q = self._queues.get(qid)
            if q is None:
                return Status.NOT_FOUND
            if len(q) >= self.max_queue_items:
                # Full: refuse the new item (as the gateway-wide ShmStore does), never drop silently.
                self.queue_refusals += 1
                return Status.INTERNAL_FAILURE
            q.append(data)
        for cb in list(self._callbacks):
            cb(qid)
        return Status.OK

    def dequeue(self, qid: int) -> bytes | int:
        q = self._queues.get(qid)
        if q is None:
            return Status.NOT_FOUND
        try:
            return q.popleft()           # atomic: no check-then-pop race between threads
        except IndexError:
            return Status.EMPTY

    def on_enqueue(self, callback: QueueCallback) -> None:
        self._callbacks.append(callback)

    def remove_enqueue_callback(self, callback: QueueCallback) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    # -- metrics (Envoy Context::defineMetric & co) -----------------------------------------

    def define_metric(self, kind: int, name: str) -> int | None:
        """Return a new id (type in the low 2 bits, as cpp-host) bound to the named stat;
        None when the store holds max_metrics names already."""
        with self._lock:
            metric = self._metrics_by_name.get((kind, name))
            if metric is None:
                if len(self._metrics_by_name) >= self.max_metrics:
                    return None                  # the host answers INTERNAL_FAILURE
                metric = _Metric(kind, name)
                self._metrics_by_name[(kind, name)] = metric
            mid = self._next_metric[kind]
            self._next_metric[kind] = mid + 4
            self._metric_ids[mid] = metric
            return mid

    def increment_metric(self, metric_id: int, delta: int) -> int:
        m = self._metric_ids.get(metric_id)
        if m is None:
            return Status.NOT_FOUND
        with self._lock:
            if m.kind == MetricType.COUNTER:
                if delta <= 0:
                    return Status.BAD_ARGUMENT
                m.value = (m.value + delta) & _U64
            elif m.kind == MetricType.GAUGE:
                m.value += delta
            else:
                return Status.BAD_ARGUMENT
        return Status.OK

    def record_metric(self, metric_id: int, value: int) -> int:
        m = self._metric_ids.get(metric_id)
        if m is None:
            return Status.NOT_FOUND
        value &= _U64                      # the ABI value is a u64
        with self._lock:
            if m.kind == MetricType.COUNTER:
                m.value = (m.value + value) & _U64   # Envoy: record on a counter adds
            elif m.kind == MetricType.GAUGE:
                m.value = value
            else:
                m.count += 1
                m.sum += value
                for i, bound in enumerate(HISTOGRAM_BUCKETS):
                    if value <= bound:
                        m.buckets[i] += 1
        return Status.OK

    def get_metric(self, metric_id: int) -> tuple[int, int]:
        m = self._metric_ids.get(metric_id)
        if m is None:
            return Status.NOT_FOUND, 0
        if m.kind == MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT, 0
        return Status.OK, m.value & _U64

    def metric_samples(self) -> list[MetricSample]:
        out: list[MetricSample] = []
        for (kind, name), m in list(self._metrics_by_name.items()):   # a snapshot: see _lock
            prom = prometheus_name("wasmcustom_" + name)
            if kind == MetricType.COUNTER:
                out.append(MetricSample(prom, "counter", float(m.value), help=f"wasm metric {name}"))
            elif kind == MetricType.GAUGE:
                out.append(MetricSample(prom, "gauge", float(m.value), help=f"wasm metric {name}"))
            else:
                out.extend(_histogram_samples(prom, name, m))
        return out


def _histogram_samples(prom: str, name: str, m: _Metric) -> list[MetricSample]:
    out = []
    for bound, n in zip(HISTOGRAM_BUCKETS, m.buckets):
        out.append(MetricSample(prom + "_bucket", "histogram", float(n), {"le": repr(float(bound))},
                                help=f"wasm metric {name}"))
    out.append(MetricSample(prom + "_bucket", "histogram", float(m.count), {"le": "+Inf"},
                            help=f"wasm metric {name}"))
    out.append(MetricSample(prom + "_sum", "histogram", float(m.sum), help=f"wasm metric {name}"))
    out.append(MetricSample(prom + "_count", "histogram", float(m.count), help=f"wasm metric {name}"))
    return out


_PROM_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def prometheus_name(name: str) -> str:
    name = _PROM_BAD.sub("_", name)
    return name if not name[:1].isdigit() else "_" + name
