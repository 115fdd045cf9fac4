"""FilterHost: every filter of one config generation in one worker (api.FilterHostProtocol)."""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

from .seam import FilterSpec, HostServices, MetricSample, StreamInfo
from .chain import Chain
from .engine import Engine
from .filter import Filter, new_filter
from .module import load_module
from .shared_store import LocalStore, SharedStore

CLOSE_WAIT_S = 0.0                # reload: pass e.g. the drain timeout to let streams finish
_CHAINS_MAX = 1024                # distinct filter lists resolved and kept (routes: a few)
_engine: Engine | None = None
_store: LocalStore | None = None


def default_engine() -> Engine:
    """One engine per process: it owns the epoch thread and the compiled-module cache."""
    global _engine
    if _engine is None:
        _engine = Engine()
    return _engine


def default_store() -> LocalStore:
    """One store per process, so shared data and queues survive a config reload."""
    global _store
    if _store is None:
        _store = LocalStore()
    return _store


class FilterHost:
    def __init__(self, filters: dict[str, Filter], store: SharedStore):
        self.filters = filters
        self.store = store
        self._queue_owner: dict[int, Filter] = {}
        self._closed = False
        self._active = 0                      # streams not finished yet
        self._idle: asyncio.Future[None] | None = None    # close() waiting for _active == 0
        # A route's filter names → its filters, resolved once (the same tuple for every stream).
        self._chains: dict[tuple[str, ...], tuple[Filter, ...]] = {}
        self.digests: dict[str, str] = {}     # filter name → sha256 of its wasm file
        self.borrowed: set[str] = set()       # carried-over filters another host still owns
        self.carried: set[str] = set()        # filters handed to the next host: not ours to close
        # (spec, "rebuild", error or "") after an instance was rebuilt, or failed to be; set by
        # the gateway (audit log). A carried-over filter reports to its newest host.
        self.on_event: Callable[[FilterSpec, str, str], None] | None = None

    @classmethod
    async def load(cls, specs: list[FilterSpec], services: HostServices, *,
                   engine: Engine | None = None, store: SharedStore | None = None,
                   previous: "FilterHost | None" = None) -> "FilterHost":
        """Compile, link, start and configure every filter; FilterLoadError names the first
        that fails (the ones already started are closed again).

        ``previous`` (a config reload): a filter of it whose spec and wasm sha256 are unchanged
        is carried over — same instance, root context and timers — and ``previous.close()``
        will skip it. Nothing of ``previous`` changes unless the whole load succeeds."""
        engine = engine or default_engine()
        store = store or getattr(services, "shared_store", None) or default_store()
        host = cls({}, store)
        try:
            for spec in specs:
                digest = await asyncio.to_thread(_sha256, spec.wasm_path)
                old = previous.filters.get(spec.name) if previous is not None else None
                if old is not None and not old.closed and old.spec == spec \
                        and previous.digests.get(spec.name) == digest:
                    host.filters[spec.name] = old
                    host.borrowed.add(spec.name)
                    host.digests[spec.name] = digest
                    continue
                # Compiling can take seconds on a cache miss: keep the event loop responsive.
                loaded = await asyncio.to_thread(load_module, engine, spec)
                f = new_filter(spec, loaded, engine, services, store, host)
                host.filters[spec.name] = f      # closed with the host if the load fails
                host.digests[spec.name] = digest
                await f.start_at_load()          # built off the event loop
        except BaseException:
            await host.close()
            raise
        if previous is not None:
            host._take_over(previous, services)
        store.on_enqueue(host._on_enqueue)
        return host

    def _take_over(self, previous: "FilterHost", services: HostServices) -> None:
        # Only after every filter loaded: a failed reload leaves the old host untouched.
        for name in self.borrowed:
            f = self.filters[name]
            f.host = self
            f.services = services
            previous.carried.add(name)
        for qid, f in previous._queue_owner.items():
            if f.name in self.borrowed:
                self._queue_owner[qid] = f
        self.borrowed = set()

    def stream(self, filter_names: Sequence[str], info: StreamInfo) -> Chain:
        key = filter_names if type(filter_names) is tuple else tuple(filter_names)
        filters = self._chains.get(key)
        if filters is None:
            try:
                filters = tuple(self.filters[n] for n in key)
            except KeyError as e:
                raise ValueError(f"no filter named {e.args[0]!r} is loaded") from None
            if len(self._chains) < _CHAINS_MAX:
                self._chains[key] = filters
        self._active += 1
        return Chain(filters, info, self._stream_done)

    def _stream_done(self) -> None:
        self._active -= 1
        if self._active <= 0:
            self._active = 0
            idle = self._idle
            if idle is not None and not idle.done():
                idle.set_result(None)

    def set_queue_owner(self, qid: int, f: Filter) -> None:
        # cpp-host: the registering root context becomes the queue's notification target.
        self._queue_owner[qid] = f

    def _on_enqueue(self, qid: int) -> None:
        f = self._queue_owner.get(qid)
        if f is not None and not self._closed and f.host is self:   # a carried filter: its new host
            f.queue_ready(qid)

    def tick(self, filter_name: str) -> bool:
        """One proxy_on_tick for that filter now (for hosts whose observer has manual_ticks)."""
        return self.filters[filter_name].tick_now()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per filter: live instance, guest calls, their wall time, failures, rebuilds, denials."""
        return {f.name: {"up": f.instance is not None, "calls": f.calls,
                         "guest_us": f.guest_ns // 1000, "failures": sum(f.failures.values()),
                         "rebuilds": f.rebuilds, "denied_calls": dict(f.denied_calls)}
                for f in self.filters.values()}

    def metrics(self) -> list[MetricSample]:
        return self.local_metrics() + self.shared_metrics()

    def shared_metrics(self) -> list[MetricSample]:
        """Filter-defined metrics: the store already makes them gateway-wide."""
        return list(self.store.metric_samples())

    def local_metrics(self) -> list[MetricSample]:
        """This process's per-filter numbers (workers sum them for /metrics)."""
        out: list[MetricSample] = []
        for f in self.filters.values():
            labels = {"filter": f.name}
            out.append(MetricSample("wasmgate_filter_up", "gauge",
                                    1.0 if f.instance is not None else 0.0, dict(labels),
                                    "1 when the filter has a live instance"))
            out.append(MetricSample("wasmgate_filter_rebuilds_total", "counter", float(f.rebuilds),
                                    dict(labels), "instances rebuilt after a failure"))
            out.append(MetricSample("wasmgate_filter_host_errors_total", "counter",
                                    float(f.host_errors), dict(labels),
                                    "internal errors inside host functions"))
            for group, n in sorted(f.denied_calls.items()):
                out.append(MetricSample("wasmgate_filter_denied_calls_total", "counter", float(n),
                                        {"filter": f.name, "capability": group},
                                        "host calls refused by the filter's capabilities"))
            for (callback, kind), n in sorted(f.failures.items()):
                out.append(MetricSample("wasmgate_filter_failures_total", "counter", float(n),
                                        {"filter": f.name, "callback": callback, "kind": kind},
                                        "filter failures (trap, deadline, exit, invalid action...)"))
        return out

    async def close(self, wait_streams_s: float = CLOSE_WAIT_S) -> None:
        """Let streams in flight finish (a config reload: Envoy keeps old VMs until then),
        then run the roots' on_done/on_delete and free the instances."""
        if self._closed:
            return
        self._closed = True
        if self._active:
            self._idle = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._idle, wait_streams_s)
            except asyncio.TimeoutError:
                pass
        remove = getattr(self.store, "remove_enqueue_callback", None)
        if remove is not None:
            remove(self._on_enqueue)
        for name, f in self.filters.items():
            if name in self.borrowed or name in self.carried:
                continue
            try:
                await f.close()
            except Exception:        # noqa: BLE001 — shutting down must finish
                f.log.exception('filter "%s": close failed', f.name)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""              # load_module reports the unreadable file, naming it
