"""Shared data (§5.4), shared queues (§5.5) and filter-defined metrics (§5.6).

Everything that outlives one filter instance and is shared between filters lives behind
``SharedStore`` so a cross-worker backend can replace ``LocalStore`` without touching the
host. Methods return proxy statuses (abi.enums.Status) exactly as the host hands them to
the guest, so a backend decides semantics in one place.

Expiring entries (wasmgate's extension, abi/foreign.py): ``set(key, value, cas, ttl_ns)``
stores an entry that reads as absent once ``ttl_ns`` has passed (CLOCK_MONOTONIC, one clock
for every worker process). A plain ``set`` (every official-SDK write) stores an entry that never
expires and is never evicted, as before. Both backends handle expiring entries alike:

* an expired entry is absent for ``get`` and ``set`` (CAS included: ``set`` with any cas
  creates it anew, so the create-if-absent cas still works);
* each expiring write reclaims up to ``REAP_PER_WRITE`` expired entries (earliest first), so
  they cannot pile up faster than they are reclaimed;
* a write that needs room first drops expiring entries in order of their deadline — expired
  ones, then those closest to expiring (Redis's ``volatile-ttl``, exact) — never the entry
  being written, and only when that makes enough room (otherwise it fails and drops nothing).
  The work is bounded by the room the write needs: each dropped entry frees at least
  ``ENTRY_OVERHEAD`` bytes.
"""
from __future__ import annotations

import heapq
import os
import re
import threading
import time
from collections import deque
from typing import Callable, Protocol

from .seam import MetricSample
from .enums import MetricType, Status

QueueCallback = Callable[[int], None]

# Envoy's default histogram buckets (ms-oriented), reused for Prometheus exposition.
HISTOGRAM_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                     30000, 60000, 300000, 600000, 1800000, 3600000)
_U64 = (1 << 64) - 1
#: Accounted bytes per shared-data entry on top of its key and value (both backends).
ENTRY_OVERHEAD = 64
#: Expired entries each expiring write reclaims (earliest deadline first).
REAP_PER_WRITE = 2


def entry_cost(key: bytes, value: bytes) -> int:
    """What a shared-data entry counts against ``shared_data.max_bytes``."""
    return len(key) + len(value) + ENTRY_OVERHEAD


def deadline(now_ns: int, ttl_ns: int) -> int:
    """The expiry of an entry written at ``now_ns`` with ``ttl_ns`` (a u64, so it cannot wrap)."""
    return min(now_ns + ttl_ns, _U64)


try:
    from . import _local_store    # abi/_local_store.c: LocalStore.set in C, built at install
    _local_store.configure(ENTRY_OVERHEAD, Status.OK, Status.CAS_MISMATCH, Status.INTERNAL_FAILURE)
    _StoreBase: type = _local_store.StoreCore
except ImportError:
    _StoreBase = object
#: Whether new LocalStores write through StoreCore.set's C (tests switch it, as the crossings').
USE_C_SET = _StoreBase is not object and not os.environ.get("WASMGATE_PURE_PYTHON")


class SharedStore(Protocol):
    def get(self, key: bytes) -> tuple[bytes, int] | None: ...
    def set(self, key: bytes, value: bytes, cas: int, ttl_ns: int | None = None) -> int: ...
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
    def usage(self) -> dict: ...     # used / max_bytes / evictable bytes, expired / evicted counts


# -- per-VM namespaces (Envoy: shared data and queues are keyed by vm_id) -------------------
#
# Both backends hold one flat key space; a VM's keys and queue names are mapped into it
# injectively. The default VM ("") keeps its keys as they are — what every SDK writes (UTF-8
# strings, which never start with byte 0xFF) and every store already holds — except a key
# starting with the mark, which gets MARK + NUL in front. A named VM's keys are
# MARK + vm_id + NUL + key; vm_id is non-empty and NUL-free (the config checks it), so no two
# (vm_id, key) pairs meet. Queue names (text) follow the same scheme with U+FFFF as the mark.
_KEY_MARK = b"\xff"
_NAME_MARK = "\uffff"


def vm_key(vm_id: str, key: bytes) -> bytes:
    if vm_id:
        return _KEY_MARK + vm_id.encode() + b"\0" + key
    return _KEY_MARK + b"\0" + key if key[:1] == _KEY_MARK else key


def vm_queue_name(vm_id: str, name: str) -> str:
    if vm_id:
        return _NAME_MARK + vm_id + "\0" + name
    return _NAME_MARK + "\0" + name if name[:1] == _NAME_MARK else name


