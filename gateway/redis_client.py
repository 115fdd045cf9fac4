"""One `type: redis` cluster in one worker: pooled asyncio connections (redis-py).

A filter hands us one RESP-encoded command and gets Redis's reply back byte for byte, the way
Higress's Envoy passes a raw reply to ``proxy_on_redis_call_response`` — an error reply
(``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``) is a reply like any other. Only a call
that got no reply (timeout, refused, dropped connection) raises ``CallFailed``.

Per cluster and worker: one pool of redis-py connections per endpoint (and per set of
credentials a filter chose with ``proxy_redis_init``), at most ``max_connections`` each. The pool
is a free list of redis-py ``Connection``s (redis-py connects, authenticates, selects the
database and parses); redis-py's own ``BlockingConnectionPool`` puts a condition variable, an
event dispatch and observability hooks on every call, none of which this needs.
Endpoints are a failover list: calls go to the first endpoint that is not ejected; an endpoint
whose connect fails is skipped for ``eject_ms``, and with every endpoint ejected a call fails at
once instead of waiting out its timeout. A call is never retried after its command was sent (it
may have run).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from redis import exceptions as rx
from redis._parsers.resp2 import _AsyncRESP2Parser
from redis.asyncio import Connection
from redis.maint_notifications import MaintNotificationsConfig

from abi.api import CallFailed, RedisOptions

from .config import Endpoint, RedisCluster

log = logging.getLogger("wasmgate.redis")

ERROR_LOG_INTERVAL_S = 1.0        # at most one log line per cluster per interval while failing
MAX_CREDENTIAL_SETS = 8           # pools per endpoint (filters' proxy_redis_init choices); oldest go


class RawReplyParser(_AsyncRESP2Parser):
    """redis-py's RESP2 parser that also keeps the bytes of the reply it just parsed (``raw``):
    the connection handshake (AUTH, SELECT) still reads parsed values, the ABI gets the wire
    bytes. Relies on the parser's buffer (``_buffer``/``_chunks``/``_pos``), hence redis<9."""

    raw = b""

    async def read_response(self, disable_decoding: bool = False):
        if not self._connected:
            raise rx.ConnectionError("Connection closed by server.")
        if self._chunks:
            self._buffer += b"".join(self._chunks)
            self._chunks.clear()
        self._pos = 0
        response = await self._read_response(disable_decoding=disable_decoding)
        if self._chunks:
            self._buffer += b"".join(self._chunks)
            self._chunks.clear()
        self.raw = self._buffer[:self._pos]
        self._clear()
        return response


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str
    database: int


class ConnectionPool:
    """Connections to one endpoint with one set of credentials: idle ones are reused (last in,
    first out), at most ``size`` are open; a caller beyond that waits for one to come back."""

    def __init__(self, ep: Endpoint, cred: _Credentials, size: int, connect_timeout_s: float):
        self._kwargs = dict(
            host=ep.host, port=ep.port, db=cred.database,
            username=cred.username or None, password=cred.password or None,
            socket_connect_timeout=connect_timeout_s, parser_class=RawReplyParser, protocol=2,
            # RESP2 and a plain server: no CLIENT MAINT_NOTIFICATIONS handshake.
            maint_notifications_config=MaintNotificationsConfig(enabled=False))
        self._size = size
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._closed = False

    async def acquire(self) -> Connection:
        """A connected connection; raises redis-py's ConnectionError / AuthenticationError /
        TimeoutError when a new one cannot be made."""
        while True:
            while self._idle:
                conn = self._idle.pop()
                # Closed by the server while idle (a Redis restart): drop it, take another.
                if conn.is_connected and not await conn.can_read():
                    return conn
                await self._drop(conn)
            if self._open < self._size:
                self._open += 1
                conn = Connection(**self._kwargs)
                try:
                    await conn.connect()
                except BaseException:
                    await self._drop(conn)
                    raise
                return conn
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def release(self, conn: Connection) -> None:
        """Back to the pool, or closed when a failure left it in doubt (redis-py disconnects a
        connection whose send or read failed or was cancelled)."""
        if conn.is_connected and not self._closed:
            self._idle.append(conn)
            self._wake()
        else:
            await self._drop(conn)

    async def _drop(self, conn: Connection) -> None:
        self._open -= 1
        self._wake()
        await conn.disconnect(nowait=True)

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)


