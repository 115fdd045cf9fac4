"""Admin listener: /ready, /metrics, /config, and the slot for POST /reload (issue 6).

A few lines of asyncio over the same strict parser as the proxy: importing aiohttp's web
stack just for this would add ~100 ms to every worker's start-up.

Every request passes ``refusal`` before its handler (gateway/config.py validates the settings):

* ``Host`` must be an IP address, ``localhost`` or a name in ``admin.allowed_hosts`` (else 403).
  DNS rebinding — a page on evil.example whose name is re-pointed at 127.0.0.1 — makes the
  browser treat the admin listener as evil.example's own origin, so no Origin or CORS rule
  stops it from reading /config; the Host header still names evil.example, and the browser
  fills it in, not the page.
* With ``admin.token`` / ``admin.token_file``: ``Authorization: Bearer <token>`` on every
  endpoint but ``GET /ready`` (a load balancer's health check often cannot send headers, and
  /ready tells nothing but ready/starting/draining) → else 401 + ``WWW-Authenticate: Bearer``.
* A state-changing method (anything but GET/HEAD/OPTIONS, i.e. POST /reload) from a browser
  page of another origin is refused (403), as Go's net/http CrossOriginProtection decides it:
  ``Sec-Fetch-Site`` when the browser sends it (a page cannot forge it), else ``Origin`` must be
  this listener as the request addressed it (``Host``); a request with neither header is not
  from a browser (curl, scripts) and passes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from .audit import filter_record
from .config import Admin, Config, redact
from .control import ControlledGateway
from .http1 import HttpError, body_length, parse_request_head
from .reload import reload_gateway, state_of
from .worker_metrics import render, snapshot

log = logging.getLogger("wasmgate.admin")

MAX_ADMIN_BODY = 16 * 1024 * 1024


@dataclass
class AdminRequest:
    method: str
    path: str                    # without the query string
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    client: str = ""             # "address:port" of the admin client (for the audit log)


@dataclass
class AdminResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, text: str, status: int = 200) -> "AdminResponse":
        return cls(status, text.encode())


Handler = Callable[[ControlledGateway, AdminRequest], Awaitable[AdminResponse]]


class AdminServer:
    """Serves ROUTES on one socket; ``close()`` stops it and its connections."""

    def __init__(self, gw: ControlledGateway):
        self.gw = gw
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                try:
                    req, keepalive = await self._read_request(reader, head)
                    req.client = _peer(writer)
                    resp = await self._dispatch(req)
                except HttpError as e:
                    resp, keepalive = AdminResponse.text(f"{e.status} {e.message}\n", e.status), False
                writer.write(_serialize(resp, keepalive, head_only=head.startswith(b"HEAD ")))
                await writer.drain()
                if not keepalive:
                    return
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, head: bytes) -> tuple[AdminRequest, bool]:
        method, target, version, headers = parse_request_head(head)
        length = body_length(headers, request=True)
        if length is None:
            raise HttpError(411, "send a Content-Length")
        if length > MAX_ADMIN_BODY:
            raise HttpError(413, f"body over {MAX_ADMIN_BODY} bytes")
        body = await reader.readexactly(length) if length > 0 else b""
        path, _, query = target.partition("?")
        keepalive = version == "HTTP/1.1" and not any(
            n == "connection" and "close" in v.lower() for n, v in headers)
        return AdminRequest(method, path, query, headers, body), keepalive

    async def _dispatch(self, req: AdminRequest) -> AdminResponse:
        settings = self.gw.config.admin
        refused = refusal(settings, req) if settings is not None else None
        if refused is not None:
            log.warning("admin %s %s refused: %s", req.method, req.path, refused.body.decode().strip())
            return refused
        methods = ROUTES.get(req.path)
        if methods is None:
            return AdminResponse.text(f"404 no admin endpoint {req.path}; try {', '.join(sorted(ROUTES))}\n", 404)
        handler = methods.get("GET" if req.method == "HEAD" else req.method)
        if handler is None:
            resp = AdminResponse.text(f"405 {req.path} takes {', '.join(sorted(methods))}\n", 405)
            resp.headers.append(("allow", ", ".join(sorted(methods))))
            return resp
        try:
            return await handler(self.gw, req)
        except Exception:
            log.exception("admin %s %s failed", req.method, req.path)
            return AdminResponse.text("500 admin handler failed (see the gateway log)\n", 500)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await asyncio.sleep(0)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return ""


def _serialize(resp: AdminResponse, keepalive: bool, head_only: bool) -> bytes:
    reason = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [f"HTTP/1.1 {resp.status} {reason}", f"content-type: {resp.content_type}",
             f"content-length: {len(resp.body)}"]
    lines += [f"{n}: {v}" for n, v in resp.headers]
    if not keepalive:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + resp.body


# -- who may ask ---------------------------------------------------------------------------------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/ready"})          # answered without the token (load-balancer health checks)


def refusal(settings: Admin, req: AdminRequest) -> AdminResponse | None:
    """Why this request may not reach an admin handler, as the response to send; None = it may."""
    host = _header(req.headers, "host")
    if host is not None and not host_allowed(host, settings.allowed_hosts):
        return AdminResponse.text(f'403 Host "{host}" is not this admin listener: use its IP address, '
                                  f"localhost, or a name listed in admin.allowed_hosts\n", 403)
    if settings.token is not None and req.path not in OPEN_PATHS and not _bearer_ok(req, settings.token):
        given = _header(req.headers, "authorization") is not None
        resp = AdminResponse.text("401 wrong admin token\n" if given else
                                  "401 send Authorization: Bearer <admin token>\n", 401)
        challenge = 'Bearer realm="wasmgate admin"' + (', error="invalid_token"' if given else "")
        resp.headers.append(("www-authenticate", challenge))
        return resp
    if req.method not in SAFE_METHODS:
        why = _cross_origin(req.headers, host)
        if why is not None:
            return AdminResponse.text(f"403 {req.method} {req.path} refused: {why}\n", 403)
    return None


def host_allowed(host: str, names: tuple[str, ...]) -> bool:
    """A Host header naming an IP address, localhost or one of ``names`` (any port)."""
    name = host.strip().lower()
    if name.startswith("["):                  # [v6]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name in names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _bearer_ok(req: AdminRequest, token: str) -> bool:
    scheme, _, given = (_header(req.headers, "authorization") or "").strip().partition(" ")
    # Digests of equal length: compare_digest's time then reveals neither the token nor its length.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        hashlib.sha256(given.strip().encode("utf-8", "replace")).digest(),
        hashlib.sha256(token.encode()).digest())


def _cross_origin(headers: list[tuple[str, str]], host: str | None) -> str | None:
    """Why a state-changing request looks like another site's page (None: it does not)."""
    site = _header(headers, "sec-fetch-site")
    if site is not None:
        return None if site.strip().lower() in ("same-origin", "none") else f"Sec-Fetch-Site is {site}"
    origin = _header(headers, "origin")
    if origin is None:
        return None
    scheme, sep, authority = origin.strip().partition("://")
    if sep and scheme.lower() in ("http", "https") and host is not None \
            and authority.lower() == host.strip().lower():
        return None
    return f"Origin {origin} is not this admin listener ({host or 'no Host header'})"


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for n, v in headers if n == name), None)


