"""Hot reload: build a new Generation off the request path, swap it in, retire the old one.

A reload re-reads the config file the gateway was started with. Every step — YAML, validation,
compiling and starting the filters — happens before anything changes; if one fails, the current
Generation keeps serving untouched and the reasons are reported (log, /metrics, /reload body).
On success new requests take the new Generation; a request in flight holds the one it started
with (client_h1.Connection._serve reads ``gw.generation`` once), and the old one is torn down once its requests
are done, bounded by ``limits.drain_timeout_s``.

Only what changed is rebuilt: filters whose spec and wasm sha256 are unchanged are carried over
(same instance, root context, timers — abi FilterHost.load(previous=)), and clusters whose
definition is unchanged keep their connection pool.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from abi.api import FilterLoadError

from . import gc_tuning
from .config import Config, ConfigError, load_config
from .control import ControlledGateway
from .fetch import FetchError, fetch_filters
from .proxy import Generation
from .routing import Router
from .tls import TlsError, build_listener_tls
from .upstream import Upstreams

log = logging.getLogger("wasmgate.reload")


@dataclass
class ReloadResult:
    ok: bool
    generation: int                          # the generation serving after this attempt
    fingerprint: str                         # of the config serving after this attempt
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        if not self.ok:
            return "reload refused; still serving generation %d:\n%s\n" % (
                self.generation, "\n".join(f"  {e}" for e in self.errors))
        what = "\n".join(f"  {c}" for c in self.changes) if self.changes else "  nothing changed"
        return f"ok: generation {self.generation}\n{what}\n"


@dataclass
class ReloadState:
    """Per-gateway reload bookkeeping, exported on /metrics."""
    generation: int = 1
    fingerprint: str = ""
    ok: int = 0
    failed: int = 0
    last_reload_ts: float = 0.0              # unix time of the last successful reload (0: none)
    last_attempt_ok: bool = True
    last_errors: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    retiring: set[asyncio.Task] = field(default_factory=set)


def state_of(gw: ControlledGateway) -> ReloadState:
    st = getattr(gw, "reload_state", None)
    if st is None:
        config = gw.generation.config
        st = gw.reload_state = ReloadState(fingerprint=fingerprint(config, wasm_digests(config)))
    return st


def fingerprint(config: Config, digests: dict[str, str]) -> str:
    """Identifies what a generation serves: the config text plus each wasm file's sha256."""
    h = hashlib.sha256()
    try:
        h.update(Path(config.source).read_bytes())
    except OSError:
        h.update(repr(config).encode())
    for name in sorted(digests):
        h.update(f"\0{name}={digests[name]}".encode())
    for item in [*config.listeners, *config.clusters]:     # certificate, key and CA file contents
        if item.tls is not None:
            h.update(f"\0tls {item.name}={item.tls.digest}".encode())
    return h.hexdigest()[:16]


def wasm_digests(config: Config) -> dict[str, str]:
    out = {}
    for spec in config.filters:
        try:
            out[spec.name] = hashlib.sha256(Path(spec.wasm_path).read_bytes()).hexdigest()
        except OSError:
            out[spec.name] = ""
    return out


async def reload_gateway(gw: ControlledGateway, trigger: str = "signal", admin_client: str = "") -> ReloadResult:
    """Reload from the gateway's config file; never raises for a bad config (see ReloadResult).
    ``trigger`` (signal | watch | admin) and ``admin_client`` go to the audit log."""
    st = state_of(gw)
    async with st.lock:                      # one reload at a time; a second one queues
        result = await _reload_locked(gw, st, {"trigger": trigger, "admin_client": admin_client})
    if result.ok:
        st.ok += 1
        st.last_attempt_ok = True
        st.last_errors = []
        log.info("reload ok: generation %d (%s)", result.generation,
                 "; ".join(result.changes) or "nothing changed")
    else:
        st.failed += 1
        st.last_attempt_ok = False
        st.last_errors = result.errors
        log.error("reload refused, still serving generation %d: %s", result.generation,
                  "; ".join(result.errors))
    return result