class RedisClusterClient:
    """One `type: redis` cluster in one worker."""

    def __init__(self, cfg: RedisCluster, counts: Counter | None = None):
        self.cfg = cfg
        self.counts: Counter[str] = counts if counts is not None else Counter()   # result -> calls
        self._pools: dict[tuple[int, _Credentials], ConnectionPool] = {}
        self._credentials: dict[RedisOptions, _Credentials] = {}
        self._closing: set[asyncio.Task] = set()
        self._ejected_until = [0.0] * len(cfg.endpoints)
        self._last_log = 0.0
        self._unlogged = 0

    def credentials(self, options: RedisOptions) -> _Credentials:
        """A filter's choice (proxy_redis_init) over the cluster's own; a filter keeps one."""
        cred = self._credentials.get(options)
        if cred is None:
            if len(self._credentials) >= MAX_CREDENTIAL_SETS:
                self._credentials.clear()
            cfg = self.cfg
            user, password = (options.username, options.password) if options.password \
                else (cfg.username, cfg.password)
            db = cfg.database if options.database is None else options.database
            cred = self._credentials[options] = _Credentials(user, password, db)
        return cred

    def _pool(self, index: int, cred: _Credentials) -> ConnectionPool:
        pool = self._pools.get((index, cred))
        if pool is None:
            if len(self._pools) >= MAX_CREDENTIAL_SETS * len(self.cfg.endpoints):
                # A filter cycling through credentials must not pile up connections.
                oldest = self._pools.pop(next(iter(self._pools)))
                task = asyncio.get_running_loop().create_task(oldest.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            pool = self._pools[(index, cred)] = ConnectionPool(
                self.cfg.endpoints[index], cred, self.cfg.max_connections,
                self.cfg.connect_timeout_ms / 1000)
        return pool

    async def call(self, query: bytes, options: RedisOptions) -> bytes:
        timeout = (options.timeout_ms or self.cfg.timeout_ms) / 1000
        try:
            async with asyncio.timeout(timeout):
                reply = await self._call(query, self.credentials(options))
        except TimeoutError:
            self._failed("timeout", f"no reply within {timeout * 1000:g} ms")
            raise CallFailed("timeout") from None
        self.counts["error_reply" if reply[:1] == b"-" else "ok"] += 1
        return reply

    async def _call(self, query: bytes, cred: _Credentials) -> bytes:
        now = time.monotonic()
        for index, until in enumerate(self._ejected_until):
            if until > now:
                continue
            pool = self._pool(index, cred)
            try:
                conn = await pool.acquire()
            except rx.AuthenticationError as e:
                # Redis refused our credentials: hand the filter Redis's own error reply.
                self._failed("auth", f"authentication failed: {e}", count=False)
                return _auth_reply(e)
            except (rx.ConnectionError, rx.TimeoutError, OSError) as e:
                self._ejected_until[index] = time.monotonic() + self.cfg.eject_ms / 1000
                self._failed("refused", f"{self.cfg.endpoints[index]}: {e}", count=False)
                continue
            try:
                await conn.send_packed_command(query, check_health=False)
                try:
                    await conn.read_response(disable_decoding=True)
                except rx.ResponseError:
                    pass                        # an error reply: its bytes are the answer
                return conn._parser.raw          # (our RawReplyParser: the reply's bytes)
            except (rx.ConnectionError, rx.TimeoutError, OSError) as e:
                self._failed("reset", f"{self.cfg.endpoints[index]}: {e}")
                raise CallFailed("reset") from None
            finally:
                await pool.release(conn)
        self._failed("unavailable", "every endpoint refused connections (ejected)")
        raise CallFailed("unavailable")

    def _failed(self, result: str, message: str, *, count: bool = True) -> None:
        if count:
            self.counts[result] += 1
        now = time.monotonic()
        if now - self._last_log < ERROR_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more failures since the last message)" if self._unlogged else ""
        log.error('redis cluster "%s": %s%s', self.cfg.name, message, more)
        self._last_log, self._unlogged = now, 0

    def is_ejected(self, index: int) -> bool:
        return self._ejected_until[index] > time.monotonic()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def _auth_reply(e: rx.AuthenticationError) -> bytes:
    """The error reply Redis gave our AUTH, rebuilt from redis-py's exception."""
    return f"-{e.status_code or 'ERR'} {e}\r\n".encode()
