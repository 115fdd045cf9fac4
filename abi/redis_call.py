"""Higress's Redis call ABI: ``proxy_redis_init``, ``proxy_redis_call``, and the guest callback
``proxy_on_redis_call_response(root_context_id, token, status, response_size)`` during which
buffer 9 (REDIS_CALL_RESPONSE) holds Redis's reply exactly as it came off the wire.

Host side as Higress implements it (higress-group/proxy-wasm-cpp-host src/exports.cc
``redis_init`` / ``redis_call``, Envoy ``Context::redisInit`` / ``redisCall``):

- both act on the ROOT context (``contextOrEffectiveContext()->root_context()``); the answer is
  delivered to the root, with the token, whatever context dispatched the call — also after that
  request is gone (the SDKs drop an answer whose context was deleted);
- ``redis_call`` writes token 0 first to prove the out-pointer, then starts the call;
- an unknown (or non-Redis) cluster is BAD_ARGUMENT ("bad argument" is what Higress users see
  for a Redis service it cannot find);
- the cluster name may carry Envoy's client parameters: ``name?db=1&buffer_flush_timeout=0``;
  ``db`` selects the database, the batching knobs are accepted and have no effect here;
- a Redis error reply (``-ERR ...``) is a reply: status 0 and the raw bytes, as Envoy's raw
  Redis client hands it over; a timeout or a refused / dropped connection is status CALL_FAILED
  with an empty buffer.

Where Higress would write a malformed query to the connection (and Redis answers it with a
protocol error, or waits for the rest of an incomplete one), we check it first and answer the
filter with the protocol error Redis would send, without touching the shared connection.
"""
from __future__ import annotations

import asyncio
from functools import partial
from urllib.parse import parse_qsl

from . import limits
from .seam import CallFailed, RedisOptions
from .enums import Status
from .context import FilterView

CALL_FAILED = 1                  # callback status of a call without a reply (timeout, refused, reset)
_TOKEN_STEP = 4                  # tokens 3, 7, 11...: low bits 3, never equal to an HTTP callout's
_U32 = 0xFFFFFFFF
_MAX_ARGS = 1 << 20              # Redis's own limits on a multibulk request
_MAX_BULK = 512 << 20


def split_cluster(spec: str) -> tuple[str, dict[str, str]]:
    """``"name?db=1&x=y"`` -> ("name", {"db": "1", "x": "y"})."""
    name, _, query = spec.partition("?")
    return name, dict(parse_qsl(query, keep_blank_values=True)) if query else {}


def query_error(q: bytes) -> str | None:
    """Why ``q`` is not exactly one RESP array of bulk strings (what Redis reads as one
    command), in Redis's words; None when it is. Only the framing is checked — what makes a
    command complete, so that no query leaves the connection waiting or carries a second one;
    Redis judges the rest (it answers, e.g., a bulk length of " 3" with its own error)."""
    if q[:1] != b"*":
        got = q[:1].decode("latin-1") or "nothing"
        return f"expected '*', got '{got}' (a query is one RESP array of bulk strings)"
    find = q.find
    end = find(b"\r\n")
    try:
        count = int(q[1:end]) if end > 0 else 0
    except ValueError:
        count = 0
    if not 0 < count <= _MAX_ARGS:
        return "invalid multibulk length"
    pos = end + 2
    for _ in range(count):
        if q[pos:pos + 1] != b"$":
            got = q[pos:pos + 1].decode("latin-1") or "end of query"
            return f"expected '$', got '{got}'"
        end = find(b"\r\n", pos)
        try:
            size = int(q[pos + 1:end]) if end > 0 else -1
        except ValueError:
            size = -1
        if not 0 <= size <= _MAX_BULK:
            return "invalid bulk length"
        pos = end + 2 + size
        if q[pos:pos + 2] != b"\r\n":
            return "incomplete bulk string"
        pos += 2
    if pos != len(q):
        return "more than one command in one query"
    return None


