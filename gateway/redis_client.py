"""One `type: redis` cluster in one worker: one pipelined connection per endpoint.

A filter hands us one RESP-encoded command and gets Redis's reply back byte for byte, the way
Higress's Envoy passes a raw reply to ``proxy_on_redis_call_response`` — an error reply
(``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``) is a reply like any other. Only a call
that got no reply (timeout, refused, dropped connection) fails, with ``CallFailed``.

Per cluster and worker: one connection per endpoint (and per set of credentials a filter chose
with ``proxy_redis_init``), as Envoy's and Higress's Redis clients keep. Commands are written as
they come (those of one event-loop turn in one write) and Redis answers them in order, so the
replies are matched first in, first out; a reply is only framed (where it ends), never turned
into Python values. At most ``max_connections`` calls are in flight on a connection; a call
beyond that waits for one to finish. A call is a future, not a task: only a call that has to
wait (for the connection to be made, or for room on it) runs as a task.

Endpoints are a failover list: calls go to the first endpoint that is not ejected; an endpoint
whose connect fails is skipped for ``eject_ms``, and with every endpoint ejected a call fails at
once instead of waiting out its timeout. A call is never retried after its command was sent (it
may have run). A call without a reply within its timeout closes its connection, as Envoy's
client does: the calls pipelined behind it would wait behind the same reply, so they fail at
once (``reset``) and the next call connects afresh.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from abi.api import CallFailed, RedisOptions

from .config import Endpoint, RedisCluster

log = logging.getLogger("wasmgate.redis")

ERROR_LOG_INTERVAL_S = 1.0        # at most one log line per cluster per interval while failing
MAX_CREDENTIAL_SETS = 8           # connections per endpoint (filters' proxy_redis_init choices); oldest go


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str
    database: int


def command(*args: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def frame(buf: bytes | bytearray, pos: int, todo: list[int]) -> tuple[int, bool]:
    """Walk a RESP2 reply from the element at ``pos``. ``todo`` is how many elements each open
    level still needs, innermost last: ``[1]`` for a reply not begun. Returns (where the reply
    ends, True) once it is complete, else (where its first incomplete element starts, False)
    with ``todo`` updated, so the next bytes resume there and no complete element is walked
    twice. Raises ValueError on bytes that are not RESP2."""
    size = len(buf)
    while True:
        line = buf.find(b"\r\n", pos)
        if line < 0:
            return pos, False
        kind = buf[pos]
        if kind in b"+-:":
            end = line + 2
        else:
            n = int(buf[pos + 1:line])
            if kind == 36:                  # '$': a bulk string (-1: nil)
                end = line + 4 + n if n >= 0 else line + 2
                if end > size:
                    return pos, False
            elif kind == 42:                # '*': an array (-1: nil) of n replies
                end = line + 2
                if n > 0:
                    pos = end
                    todo.append(n)
                    continue
            else:
                raise ValueError(f"not a RESP2 reply: {buf[pos:pos + 1]!r}")
        pos = end
        while todo:                         # one element done: count it, close finished arrays
            todo[-1] -= 1
            if todo[-1]:
                break
            todo.pop()
        if not todo:
            return pos, True


def reply_end(buf: bytes, pos: int) -> int:
    """Where the RESP2 reply that starts at ``pos`` ends; -1 while it is incomplete."""
    end, done = frame(buf, pos, [1])
    return end if done else -1


class RedisConnection(asyncio.Protocol):
    """One connection to one endpoint with one set of credentials. ``pending`` holds, in the
    order the commands were written, each call's (future, deadline); the connection's one timer
    fires at the earliest deadline."""

    def __init__(self, client: "RedisClusterClient", ep: Endpoint, cred: _Credentials):
        self.client = client
        self.ep = ep
        self.cred = cred
        self.loop = asyncio.get_running_loop()
        self.depth = client.cfg.max_connections
        self.max_reply = client.cfg.max_reply_bytes
        self.pending: deque[tuple[asyncio.Future, float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.ready = False              # connected and authenticated: calls may go out
        self.closed = False
        self.draining = False           # closes once its calls in flight have their replies
        self._out: list[bytes] = []     # commands of this loop turn, written together
        self._buf: bytes | bytearray = b""     # the start of a reply still incomplete
        self._scan = 0                  # where in _buf its walk resumes (frame)
        self._todo: list[int] = []      # and the elements its open levels still need
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._room: deque[asyncio.Future] = deque()
        self._opening: asyncio.Future | None = None

    async def open(self, connect_timeout_s: float) -> tuple[str, bytes] | None:
        """Connect, authenticate and select the database (once, whoever asks first). None when
        ready; (what, Redis's error reply) when Redis refused AUTH or SELECT. Raises OSError /
        TimeoutError when the endpoint cannot be reached."""
        if self._opening is None:
            self._opening = self.loop.create_task(self._open(connect_timeout_s))
        return await asyncio.shield(self._opening)

    async def _open(self, connect_timeout_s: float) -> tuple[str, bytes] | None:
        try:
            async with asyncio.timeout(connect_timeout_s):
                await self.loop.create_connection(lambda: self, self.ep.host, self.ep.port)
            cred = self.cred
            hello = []
            if cred.password:
                auth = (cred.username, cred.password) if cred.username else (cred.password,)
                hello.append(("authentication", command("AUTH", *auth)))
            if cred.database:
                hello.append((f"selecting database {cred.database}",
                              command("SELECT", str(cred.database))))
            deadline = self.loop.time() + connect_timeout_s
            replies = await asyncio.gather(*(self.send(q, deadline) for _, q in hello))
            for (what, _), reply in zip(hello, replies):
                if reply[:1] == b"-":
                    self.close()
                    return what, reply
        except BaseException:
            self.close()
            raise
        self.ready = not self.closed
        return None

    def send(self, query: bytes, deadline: float) -> asyncio.Future:
        """Write one command; the future gets its reply's bytes (or CallFailed)."""
        fut = self.loop.create_future()
        if self.closed:
            self.client.counts["reset"] += 1
            fut.set_exception(CallFailed("reset"))
            return fut
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(query)
        self.pending.append((fut, deadline))
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return fut

    async def room(self) -> None:
        """Wait until fewer than ``depth`` calls are in flight."""
        while len(self.pending) >= self.depth and not self.closed:
            waiter = self.loop.create_future()
            self._room.append(waiter)
            await waiter

    def _flush(self) -> None:
        if self.transport is not None and self._out:
            out, self._out = self._out, []
            self.transport.write(b"".join(out))

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        if not self.pending:
            return
        now = self.loop.time()
        first = min(deadline for _, deadline in self.pending)
        if first > now:
            self._arm(first)
            return
        expired = [fut for fut, deadline in self.pending if deadline <= now and not fut.done()]
        for fut in expired:
            fut.set_exception(CallFailed("timeout"))
        self.client.counts["timeout"] += len(expired)
        self.client._failed("timeout", f"{self.ep}: no reply within the call's timeout "
                            "(its connection is closed)", count=False)
        self.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport      # type: ignore[assignment]
        if self.closed:                 # (closed while connecting: evicted, shut down)
            transport.close()
        elif self._out:                   # (written before the connection was there)
            self._flush()

    def data_received(self, data: bytes) -> None:
        if self._buf:                   # the rest of a reply: grown in place, not copied anew
            self._buf += data
            buf = self._buf
            scan, todo = self._scan, self._todo
        else:
            buf = data
            scan, todo = 0, [1]
        pos = 0
        pending = self.pending
        counts = self.client.counts
        try:
            while pending:
                end, done = frame(buf, scan, todo)
                if not done:
                    scan = end
                    break
                fut = pending.popleft()[0]
                if fut.done():
                    pass
                elif end - pos > self.max_reply:
                    self._too_large(fut)
                else:
                    reply = bytes(buf[pos:end]) if buf is self._buf else buf[pos:end]
                    counts["error_reply" if reply[:1] == b"-" else "ok"] += 1
                    fut.set_result(reply)
                pos = scan = end
                todo = [1]
        except ValueError as e:
            self.client._failed("reset", f"{self.ep}: {e}")
            self.close()
            return
        if pos or buf is data:
            self._buf = bytearray(buf[pos:]) if pos < len(buf) else b""
        self._scan, self._todo = scan - pos, todo
        if len(self._buf) > self.max_reply and pending:
            # Still arriving: rather than hold it whole, drop the connection under it.
            self._too_large(pending.popleft()[0])
            self.close()
            return
        if self._room:
            self._wake()
        if pending:
            return
        if self._buf:
            self.client._failed("reset", f"{self.ep}: a reply no command asked for")
            self.close()
        elif self.draining:
            self.close()

    def _too_large(self, fut: asyncio.Future) -> None:
        """A reply is handed to the filter whole: one over max_reply_bytes fails its call."""
        self.client._failed("too_large", f"{self.ep}: a reply over max_reply_bytes ({self.max_reply})",
                            count=False)
        if not fut.done():
            self.client.counts["too_large"] += 1
            fut.set_exception(CallFailed("too_large"))

    def _wake(self) -> None:
        while self._room:
            w = self._room.popleft()
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if self.pending:
                self.client._failed("reset", f"{self.ep}: connection lost ({exc or 'closed by Redis'})",
                                    count=False)
        self._fail_pending()

    def close_when_idle(self) -> None:
        """No new calls; close once those in flight have their replies (a reload, a credential
        set evicted)."""
        self.ready = False
        self.draining = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        self.closed = True
        self.ready = False
        if self.transport is not None:
            self.transport.close()
        self._fail_pending()

    def _fail_pending(self) -> None:
        self.ready = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, deque()
        for fut, _ in pending:
            if not fut.done():
                self.client.counts["reset"] += 1
                fut.set_exception(CallFailed("reset"))
        self._wake()


class RedisClusterClient:
    """One `type: redis` cluster in one worker."""

    def __init__(self, cfg: RedisCluster, counts: Counter | None = None):
        self.cfg = cfg
        self.counts: Counter[str] = counts if counts is not None else Counter()   # result -> calls
        self._conns: dict[tuple[int, _Credentials], RedisConnection] = {}
        self._credentials: dict[RedisOptions, _Credentials] = {}
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

    def call(self, query: bytes, options: RedisOptions) -> asyncio.Future:
        """The future of one command's reply (bytes; CallFailed when none came)."""
        cred = self.credentials(options)
        timeout = (options.timeout_ms or self.cfg.timeout_ms) / 1000
        now = time.monotonic()          # (the event loop's clock)
        for index, until in enumerate(self._ejected_until):
            if until > now:
                continue
            conn = self._conns.get((index, cred))
            if conn is not None and conn.ready and len(conn.pending) < conn.depth:
                return conn.send(query, now + timeout)
            break
        return asyncio.get_running_loop().create_task(self._call_waiting(query, cred, timeout))

    async def _call_waiting(self, query: bytes, cred: _Credentials, timeout: float) -> bytes:
        """A call that has to wait: for a connection to be made (failing over to the next
        endpoint if it cannot be), or for room on it."""
        try:
            async with asyncio.timeout(timeout):
                deadline = asyncio.get_running_loop().time() + timeout
                for index, until in enumerate(self._ejected_until):
                    if until > time.monotonic():
                        continue
                    conn = self._conn(index, cred)
                    try:
                        refused = await conn.open(self.cfg.connect_timeout_ms / 1000)
                    except (OSError, TimeoutError) as e:
                        if conn is self._conns.get((index, cred)):
                            del self._conns[(index, cred)]
                        self._ejected_until[index] = time.monotonic() + self.cfg.eject_ms / 1000
                        self._failed("refused", f"{self.cfg.endpoints[index]}: "
                                     f"{e or 'connect timed out'}", count=False)
                        continue
                    if refused is not None:
                        # Redis refused our AUTH or SELECT: the filter gets Redis's own reply.
                        what, reply = refused
                        self._failed("auth", f"{what} failed: {reply[1:].decode('latin-1').strip()}",
                                     count=False)
                        self.counts["error_reply"] += 1
                        return reply
                    await conn.room()
                    return await conn.send(query, deadline)
        except TimeoutError:
            self._failed("timeout", f"no reply within {timeout * 1000:g} ms")
            raise CallFailed("timeout") from None
        self._failed("unavailable", "every endpoint refused connections (ejected)")
        raise CallFailed("unavailable")

    def _conn(self, index: int, cred: _Credentials) -> RedisConnection:
        """The connection to endpoint ``index`` with ``cred`` (a new one if it closed)."""
        key = (index, cred)
        conn = self._conns.get(key)
        if conn is None or conn.closed or conn.draining:
            if conn is None and len(self._conns) >= MAX_CREDENTIAL_SETS * len(self.cfg.endpoints):
                # A filter cycling through credentials must not pile up connections.
                self._conns.pop(next(iter(self._conns))).close_when_idle()
            conn = self._conns[key] = RedisConnection(self, self.cfg.endpoints[index], cred)
        return conn

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
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close_when_idle()