class VmStore:
    """One VM's view of a SharedStore: shared data and queue names in the VM's namespace;
    queue ids, items and metrics are the store's own (ids are unique store-wide, and Envoy's
    metrics are not per VM). What a filter's host calls act on (``Filter.store``)."""

    def __init__(self, store: SharedStore, vm_id: str):
        self.base = store
        self.vm_id = vm_id
        # Not namespaced: bound once, so these calls cost what they cost on the store itself.
        self.enqueue = store.enqueue
        self.dequeue = store.dequeue
        self.define_metric = store.define_metric
        self.increment_metric = store.increment_metric
        self.record_metric = store.record_metric
        self.get_metric = store.get_metric

    # vm_key inlined for the default VM's plain keys (every shared-data call of a request).
    def get(self, key: bytes) -> tuple[bytes, int] | None:
        if self.vm_id or key[:1] == _KEY_MARK:
            key = vm_key(self.vm_id, key)
        return self.base.get(key)

    def set(self, key: bytes, value: bytes, cas: int, ttl_ns: int | None = None) -> int:
        if self.vm_id or key[:1] == _KEY_MARK:
            key = vm_key(self.vm_id, key)
        return self.base.set(key, value, cas, ttl_ns)

    def register_queue(self, name: str) -> int:
        return self.base.register_queue(vm_queue_name(self.vm_id, name))

    def resolve_queue(self, vm_id: str, name: str) -> int | None:
        """The queue `name` of VM `vm_id` ("": this VM), as cpp-host's resolveSharedQueue."""
        return self.base.resolve_queue(vm_queue_name(vm_id or self.vm_id, name))


class _Metric:
    __slots__ = ("kind", "name", "value", "count", "sum", "buckets")

    def __init__(self, kind: int, name: str):
        self.kind = kind
        self.name = name
        self.value = 0
        self.count = 0
        self.sum = 0
        self.buckets = [0] * len(HISTOGRAM_BUCKETS)


