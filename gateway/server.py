"""Gateway lifecycle: bind listeners and admin, serve, drain on stop."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Awaitable, Callable

from .accesslog import AccessLog
from .admin import admin_reload, start_admin
from .audit import AuditLog
from .config import Config
from .metrics import Metrics
from .client_h1 import ClientProtocol, Connection
from .client_h2 import H2Connection
from .proxy import Generation, Proxy
from .reload import state_of, wait_retired, watch_filter_events
from .routing import Router
from .tracing import Tracer
from .tls import ListenerContext, TlsConnection, TlsError, build_listener_tls
from .upstream import Upstreams

log = logging.getLogger("wasmgate")

# On stop, how long idle TLS connections get to finish their close_notify exchange.
TLS_CLOSE_GRACE_S = 1.0

# async (specs, services) -> FilterHostProtocol; the default is abi.api.load_filter_host.
FilterHostFactory = Callable[[list, Any], Awaitable[Any]]


class StartError(Exception):
    """The gateway could not start (e.g. a port is taken); the message says which listener."""


async def _default_filter_host(specs: list, services: Any) -> Any:
    # Imported only when a config has filters, so a filter-free gateway never loads wasmtime.
    from abi.api import load_filter_host
    return await load_filter_host(specs, services)


async def _fetch_filters(gw: "Gateway", config: Config) -> None:
    """Remote modules into the cache, pinned files verified (gateway/fetch.py)."""
    from .fetch import FetchError, fetch_filters
    try:
        await fetch_filters(config)
    except FetchError as e:
        gw.audit.refused(config, e.filter_name, e.message, trigger="start", generation=1)
        raise StartError(str(e)) from None


async def _load_audited(gw: "Gateway", config: Config, factory: FilterHostFactory, upstreams: Upstreams) -> Any:
    from abi.api import FilterLoadError
    try:
        host = await factory(list(config.filters), upstreams)
    except FilterLoadError as e:
        gw.audit.refused(config, e.filter_name, e.message, trigger="start", generation=1)
        raise
    gw.audit.filters("load", config, getattr(host, "digests", {}), trigger="start", generation=1)
    watch_filter_events(gw, host)
    return host


def bind_socket(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket; SO_REUSEPORT lets worker processes share a port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it. Without it a small trailing write (the last chunk of a
        # chunked body) waits for the client's delayed ACK: ~40 ms per request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Gateway:
    """A running gateway: listeners, admin, one config generation. Create with ``await Gateway.start``."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.access_log = AccessLog(config.access_log_path, config.access_log_redact)
        self.tracer = Tracer(config)
        self.audit = AuditLog(config.audit_log_path)
        self.connections: set[Connection] = set()
        self.idle_connections = 0           # keep-alive connections between requests
        self.draining = False
        self.ready = False
        self.listener_ports: dict[str, int] = {}
        self.admin_port: int | None = None
        self.generation: Generation
        self.proxy = Proxy(self)
        self._servers: list[asyncio.AbstractServer] = []
        self._admin_runner: Any = None
        self._stopped = asyncio.Event()
        self._sweeper: asyncio.Task | None = None
        # What a TLS connection is handed to, by the protocol ALPN chose (None: the client
        # offered no ALPN). "h2" is offered only on listeners with http2 on.
        self.alpn_handlers = {None: self._serve_http1, "http/1.1": self._serve_http1, "h2": self.handle_h2}

    @classmethod
    async def start(cls, config: Config, *, filter_host_factory: FilterHostFactory | None = None,
                    reuse_port: bool = False, ports: dict[str, int] | None = None,
                    shared_store: Any = None) -> "Gateway":
        """Load filters (only if the config has any), bind every listener and the admin port.

        ``ports`` overrides listener ports by name (the worker supervisor passes the real ports
        it resolved for ``port: 0``; key ``"admin"`` for the admin port). ``shared_store`` reaches
        the filter host as ``services.shared_store`` (one store shared by all workers). Raises
        StartError or abi.api.FilterLoadError; nothing is left running when it raises.
        """
        gw = cls(config)
        gw.filter_host_factory = filter_host_factory    # a reload loads its filters the same way
        try:
            tls = build_listener_tls(config.listeners)
            upstreams = Upstreams(config.clusters, shared_store=shared_store,
                                  redis_clusters=config.redis_clusters, node=config.node)
        except TlsError as e:        # a file changed since the config was checked
            gw.access_log.close()
            gw.tracer.close()
            gw.audit.close()
            raise StartError(f"TLS: {e.message}") from None
        filter_host = None
        try:
            await _fetch_filters(gw, config)
            if config.filters:
                factory = filter_host_factory or _default_filter_host
                filter_host = await _load_audited(gw, config, factory, upstreams)
            gw.generation = Generation(config, Router(config.routes, config.clusters), upstreams, filter_host, tls=tls)
            await gw._bind(reuse_port, ports or {})
        except BaseException:
            await gw._close_servers()
            await upstreams.aclose()
            if filter_host is not None:
                await filter_host.close()
                gw.audit.filters("unload", config, getattr(filter_host, "digests", {}),
                                 trigger="start_failed", generation=1)
            gw.access_log.close()
            gw.tracer.close()
            gw.audit.close()
            raise
        gw.ready = True
        gw._sweeper = asyncio.ensure_future(gw._sweep_idle())
        return gw

    async def reload(self, req: Any = None) -> Any:
        """POST /reload: re-read the config file and swap generations (admin.admin_reload over gateway/reload.py)."""
        return await admin_reload(self, req)

    async def _sweep_idle(self) -> None:
        # One periodic pass instead of a timer per request keeps the hot path timer-free.
        while True:
            timeout = self.generation.config.limits.keepalive_timeout_s
            await asyncio.sleep(min(5.0, timeout / 2))
            cutoff = time.monotonic() - timeout
            for conn in list(self.connections):
                if conn.idle and conn.last_active < cutoff:
                    conn.close_idle()

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(self, reader, writer).run()

    async def _serve_http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           tls: TlsConnection) -> None:
        await Connection(self, reader, writer, tls).run()

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TLS connection after its handshake: to the front-end of the protocol ALPN chose."""
        tls = TlsConnection(writer.get_extra_info("ssl_object"))
        handler = self.alpn_handlers.get(tls.alpn)
        if handler is None:          # only what ALPN_PROTOCOLS offers can be chosen
            writer.transport.abort()
            return
        await handler(reader, writer, tls)

    def _listener_context(self, listener: str) -> ListenerContext:
        """The listener's SSL context for its life: each handshake uses the certificates of the
        generation serving at that moment (a reload swaps them for new connections)."""
        return ListenerContext(lambda: self.generation.tls[listener],
                               lambda reason: self._handshake_failed(listener, reason))

    def _handshake_failed(self, listener: str, reason: str) -> None:
        # Scanners and stray plain-HTTP clients cause these: counted, logged at debug (as Envoy, nginx).
        self.metrics.error("tls_handshake")
        log.debug('listener "%s": TLS handshake failed: %s', listener, reason)

    async def _handle_h2c_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(self, reader, writer, h2c=True).run()

    async def handle_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        tls: TlsConnection | None = None) -> None:
        """A connection that speaks HTTP/2 from its first byte: a TLS one whose ALPN chose "h2"
        (gateway/client_h2.py)."""
        await H2Connection(self, reader, writer, tls=tls).run()

    async def _bind(self, reuse_port: bool, ports: dict[str, int]) -> None:
        limit = max(self.config.limits.max_header_bytes + 4, 65536)
        for lst in self.config.listeners:
            port = ports.get(lst.name, lst.port)
            try:
                sock = bind_socket(lst.address, port, reuse_port=reuse_port)
            except OSError as e:
                raise StartError(f'listener "{lst.name}": cannot bind {lst.address}:{port}: '
                                 f'{e.strerror or e}') from None
            loop = asyncio.get_running_loop()
            if lst.tls is None:
                # http2: a connection opening with the HTTP/2 preface goes to client_h2.py.
                handler = self._handle_h2c_connection if lst.http2 else self._handle_connection
                server = await loop.create_server(lambda handler=handler: ClientProtocol(limit, handler),
                                                  sock=sock, backlog=1024)
            else:
                server = await loop.create_server(lambda: ClientProtocol(limit, self._serve_tls), sock=sock,
                                                  backlog=1024, ssl=self._listener_context(lst.name),
                                                  ssl_handshake_timeout=lst.tls.handshake_timeout_s)
            self._servers.append(server)
            self.listener_ports[lst.name] = sock.getsockname()[1]
        if self.config.admin is not None:
            adm = self.config.admin
            port = ports.get("admin", adm.port)
            try:
                sock = bind_socket(adm.address, port, reuse_port=reuse_port)
            except OSError as e:
                raise StartError(f"admin: cannot bind {adm.address}:{port}: {e.strerror or e}") from None
            self._admin_runner = await start_admin(self, sock)
            self.admin_port = sock.getsockname()[1]

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        timeout = self.config.limits.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()    # idle: closed now; HTTP/1.1 closes after its request; HTTP/2 sends GOAWAY
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A closed idle TLS connection waits for the client's close_notify, which a pooled client
        # that is not reading never sends: past a short grace those are dropped, not drained.
        tls_grace = loop.time() + min(timeout, TLS_CLOSE_GRACE_S)
        while self.connections and loop.time() < deadline:
            if loop.time() >= tls_grace and all(c.idle and c.tls is not None for c in self.connections):
                break
            await asyncio.sleep(0.01)
        if self.connections:
            busy = sum(1 for c in self.connections if not c.idle)
            if busy:
                log.warning("drain timeout (%.1fs): closing %d connection(s) with requests in flight",
                            timeout, busy)
            for conn in list(self.connections):
                conn.transport.abort()
                if conn.task is not None:
                    conn.task.cancel()
            await asyncio.sleep(0)
        await self._close_servers()
        await wait_retired(self)            # old generations of reloads finish their teardown
        gen = self.generation
        await gen.upstreams.aclose()
        if gen.filter_host is not None:
            self.audit.filters("unload", gen.config, getattr(gen.filter_host, "digests", {}),
                               names=list(getattr(gen.filter_host, "filters", {})), trigger="stop",
                               generation=state_of(self).generation)
            try:
                await gen.filter_host.close()   # type: ignore[attr-defined]
            except Exception:
                log.exception("closing filters failed")
        self.access_log.close()
        await asyncio.to_thread(self.tracer.close)     # flushes queued spans (bounded)
        self.audit.close()
        self._stopped.set()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self._admin_runner is not None:
            await self._admin_runner.close()
            self._admin_runner = None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