class RedisCalls:
    """One filter instance's Redis calls: the options its root chose, the calls in flight, and
    the reply readable as buffer 9 while ``proxy_on_redis_call_response`` runs."""

    def __init__(self, f: FilterView):
        self.f = f
        self.options: dict[str, RedisOptions] = {}      # cluster name -> proxy_redis_init's choice
        self.pending: dict[int, asyncio.Future] = {}
        self.response: bytes | None = None
        self._next_token = 3

    def _known(self, name: str) -> bool:
        # (services change on a config reload: looked up each time)
        has = getattr(self.f.services, "has_redis_cluster", None)
        return has is not None and has(name)

    def init(self, cluster: str, username: str, password: str, timeout_ms: int) -> int:
        """proxy_redis_init: remember how this filter talks to the cluster; nothing connects yet
        (as Higress: a wrong password shows up on the first call, as Redis's error reply)."""
        name, params = split_cluster(cluster)
        if self.f.closed or not self._known(name):
            return Status.BAD_ARGUMENT
        db = params.get("db")
        if db is not None and not db.isdigit():
            return Status.BAD_ARGUMENT
        self.options[name] = RedisOptions(username, password, int(db) if db else None, timeout_ms)
        return Status.OK

    def call(self, cluster: str, query: bytes) -> tuple[int, int]:
        """proxy_redis_call: (status, token); the answer comes later, to the root context."""
        f = self.f
        name, _params = split_cluster(cluster)
        if f.closed or not self._known(name):
            return Status.BAD_ARGUMENT, 0
        if len(self.pending) + len(f._held) >= limits.MAX_PENDING_REDIS_CALLS:
            return Status.INTERNAL_FAILURE, 0
        token = self._next_token
        self._next_token = (token + _TOKEN_STEP) & _U32 or 3
        options = self.options.get(name) or RedisOptions()

        def start() -> None:             # (from a start sequence: at the swap, see Filter.on_loop)
            fut = self._send(name, query, options)
            self.pending[token] = fut
            fut.add_done_callback(partial(self._done, token, f.generation, name))
        f.on_loop(start)
        return Status.OK, token

    def _send(self, name: str, query: bytes, options: RedisOptions) -> asyncio.Future:
        """The future of the reply: the host's (a future, no task per call), or Redis's protocol
        error at once for a query that is not one command."""
        problem = query_error(query)
        if problem is None:
            try:
                return asyncio.ensure_future(self.f.services.redis_call(name, query, options))
            except Exception as e:       # noqa: BLE001 — a gateway bug is a failed call (_done)
                fut = self.f.loop.create_future()
                fut.set_exception(e)
                return fut
        fut = self.f.loop.create_future()
        fut.set_result(b"-ERR Protocol error: " + problem.encode() + b"\r\n")
        return fut

    def _done(self, token: int, generation: int, name: str, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self.pending.pop(token, None)
            return
        status, reply = Status.OK, b""
        e = fut.exception()
        if e is None:
            reply = fut.result()
        elif isinstance(e, CallFailed):
            status = CALL_FAILED
            # (the gateway logs Redis failures per cluster, at most once a second)
            self.f.log.debug('redis call of filter "%s" to %s failed: %s', self.f.name, name,
                             e.reason)
        else:                            # a gateway bug is a failed call here
            status = CALL_FAILED
            self.f.log.error('filter "%s": redis call to %s failed: %r', self.f.name, name, e)
        f = self.f
        if self.pending.pop(token, None) is None or generation != f.generation or f.root is None:
            return
        if not f.has("proxy_on_redis_call_response"):
            return
        self.response = reply
        try:
            f.notify_root("proxy_on_redis_call_response", token, status, len(reply))
        finally:
            self.response = None

    def cancel_all(self) -> None:
        """The instance is gone (trap, close): its calls' answers have nowhere to go."""
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