async def start_admin(gw: ControlledGateway, sock: socket.socket) -> AdminServer:
    admin = AdminServer(gw)
    admin.server = await asyncio.start_server(admin.handle, sock=sock, limit=65536)
    return admin


async def ready(gw: ControlledGateway, req: AdminRequest) -> AdminResponse:
    if gw.ready and not gw.draining:
        return AdminResponse.text("ready\n")
    return AdminResponse.text("draining\n" if gw.draining else "starting\n", 503)


async def metrics(gw: ControlledGateway, req: AdminRequest) -> AdminResponse:
    # Summed over every worker process when there are several (gateway/worker_metrics.py).
    ops = getattr(gw, "ops", None)
    if ops is not None:
        text = ops.render_metrics()
    else:
        text = render(gw, [snapshot(gw)], gw.metrics.counts())
    return AdminResponse(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")


async def config_view(gw: ControlledGateway, req: AdminRequest) -> AdminResponse:
    view = effective_config(gw.generation.config, gw.listener_ports, gw.admin_port)
    return AdminResponse(200, (json.dumps(view, indent=2) + "\n").encode(), "application/json")


async def filters_view(gw: ControlledGateway, req: AdminRequest) -> AdminResponse:
    """The running filters: the audit log's fields (source, sha256, rights, config digest) plus
    this worker's counters."""
    gen = gw.generation
    host = gen.filter_host
    digests = getattr(host, "digests", {})
    stats = host.stats() if hasattr(host, "stats") else {}
    running = getattr(host, "filters", {}) or {}
    view = {"generation": state_of(gw).generation, "pid": os.getpid(), "filters": [
        {**filter_record(gen.config, spec, digests.get(spec.name)), **stats.get(spec.name, {})}
        for spec in gen.config.filters if spec.name in running]}
    return AdminResponse(200, (json.dumps(view, indent=2) + "\n").encode(), "application/json")


async def reload(gw: ControlledGateway, req: AdminRequest) -> AdminResponse:
    # Issue 6 plugs in here: Gateway.reload(request) builds a new Generation and swaps
    # gw.generation; the proxy reads the generation once per request.
    handler = getattr(gw, "reload", None)
    if handler is None:
        return AdminResponse.text("501 reload is not implemented yet\n", 501)
    return await handler(req)


# path → method → handler. Issue 6 adds its endpoints here.
ROUTES: dict[str, dict[str, Handler]] = {
    "/ready": {"GET": ready},
    "/metrics": {"GET": metrics},
    "/config": {"GET": config_view},
    "/reload": {"POST": reload},
    "/filters": {"GET": filters_view},
}


def effective_config(config: Config, listener_ports: dict[str, int], admin_port: int | None) -> dict[str, Any]:
    """The config as the gateway runs it: defaults filled in, real ports, secrets redacted."""
    view: dict[str, Any] = {
        "source": str(config.source),
        "listeners": [{"name": l.name, "address": l.address, "port": listener_ports.get(l.name, l.port)}
                      for l in config.listeners],
        "admin": None if config.admin is None else _admin_view(config.admin, admin_port),
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


def _admin_view(adm: Admin, port: int | None) -> dict[str, Any]:
    view: dict[str, Any] = {"address": adm.address, "port": port, "allowed_hosts": list(adm.allowed_hosts)}
    if adm.token_file is not None:
        view["token_file"] = adm.token_file
    if adm.token is not None:
        view["token"] = "[redacted]"
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


async def admin_reload(gw: ControlledGateway, req: Any = None) -> AdminResponse:
    """POST /reload: 200 with what changed, or 422 with the reasons it was refused.

    With workers, the worker that got the request reloads first (so it can answer with the
    errors), then ``gw.reload_broadcast`` (gateway/workers.py) has the supervisor reload every
    other worker and reports whether they all reached the same config.
    """
    client = getattr(req, "client", "") if req is not None else ""
    result = await reload_gateway(gw, "admin", client)
    body = result.text()
    status = 200 if result.ok else 422
    broadcast = getattr(gw, "reload_broadcast", None)
    if result.ok and broadcast is not None:
        all_ok, text = await broadcast(result)
        body += text
        if not all_ok:
            status = 502                     # this worker reloaded; some other did not confirm
    return AdminResponse.text(body, status)