class LocalStore(_StoreBase):
    """In-process store for one worker (the default backend).

    Used from the event loop and from the threads that build filter instances (a start
    sequence may set shared data, define metrics or register queues): every read-modify-write
    holds ``_lock``; single dict reads need not. Enqueue callbacks run outside the lock.

    ``set`` is ``_set`` under the lock; where abi/_local_store.c is built it is StoreCore's, in
    C (``_set`` stays the reference, which the tests compare it with, and the pure path).
    """

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_queue_items: int = 10000,
                 max_metrics: int = 10000, clock: Callable[[], int] = time.monotonic_ns):
        self.max_bytes = max_bytes
        self.max_queue_items = max_queue_items
        self.max_metrics = max_metrics
        self.clock = clock
        self._data: dict[bytes, tuple[bytes, int]] = {}
        self._bytes = 0
        self._next_cas = 1
        self._deadlines: dict[bytes, int] = {}           # key → deadline, expiring entries only
        # (deadline, key) of the same entries, a heap with lazy deletion: an item whose key's
        # deadline is no longer that one (rewritten, deleted) is stale and skipped when it
        # surfaces; the heap is rebuilt when stale items outnumber live ones. A rewrite is
        # then one heappush (C) where a sorted list removed and inserted (~3 µs per write).
        self._by_deadline: list[tuple[int, bytes]] = []
        self._evictable = 0                              # accounted bytes of expiring entries
        self.expired = 0                                 # entries reclaimed after their deadline
        self.evicted = 0                                 # entries dropped before it, for room
        self._queue_ids: dict[str, int] = {}
        self._queues: dict[int, deque[bytes]] = {}
        self._callbacks: list[QueueCallback] = []
        self.queue_refusals = 0
        self._metric_ids: dict[int, _Metric] = {}
        self._metrics_by_name: dict[tuple[int, str], _Metric] = {}
        self._next_metric = [MetricType.COUNTER, MetricType.GAUGE, MetricType.HISTOGRAM]
        self._lock = threading.Lock()
        # StoreCore.set (abi/_local_store.c, when built) runs _set in C; pure: it calls
        # _locked_set, which is LocalStore.set without the extension.
        self._pure = not USE_C_SET

    # -- shared data (cpp-host shared_data.cc; expiry: module docstring) ------------------

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        found = self._data.get(key)
        if found is not None and self._deadlines:
            due = self._deadlines.get(key)
            if due is not None and due <= self.clock():
                return None
        return found

    def _locked_set(self, key: bytes, value: bytes, cas: int, ttl_ns: int | None = None) -> int:
        with self._lock:
            return self._set(key, value, cas, ttl_ns)

    if _StoreBase is object:     # else StoreCore.set: this in C (abi/_local_store.c)
        set = _locked_set

    def _set(self, key: bytes, value: bytes, cas: int, ttl_ns: int | None) -> int:
        old = self._data.get(key)
        now = self.clock() if self._deadlines or ttl_ns is not None else 0
        old_due = self._deadlines.get(key) if old is not None and self._deadlines else None
        live = old is not None and (old_due is None or old_due > now)
        if live and cas != 0 and cas != old[1]:
            return Status.CAS_MISMATCH
        if ttl_ns == 0:                          # expires at once: a CAS-guarded delete
            if old is not None:
                self._drop(key, now, counted=not live)
            return Status.OK
        # entry_cost and _fits's first test inlined: a write per rate-limited request
        old_cost = len(key) + len(old[0]) + ENTRY_OVERHEAD if old is not None else 0
        new_cost = len(key) + len(value) + ENTRY_OVERHEAD
        grow = new_cost - old_cost
        if grow > 0 and self._bytes + grow > self.max_bytes and not self._fits(
                grow, now, key, old_cost if old_due is not None else 0):
            return Status.INTERNAL_FAILURE
        if old_due is not None:
            self._evictable -= old_cost
            del self._deadlines[key]     # its heap item is stale from now on
        self._bytes += grow
        cas = self._next_cas
        # Never 0 (Rust maps it to None) and never 0xFFFFFFFF, which filters may send as
        # "create only if absent" (a cas no stored entry can hold), as ShmStore does.
        self._next_cas = cas + 1 if cas < 0xFFFFFFFE else 1
        self._data[key] = (value, cas)
        if ttl_ns is not None:
            due = min(now + ttl_ns, _U64)        # deadline(), inlined (hot path)
            self._deadlines[key] = due
            heap = self._by_deadline
            heapq.heappush(heap, (due, key))
            if len(heap) > 2 * len(self._deadlines) + 64:
                self._compact()
            self._evictable += new_cost
            if heap[0][0] <= now:        # else nothing is due (a stale top is no earlier)
                self._reap(now)
        return Status.OK

    def _drop(self, key: bytes, now: int, counted: bool = True) -> int:
        """Remove an entry (expiring or not); returns the bytes freed.
        ``counted``: an expiry or eviction (not a delete the filter asked for)."""
        value, _cas = self._data.pop(key)
        cost = entry_cost(key, value)
        self._bytes -= cost
        due = self._deadlines.pop(key, None)
        if due is not None:              # (its heap item is stale from now on)
            self._evictable -= cost
            if counted and due <= now:
                self.expired += 1
            elif counted:
                self.evicted += 1
        return cost

    def _compact(self) -> None:
        """Rebuild the deadline heap from the live deadlines (drops the stale items)."""
        heap = [(due, key) for key, due in self._deadlines.items()]
        heapq.heapify(heap)
        self._by_deadline = heap

    def _earliest(self) -> tuple[int, bytes] | None:
        """The live (deadline, key) due first, stale items popped on the way; None if none."""
        heap = self._by_deadline
        deadlines = self._deadlines
        while heap:
            due, key = heap[0]
            if deadlines.get(key) == due:
                return due, key
            heapq.heappop(heap)
        return None

    def _fits(self, grow: int, now: int, keep: bytes, keep_cost: int) -> bool:
        """Make room for ``grow`` more bytes by dropping expiring entries (earliest deadline
        first, never ``keep``), if they can free enough; else change nothing."""
        need = self._bytes + grow - self.max_bytes
        if need <= 0:
            return True
        if need > self._evictable - keep_cost:
            return False
        kept = None
        while need > 0:
            _due, key = self._earliest()     # (enough evictable bytes remain: never None)
            if key == keep:
                kept = heapq.heappop(self._by_deadline)
                continue
            need -= self._drop(key, now)
        if kept is not None:
            heapq.heappush(self._by_deadline, kept)
        return True

    def _reap(self, now: int) -> None:
        for _ in range(REAP_PER_WRITE):
            first = self._earliest()
            if first is None or first[0] > now:
                return
            self._drop(first[1], now)

    def usage(self) -> dict:
        """Accounted bytes and eviction counts (same keys as ShmStore.usage())."""
        return {"used": self._bytes, "max_bytes": self.max_bytes, "evictable": self._evictable,
                "expired": self.expired, "evicted": self.evicted}

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
        out = usage_samples(self.usage())
        for (kind, name), m in list(self._metrics_by_name.items()):   # a snapshot: see _lock
            prom = prometheus_name("wasmcustom_" + name)
            if kind == MetricType.COUNTER:
                out.append(MetricSample(prom, "counter", float(m.value), help=f"wasm metric {name}"))
            elif kind == MetricType.GAUGE:
                out.append(MetricSample(prom, "gauge", float(m.value), help=f"wasm metric {name}"))
            else:
                out.extend(_histogram_samples(prom, name, m))
        return out


def usage_samples(usage: dict) -> list[MetricSample]:
    """The store's own numbers for /metrics (gateway-wide: one store serves every worker)."""
    return [
        MetricSample("wasmgate_shared_data_bytes", "gauge", float(usage["used"]), {},
                     "Bytes of shared_data.max_bytes in use (entries: key + value + 64)."),
        MetricSample("wasmgate_shared_data_max_bytes", "gauge", float(usage["max_bytes"]), {},
                     "The shared-data budget (shared_data.max_bytes)."),
        MetricSample("wasmgate_shared_data_evictable_bytes", "gauge", float(usage["evictable"]), {},
                     "Bytes held by expiring entries, which make room for other writes."),
        MetricSample("wasmgate_shared_data_evictions_total", "counter", float(usage["expired"]),
                     {"reason": "expired"}, "Expiring entries removed, by reason."),
        MetricSample("wasmgate_shared_data_evictions_total", "counter", float(usage["evicted"]),
                     {"reason": "room"}, "Expiring entries removed, by reason."),
    ]


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
