"""Admin listener: /ready, /metrics, /config, and the slot for POST /reload (issue 6).

Not on the hot path, so it uses aiohttp's web.Application for readability.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from typing import TYPE_CHECKING, Any

from aiohttp import web

from abi.api import MetricSample

from .config import Config, redact

if TYPE_CHECKING:
    from .server import Gateway

GATEWAY_KEY = web.AppKey("gateway", object)


async def start_admin(gw: "Gateway", sock: socket.socket) -> web.AppRunner:
    app = web.Application()
    app[GATEWAY_KEY] = gw
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/config", config_view)
    app.router.add_post("/reload", reload)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    if gw.ready and not gw.draining:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="draining\n" if gw.draining else "starting\n")


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gen = gw.generation
    pools = [MetricSample("wasmgate_upstream_connections", "gauge", float(p.open), {"cluster": name},
                          "Open upstream connections (busy and idle).")
             for name, p in gen.upstreams.pools.items()]
    pools += [MetricSample("wasmgate_upstream_endpoint_ejected", "gauge", 1.0 if p.is_ejected(ep) else 0.0,
                           {"cluster": name, "endpoint": str(ep)},
                           "1 while an endpoint is skipped after refusing connections.")
              for name, p in gen.upstreams.pools.items() for ep in p.cluster.endpoints]
    extra: list[MetricSample] = []
    if gen.filter_host is not None:
        try:
            extra = list(gen.filter_host.metrics())
        except Exception as e:   # filter metrics must not take the gateway's own metrics down
            gw.metrics.error("filter_metrics")
            request.app.logger.warning("filter_host.metrics() failed: %s", e)
    text = gw.metrics.render(extra=extra, gauges=pools)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Version": "0.0.4"})


async def config_view(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    view = effective_config(gw.generation.config, gw.listener_ports, gw.admin_port)
    return web.Response(text=json.dumps(view, indent=2) + "\n", content_type="application/json")


async def reload(request: web.Request) -> web.Response:
    # Issue 6 plugs in here: Gateway.reload(new_config) builds a new Generation and swaps
    # gw.generation; the proxy reads the generation once per request.
    gw = request.app[GATEWAY_KEY]
    handler = getattr(gw, "reload", None)
    if handler is None:
        return web.Response(status=501, text="reload is not implemented yet\n")
    return await handler(request)


def effective_config(config: Config, listener_ports: dict[str, int], admin_port: int | None) -> dict[str, Any]:
    """The config as the gateway runs it: defaults filled in, real ports, secrets redacted."""
    view: dict[str, Any] = {
        "source": str(config.source),
        "listeners": [{"name": l.name, "address": l.address, "port": listener_ports.get(l.name, l.port)}
                      for l in config.listeners],
        "admin": None if config.admin is None else {"address": config.admin.address, "port": admin_port},
        "limits": dataclasses.asdict(config.limits),
        "access_log": {"path": config.access_log_path},
        "clusters": [{**dataclasses.asdict(c), "endpoints": [str(e) for e in c.endpoints]}
                     for c in config.clusters],
        "routes": [_route_view(r) for r in config.routes],
        "filters": [],
        "shared_data": {"max_bytes": config.shared_data_max_bytes},
    }
    raw_filters = {}
    if isinstance(config.raw, dict) and isinstance(config.raw.get("filters"), list):
        raw_filters = {f.get("name"): f for f in config.raw["filters"] if isinstance(f, dict)}
    for spec in config.filters:
        raw = raw_filters.get(spec.name, {})
        view["filters"].append({
            "name": spec.name, "wasm": str(spec.wasm_path),
            "config": _redact_config(raw.get("config")), "encoding": raw.get("encoding", "json"),
            "vm_config": _redact_config(raw.get("vm_config")),
            "failure_policy": spec.failure_policy,
            "limits": {"memory_mb": spec.limits.memory_bytes // (1024 * 1024), "callback_ms": spec.limits.callback_ms},
            "environment": redact(dict(spec.environment)),
            "deliver_body_while_paused": spec.deliver_body_while_paused,
        })
    return view


def _redact_config(value: Any) -> Any:
    if isinstance(value, str):
        # A string configuration may itself be JSON carrying secrets.
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return json.dumps(redact(parsed)) if isinstance(parsed, (dict, list)) else value
    return redact(value)


def _route_view(r) -> dict[str, Any]:
    m = r.match
    match = {k: v for k, v in (("host", m.host), ("prefix", m.prefix), ("path", m.path),
                               ("methods", sorted(m.methods) if m.methods else None),
                               ("headers", dict(m.headers) if m.headers else None)) if v is not None}
    out: dict[str, Any] = {"name": r.name, "match": match, "cluster": r.cluster, "filters": list(r.filters)}
    if r.rewrite is not None:
        out["rewrite"] = {k: v for k, v in (("prefix", r.rewrite.prefix), ("host", r.rewrite.host)) if v is not None}
    return out
