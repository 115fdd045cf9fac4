"""gateway/redis_client.py against a real redis-server: replies framed byte for byte as Redis
sent them, concurrent calls pipelined on one connection each getting its own reply, the
in-flight bound (max_connections), and a timeout closing the connection under the calls behind
it."""
from __future__ import annotations

import asyncio

import pytest

from abi.api import CallFailed, RedisOptions
from gateway.config import Endpoint, RedisCluster
from gateway.redis_client import RedisClusterClient, reply_end
from tests.redis_server import RedisServer, resp


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


def client(r: RedisServer, **kw) -> RedisClusterClient:
    return RedisClusterClient(RedisCluster("rc", (Endpoint("127.0.0.1", r.port),), **kw))


def gateway_connections(r: RedisServer) -> int:
    """Connections to Redis other than the one asking (tests.redis_server opens one per command)."""
    return sum(1 for line in r.command("CLIENT", "LIST").decode().splitlines()
               if line and "cmd=client|list" not in line)


# Every RESP2 reply kind Redis sends, nested arrays (EVAL) and an empty bulk string included.
QUERIES = [("SET", "rc:k", "v"), ("GET", "rc:k"), ("GET", "rc:none"), ("INCR", "rc:n"),
           ("RPUSH", "rc:l", "a", "", "c\r\nd"), ("LRANGE", "rc:l", "0", "-1"),
           ("LRANGE", "rc:none", "0", "-1"), ("NOSUCHCOMMAND",),
           ("EVAL", "return {1, {'x', {}}, redis.status_reply('OK'), false}", "0")]


async def test_replies_are_redis_bytes_and_framed_exactly(server):
    c = client(server)
    try:
        for q in QUERIES:
            server.command("DEL", "rc:n", "rc:l")          # (the same state for both runs)
            mine = await c.call(resp(*q), RedisOptions())
            server.command("DEL", "rc:n", "rc:l")
            assert mine == server.command(*q), q
            assert reply_end(mine, 0) == len(mine)
            # Every proper prefix is incomplete: a reply split across reads waits for the rest.
            assert all(reply_end(mine[:n], 0) == -1 for n in range(len(mine))), q
    finally:
        await c.aclose()
    with pytest.raises(ValueError):
        reply_end(b"?what\r\n", 0)


async def test_concurrent_calls_are_pipelined_on_one_connection(server):
    c = client(server)
    try:
        before = gateway_connections(server)
        replies = await asyncio.gather(*(c.call(resp("ECHO", f"v{i}"), RedisOptions())
                                         for i in range(300)))
        assert replies == [b"$%d\r\nv%d\r\n" % (len(str(i)) + 1, i) for i in range(300)]
        assert gateway_connections(server) == before + 1
        assert c.counts["ok"] == 300
    finally:
        await c.aclose()


async def test_max_connections_bounds_the_calls_in_flight(server):
    c = client(server, max_connections=2)
    try:
        assert await c.call(resp("PING"), RedisOptions()) == b"+PONG\r\n"   # (connected)
        (conn,) = c._conns.values()
        calls = [c.call(resp("ECHO", str(i)), RedisOptions()) for i in range(6)]
        assert len(conn.pending) == 2                     # the other four wait for room
        assert await asyncio.gather(*calls) == [b"$1\r\n%d\r\n" % i for i in range(6)]
    finally:
        await c.aclose()


async def test_a_timeout_closes_the_connection_under_the_calls_behind_it(server):
    c = client(server, timeout_ms=150)
    try:
        assert await c.call(resp("PING"), RedisOptions()) == b"+PONG\r\n"
        (first,) = c._conns.values()
        blocked = c.call(resp("BLPOP", "rc:empty", "5"), RedisOptions())
        behind = c.call(resp("PING"), RedisOptions(timeout_ms=5000))
        with pytest.raises(CallFailed, match="timeout"):
            await blocked
        with pytest.raises(CallFailed, match="reset"):    # not after its own 5 s
            await behind
        assert first.closed and (c.counts["timeout"], c.counts["reset"]) == (1, 1)
        assert await c.call(resp("PING"), RedisOptions()) == b"+PONG\r\n"   # a new connection
        assert c._conns[(0, c.credentials(RedisOptions()))] is not first
    finally:
        await c.aclose()


def test_a_reply_in_many_pieces_is_walked_once():
    """frame() resumes at the first incomplete element: however small the pieces a reply comes
    in, no complete element is walked again (the old framer rescanned from the reply's start on
    every read, quadratic in the pieces)."""
    from gateway.redis_client import frame
    elements = [resp("x" * (i % 13)) if i % 3 else b":%d\r\n" % i for i in range(2000)]
    nested = b"*2\r\n*3\r\n+a\r\n$-1\r\n*0\r\n:7\r\n"
    reply = b"*%d\r\n" % (len(elements) + 1) + b"".join(elements) + nested
    longest = max(len(e) for e in elements + [nested])
    pos, todo, done = 0, [1], False
    for cut in range(5, len(reply) + 5, 5):
        prefix = reply[:cut]
        start = pos
        pos, done = frame(prefix, pos, todo)
        assert pos >= start                               # never back before where it stopped
        if done:
            break
        assert pos >= len(prefix) - longest               # at most the element in progress again
    assert done and pos == len(reply) and cut >= len(reply)
    # Pieces cut anywhere frame the same replies as the whole.
    whole = reply + b"+OK\r\n" + resp("tail")
    assert reply_end(whole, 0) == len(reply)
    assert reply_end(whole, len(reply)) == len(reply) + 5


async def test_a_reply_over_max_reply_bytes_fails_its_call(server):
    """Over the bound, a call fails (too_large) whether its reply came in one read or is still
    arriving; one still arriving is not held whole: its connection is closed under it."""
    server.command("SET", "rc:big", "v" * 100_000)
    server.command("SET", "rc:huge", "v" * 4_000_000)       # more than one read can bring
    c = client(server, max_reply_bytes=64 * 1024)
    try:
        assert await c.call(resp("PING"), RedisOptions()) == b"+PONG\r\n"
        with pytest.raises(CallFailed, match="too_large"):
            await c.call(resp("GET", "rc:big"), RedisOptions())
        assert await c.call(resp("PING"), RedisOptions()) == b"+PONG\r\n"
        (first,) = [conn for conn in c._conns.values() if not conn.closed]
        with pytest.raises(CallFailed, match="too_large"):
            await c.call(resp("GET", "rc:huge"), RedisOptions())
        assert first.closed and c.counts["too_large"] == 2
        assert first._buf == b"" or len(first._buf) <= 64 * 1024 + 256 * 1024   # not 4 MB
        small = await c.call(resp("GETRANGE", "rc:huge", "0", "9"), RedisOptions())
        assert small == b"$10\r\n" + b"v" * 10 + b"\r\n"   # the next call connects afresh
        # Under the bound, a reply read in many pieces arrives whole.
        server.command("DEL", "rc:list")
        server.command("RPUSH", "rc:list", *(f"item-{i}" for i in range(3000)))
        got = await c.call(resp("LRANGE", "rc:list", "0", "-1"), RedisOptions())
        assert got == server.command("LRANGE", "rc:list", "0", "-1") and len(got) > 40_000
    finally:
        await c.aclose()