async def _reload_locked(gw: ControlledGateway, st: ReloadState, why: dict[str, str]) -> ReloadResult:
    old: Generation = gw.generation
    source = Path(old.config.source)
    refused = lambda errors: ReloadResult(False, st.generation, st.fingerprint, errors=errors)  # noqa: E731
    if gw.draining:
        return refused(["the gateway is stopping"])
    try:
        config = await asyncio.to_thread(load_config, source)   # relative paths: against its directory
    except ConfigError as e:
        return refused(list(e.errors))
    fixed = _restart_only_changes(old.config, config)
    if fixed:
        return refused(fixed)
    try:
        await fetch_filters(config)          # remote modules into the cache, pins verified
    except FetchError as e:
        gw.audit.refused(config, e.filter_name, e.message, generation=st.generation, **why)
        return refused([str(e)])
    digests = await asyncio.to_thread(wasm_digests, config)
    fp = fingerprint(config, digests)
    if fp == st.fingerprint and config == old.config:
        # Nothing to do (e.g. the broadcast reaching the worker that already reloaded).
        return ReloadResult(True, st.generation, fp)
    try:
        tls = await asyncio.to_thread(build_listener_tls, config.listeners)   # new connections only
        upstreams = Upstreams(config.clusters, shared_store=old.upstreams.shared_store,
                              redis_clusters=config.redis_clusters, node=config.node)
    except TlsError as e:            # a file changed since the config was checked
        return refused([f"TLS: {e.message}"])
    try:
        host = await _load_filters(gw, config, upstreams, old.filter_host)
    except FilterLoadError as e:             # names the filter, its file and the cause
        await upstreams.aclose()
        gw.audit.refused(config, e.filter_name, e.message, generation=st.generation, **why)
        return refused([str(e)])
    except Exception as e:                   # a host bug must not take the running config down
        log.exception("loading filters for a reload failed")
        await upstreams.aclose()
        return refused([f"loading filters failed: {type(e).__name__}: {e}"])
    kept_pools = _keep_unchanged_pools(old.upstreams, upstreams)
    changes = describe_changes(old.config, config, old.filter_host, host, kept_pools)
    gw.generation = Generation(config, Router(config.routes, config.clusters), upstreams, host, tls=tls)
    gw.config = config
    st.generation += 1
    audit_reload(gw, old, gw.generation, st.generation, why)
    st.fingerprint = fp
    st.last_reload_ts = time.time()
    task = asyncio.ensure_future(retire(old, config.limits.drain_timeout_s, kept_pools, host))
    st.retiring.add(task)
    task.add_done_callback(st.retiring.discard)
    return ReloadResult(True, st.generation, fp, changes=changes)


async def _load_filters(gw: ControlledGateway, config: Config, upstreams: Upstreams, previous: Any) -> Any:
    if not config.filters:
        return None
    factory = getattr(gw, "filter_host_factory", None)
    if factory is not None:                  # tests inject fake hosts; they rebuild everything
        return await factory(list(config.filters), upstreams)
    from abi.api import load_filter_host
    return await load_filter_host(list(config.filters), upstreams, previous=previous)


def audit_reload(gw: ControlledGateway, old: Generation, new: Generation, generation: int, why: dict[str, str]) -> None:
    """Audit lines for what a reload did to each filter: added → load, replaced → reload,
    removed → unload (kept ones did not change and get no line)."""
    old_f = getattr(old.filter_host, "filters", {}) or {}
    new_f = getattr(new.filter_host, "filters", {}) or {}
    old_digests = getattr(old.filter_host, "digests", {})
    new_digests = getattr(new.filter_host, "digests", {})
    watch_filter_events(gw, new.filter_host)
    for spec in new.config.filters:
        if spec.name not in old_f:
            gw.audit.event("load", new.config, spec, sha256=new_digests.get(spec.name), generation=generation, **why)
        elif new_f.get(spec.name) is not old_f[spec.name]:
            gw.audit.event("reload", new.config, spec, sha256=new_digests.get(spec.name), generation=generation, **why)
    for spec in old.config.filters:
        if spec.name in old_f and spec.name not in new_f:
            gw.audit.event("unload", old.config, spec, sha256=old_digests.get(spec.name), generation=generation, **why)


def watch_filter_events(gw: ControlledGateway, host: Any) -> None:
    """Rebuilds after a failure, reported by the filter host, go to the audit log."""
    if host is None or not hasattr(host, "on_event"):
        return                               # a test's fake host

    def on_event(spec: Any, event: str, error: str) -> None:
        gw.audit.event(event, gw.generation.config, spec, sha256=host.digests.get(spec.name),
                       outcome="failed" if error else "ok", error=error, trigger="failure",
                       generation=state_of(gw).generation)
    host.on_event = on_event


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """What a reload cannot apply: sockets are bound and the shared store is sized at start."""
    out = []
    # A listener's socket is plain or TLS for its life; certificates, CAs and versions reload.
    key = lambda c: [(l.name, l.address, l.port, l.tls is not None,  # noqa: E731
                      l.tls and l.tls.handshake_timeout_s) for l in c.listeners]
    if key(old) != key(new):
        out.append("listeners changed: restart required")
    if old.admin != new.admin:
        out.append("admin listener changed: restart required")
    if old.shared_data_max_bytes != new.shared_data_max_bytes:
        out.append("shared_data.max_bytes changed: restart required")
    if (old.access_log_path, old.access_log_redact, old.access_log_filters) != \
            (new.access_log_path, new.access_log_redact, new.access_log_filters):
        out.append("access_log changed: restart required")
    if old.tracing != new.tracing:
        out.append("tracing changed: restart required")
    if old.audit_log_path != new.audit_log_path:
        out.append("audit_log changed: restart required")
    return out


def _keep_unchanged_pools(old: Upstreams, new: Upstreams) -> set[str]:
    """Move the pools of unchanged clusters into the new Upstreams (warm keep-alive connections;
    Redis clusters too)."""
    kept = new.redis.take_over(old.redis)
    for name, pool in old.pools.items():
        fresh = new.pools.get(name)
        # metadata is for filters only (read from the new config): it never costs warm connections.
        if fresh is not None and replace(fresh.cluster, metadata={}) == replace(pool.cluster, metadata={}):
            fresh.close()
            new.pools[name] = pool
            kept.add(name)
    return kept


def describe_changes(old: Config, new: Config, old_host: Any, new_host: Any, kept_pools: set[str]) -> list[str]:
    out = []
    old_f = getattr(old_host, "filters", {}) or {}
    new_f = getattr(new_host, "filters", {}) or {}
    added = sorted(set(new_f) - set(old_f))
    removed = sorted(set(old_f) - set(new_f))
    rebuilt = sorted(n for n in set(new_f) & set(old_f) if new_f[n] is not old_f[n])
    kept = sorted(n for n in set(new_f) & set(old_f) if new_f[n] is old_f[n])
    for label, names in (("filters added", added), ("filters removed", removed),
                         ("filters reloaded", rebuilt), ("filters kept", kept)):
        if names and (label != "filters kept" or added or removed or rebuilt):
            out.append(f"{label}: {', '.join(names)}")
    if old.routes != new.routes:
        out.append(f"routes: {len(new.routes)} (were {len(old.routes)})")
    changed = sorted({c.name for c in new.clusters + new.redis_clusters} - kept_pools)
    if changed:
        out.append(f"clusters new or changed: {', '.join(changed)}")
    if old.limits != new.limits:
        out.append("limits changed")
    tls = sorted(l.name for l, o in zip(new.listeners, old.listeners) if l.tls is not None and l.tls != o.tls)
    if tls:
        out.append(f"tls reloaded for new connections: listener {', '.join(tls)}")
    return out


async def retire(old: Generation, drain_timeout_s: float, kept_pools: set[str], new_host: Any) -> None:
    """Wait for the old generation's requests to finish (bounded), then tear it down."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_timeout_s
    while getattr(old, "active", 0) > 0 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if getattr(old, "active", 0) > 0:
        log.warning("old generation still has %d request(s) after %.1fs; tearing it down",
                    old.active, drain_timeout_s)
    for name, pool in old.upstreams.pools.items():
        if name not in kept_pools:
            pool.close()
    await old.upstreams.redis.aclose(kept_pools)
    await old.upstreams.grpc.aclose()        # (its filters' streams and calls end with it)
    host = old.filter_host
    if host is not None and host is not new_host:
        try:
            await host.close()               # root on_done/on_delete of the filters not carried over
        except Exception:
            log.exception("closing the old generation's filters failed")
    del old, host
    gc_tuning.settle()                       # the new generation frozen, the old one collectable


async def wait_retired(gw: ControlledGateway) -> None:
    """Let old generations finish tearing down (the gateway is stopping)."""
    st = getattr(gw, "reload_state", None)
    if st is not None and st.retiring:
        await asyncio.gather(*list(st.retiring), return_exceptions=True)
