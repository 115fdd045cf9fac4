"""Higress's Redis call ABI against a real redis-server: every status of proxy_redis_call and
proxy_redis_init, the callback (root context id, token, status, size) with the raw reply in
buffer 9, and each failure — unknown cluster, malformed query, error reply, timeout, dropped
connection, refused connection, too many calls in flight — reaching the filter as Higress
reports it."""
from __future__ import annotations

import asyncio
import time

import pytest

import abi.limits
from abi.api import LogInfo
from gateway.config import Endpoint, RedisCluster
from gateway.redis_clusters import RedisClusters
from tests.helpers import until
from tests.redis_server import RedisServer, resp

from abi_helpers import REQ, info
from abi_wat import LOG_OUT, OUT, REDIS_IMPORTS, Wat, status

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"
TOKEN = OUT + 12


def cluster(r: RedisServer, name: str = "rc", **kw) -> RedisCluster:
    host, port = r.endpoint.split(":")
    return RedisCluster(name, (Endpoint(host, int(port)),), **kw)


def attach(services, *clusters: RedisCluster) -> RedisClusters:
    """Give the test's HostServices real Redis clusters (gateway/redis_clusters.py)."""
    redis = RedisClusters(tuple(clusters))
    services.has_redis_cluster = redis.has
    services.redis_call = redis.call
    return redis


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
async def redis(services, shared_redis):
    rc = attach(services, cluster(shared_redis, timeout_ms=2000), cluster(shared_redis, "rc3", database=3))
    yield shared_redis
    await rc.aclose()


def redis_filter(dispatch_in: str = "proxy_on_request_headers", *, result: int = 0) -> Wat:
    """A Higress-Go-SDK-like filter: the callback traces (root, token, status), the size, then
    reads buffer 9."""
    w = Wat(imports=REDIS_IMPORTS)
    w.on("proxy_on_redis_call_response",
         w.trace("reply", 3) + f"(call $log_num {w.s('size')} (local.get $d))"
         + status(w, "buf", f"(call $proxy_get_buffer_bytes (i32.const 9) (i32.const 0) (i32.const -1) {O})")
         + LOG_OUT)
    return w


def call(w: Wat, cluster_name: str, query: bytes, label: str = "call") -> str:
    return (status(w, label, f"(call $proxy_redis_call {w.s(cluster_name)} {w.s(query)} (i32.const {TOKEN}))")
            + f"(call $log_num {w.s('token')} (i32.load (i32.const {TOKEN})))")


def init(w: Wat, cluster_name: str, user: str = "", password: str = "", timeout_ms: int = 0,
         label: str = "init") -> str:
    return status(w, label, f"(call $proxy_redis_init {w.s(cluster_name)} {w.s(user)} {w.s(password)} "
                            f"(i32.const {timeout_ms}))")


def replies(trace) -> list[str]:
    return [l for l in trace.lines("f") if l.startswith("reply")]


async def run_headers(host):
    s = host.stream(["f"], info())
    await asyncio.wait_for(s.request(REQ, None), 5)
    return s


async def headers_only(host, trace) -> list[str]:
    """One request whose calls all fail at dispatch: its trace lines; no call is in flight."""
    trace.records.clear()
    s = await run_headers(host)
    assert not host.filters["f"].redis.pending
    await s.finish(LogInfo())
    return [l for l in trace.lines("f")[1:] if not l.startswith("proxy_on_")]


async def two_calls(host, trace) -> tuple[list[str], list[tuple[str, ...]]]:
    """One request whose headers callback makes two calls: the dispatch lines, and the two
    answers (reply, size, buf, bytes) sorted — two connections, either may answer first."""
    trace.records.clear()
    s = await run_headers(host)
    await until(lambda: len(replies(trace)) == 2)
    await s.finish(LogInfo())
    lines = trace.lines("f")
    return lines[1:5], sorted(tuple(lines[i:i + 4]) for i in (5, 9))


async def test_call_delivers_the_raw_reply_to_the_root_with_its_token(load, trace, redis):
    w = redis_filter()
    w.on("proxy_on_request_headers",
         call(w, "rc", resp("SET", "abi:k2", "x"), "set") + call(w, "rc", resp("GET", "abi:k"), "get")
         + " (i32.const 0)")
    redis.command("SET", "abi:k", "v1")       # (the two calls may run in either order)
    dispatched, answers = await two_calls(await load(w), trace)
    assert dispatched == ["set 0", "token 3", "get 0", "token 7"]
    # root context id 1 (not the stream's 2), the token, status 0; buffer 9 = the wire bytes.
    assert answers == [("reply 1 3 0", "size 5", "buf 0", "+OK\r\n"),
                       ("reply 1 7 0", "size 8", "buf 0", "$2\r\nv1\r\n")]


async def test_call_from_on_configure_is_sent_once_the_instance_serves(load, trace, redis):
    """The start sequence runs on a build thread (abi/filter.py): the call it makes is sent
    from the event loop at the swap, and the answer reaches the root there."""
    import threading
    w = redis_filter()
    w.on("proxy_on_configure", init(w, "rc") + call(w, "rc", resp("PING"), "ping") + " (i32.const 1)")
    await load(w)
    await until(lambda: len(replies(trace)) == 1)
    lines = [l for l in trace.lines("f") if not l.startswith("proxy_on_")]
    assert lines[:3] == ["init 0", "ping 0", "token 3"]
    assert lines[3:] == ["reply 1 3 0", "size 7", "buf 0", "+PONG\r\n"]
    thread_of = {r.getMessage().split('": ', 1)[1]: r.threadName for r in trace.records
                 if r.getMessage().startswith('filter "f": ')}
    assert thread_of["ping 0"].startswith("wasmgate-build")
    assert thread_of["reply 1 3 0"] == threading.current_thread().name


async def test_unknown_or_http_cluster_is_bad_argument(load, trace, redis, services):
    services.clusters["backend"] = object()          # an HTTP cluster: not for Redis calls
    w = redis_filter()
    w.on("proxy_on_request_headers",
         call(w, "nope", resp("PING"), "unknown") + call(w, "backend", resp("PING"), "http")
         + init(w, "nope", label="init-unknown") + init(w, "backend", label="init-http")
         + init(w, "rc?db=x", label="init-baddb")
         + status(w, "http-to-redis", f"(call $proxy_http_call {w.s('rc')} {w.s(b'')} (i32.const 0) (i32.const 0) "
                                      f"(i32.const 0) (i32.const 0) (i32.const 100) (i32.const {OUT}))")
         + " (i32.const 0)")
    host = await load(w)
    assert await headers_only(host, trace) == [
        "unknown 2", "token 0", "http 2", "token 0", "init-unknown 2", "init-http 2", "init-baddb 2",
        "http-to-redis 2"]


async def test_bad_pointers_are_invalid_memory_access_and_nothing_is_sent(load, trace, redis):
    w = redis_filter()
    w.on("proxy_on_request_headers",
         status(w, "call", f"(call $proxy_redis_call {w.s('rc')} {w.s(resp('SET', 'abi:never', '1'))} "
                           "(i32.const 0x7ffffff0))")
         + status(w, "badquery", f"(call $proxy_redis_call {w.s('rc')} (i32.const 0x7ffffff0) (i32.const 16) "
                                 f"(i32.const {TOKEN}))")
         + status(w, "badinit", "(call $proxy_redis_init (i32.const 0x7ffffff0) (i32.const 2) (i32.const 0) "
                                "(i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))")
         + " (i32.const 0)")
    host = await load(w)
    assert await headers_only(host, trace) == ["call 6", "badquery 6", "badinit 6"]
    assert redis.command("EXISTS", "abi:never") == b":0\r\n"


@pytest.mark.parametrize("query, problem", [
    (b"PING\r\n", "expected '*', got 'P' (a query is one RESP array of bulk strings)"),  # inline
    (b"*2\r\n$3\r\nGET\r\n", "expected '$', got 'end of query'"),    # incomplete
    (b"*1\r\n$4\r\nPI\r\n", "incomplete bulk string"),
    (b"*x\r\n", "invalid multibulk length"),
    (resp("PING") + resp("PING"), "more than one command in one query"),
])
async def test_malformed_query_gets_redis_protocol_error_reply(load, trace, redis, query, problem):
    w = redis_filter()
    w.on("proxy_on_request_headers", call(w, "rc", query) + call(w, "rc", resp("PING"), "after")
         + " (i32.const 0)")
    dispatched, answers = await two_calls(await load(w), trace)
    assert dispatched == ["call 0", "token 3", "after 0", "token 7"]
    err = f"-ERR Protocol error: {problem}\r\n"
    # The connection was never touched: the next call on it is answered normally.
    assert answers == [("reply 1 3 0", f"size {len(err)}", "buf 0", err),
                       ("reply 1 7 0", "size 7", "buf 0", "+PONG\r\n")]


async def test_redis_error_reply_is_status_ok_with_the_error_bytes(load, trace, redis):
    w = redis_filter()
    w.on("proxy_on_request_headers", call(w, "rc", resp("NOSUCHCMD", "x")) + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s = await run_headers(host)
    await until(lambda: replies(trace))
    lines = trace.lines("f")
    assert lines[3] == "reply 1 3 0"
    assert lines[6].startswith("-ERR unknown command 'NOSUCHCMD'")
    await s.finish(LogInfo())


async def test_timeout_is_a_failed_call_with_an_empty_buffer(load, trace, redis):
    # BLPOP on an empty list holds the reply for 2 s; proxy_redis_init's timeout is 100 ms.
    w = redis_filter()
    w.on("proxy_on_configure", init(w, "rc", timeout_ms=100) + " (i32.const 1)")
    w.on("proxy_on_request_headers", call(w, "rc", resp("BLPOP", "abi:empty", "2")) + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    t0 = time.monotonic()
    s = await run_headers(host)
    await until(lambda: replies(trace))
    elapsed = time.monotonic() - t0
    assert trace.lines("f")[3:] == ["reply 1 3 1", "size 0", "buf 0", ""]
    assert 0.09 < elapsed < 1.5                 # the init timeout, not BLPOP's 2 s
    await s.finish(LogInfo())


async def test_dropped_connection_and_refused_connection_are_failed_calls(load, trace, services, tmp_path):
    r = RedisServer(tmp_path).start()
    rc = attach(services, cluster(r, timeout_ms=5000, eject_ms=0))     # (no ejection to wait out)
    try:
        w = redis_filter()
        w.on("proxy_on_request_headers", call(w, "rc", resp("BLPOP", "abi:empty", "10")) + " (i32.const 0)")
        host = await load(w)
        trace.records.clear()
        s = await run_headers(host)
        await until(lambda: r.command("CLIENT", "LIST").count(b"cmd=blpop") == 1)
        t0 = time.monotonic()
        r.kill()                                   # the connection drops under the pending call
        await until(lambda: replies(trace))
        assert time.monotonic() - t0 < 2.0         # not the 5 s timeout: the reset is seen at once
        assert replies(trace) == ["reply 1 3 1"]
        await s.finish(LogInfo())
        trace.records.clear()
        t0 = time.monotonic()
        s = await run_headers(host)                # nothing listens now: refused
        await until(lambda: replies(trace))
        assert replies(trace) == ["reply 1 7 1"] and time.monotonic() - t0 < 2.0
        await s.finish(LogInfo())
        r.start()                                  # back on the same port: calls work again
        r.command("RPUSH", "abi:empty", "x")       # (so that BLPOP answers at once)
        trace.records.clear()
        s = await run_headers(host)
        await until(lambda: replies(trace))
        assert replies(trace) == ["reply 1 11 0"]
        await s.finish(LogInfo())
    finally:
        r.stop()
        await rc.aclose()


async def test_calls_in_flight_are_bounded_per_instance(load, trace, redis, monkeypatch):
    monkeypatch.setattr(abi.limits, "MAX_PENDING_REDIS_CALLS", 2)
    w = redis_filter()
    q = resp("BLPOP", "abi:empty", "0.2")
    w.on("proxy_on_request_headers", call(w, "rc", q, "c1") + call(w, "rc", q, "c2") + call(w, "rc", q, "c3")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s = await run_headers(host)
    assert trace.lines("f")[1:7] == ["c1 0", "token 3", "c2 0", "token 7", "c3 10", "token 0"]
    await until(lambda: len(replies(trace)) == 2)
    assert sorted(replies(trace)) == ["reply 1 3 0", "reply 1 7 0"]      # nil after 0.2 s
    await s.finish(LogInfo())


async def test_answer_after_the_request_is_gone_still_reaches_the_root(load, trace, redis):
    # As on Higress the call belongs to the root context: the request ends (on_delete 2) while
    # BLPOP waits, then the answer arrives with the root's id; the stream cannot be made
    # effective any more (the SDKs then drop the answer).
    w = redis_filter()
    w.on("proxy_on_request_headers", call(w, "rc", resp("BLPOP", "abi:empty", "0.3")) + " (i32.const 0)")
    w.callbacks["proxy_on_redis_call_response"] += status(
        w, "effective", "(call $proxy_set_effective_context (i32.const 2))")
    host = await load(w)
    trace.records.clear()
    s = await run_headers(host)
    await s.finish(LogInfo())
    assert "proxy_on_delete 2" in trace.lines("f")
    await until(lambda: replies(trace))
    lines = trace.lines("f")
    assert lines[lines.index("proxy_on_delete 2") + 1:] == [
        "reply 1 3 0", "size 5", "buf 0", "*-1\r\n", "effective 2"]


async def test_call_from_on_tick(load, trace, redis):
    w = redis_filter()
    w.extra.append("(global $ticked (mut i32) (i32.const 0))")
    w.on("proxy_on_configure", "(drop (call $proxy_set_tick_period_milliseconds (i32.const 10))) (i32.const 1)")
    w.on("proxy_on_tick",
         "(if (i32.eqz (global.get $ticked)) (then (global.set $ticked (i32.const 1))"
         + call(w, "rc", resp("INCR", "abi:ticks"))
         + "(drop (call $proxy_set_tick_period_milliseconds (i32.const 0)))))")
    redis.command("DEL", "abi:ticks")
    await load(w)
    await until(lambda: replies(trace))
    lines = trace.lines("f")
    assert lines[lines.index("call 0"):] == ["call 0", "token 3", "reply 1 3 0", "size 4", "buf 0", ":1\r\n"]


async def test_init_selects_the_database_from_the_cluster_name(load, trace, redis):
    w = redis_filter()
    w.on("proxy_on_configure", init(w, "rc?db=5&buffer_flush_timeout=0") + " (i32.const 1)")
    w.on("proxy_on_request_headers", call(w, "rc", resp("SET", "abi:db", "five")) + " (i32.const 0)")
    host = await load(w)
    s = await run_headers(host)
    await until(lambda: replies(trace))
    assert "init 0" in trace.lines("f")
    assert redis.command("SELECT", "5") == b"+OK\r\n"
    with_db = redis.command("EXISTS", "abi:db")          # (a fresh connection: database 0)
    assert with_db == b":0\r\n"
    await s.finish(LogInfo())
    # The cluster's own `database: 3` applies when the filter does not choose one.
    w2 = redis_filter()
    w2.on("proxy_on_request_headers", call(w2, "rc3", resp("CLIENT", "INFO")) + " (i32.const 0)")
    trace.records.clear()
    host2 = await load(w2)
    s = await run_headers(host2)
    await until(lambda: replies(trace))
    assert " db=3 " in trace.lines("f")[-1]
    await s.finish(LogInfo())


async def test_password_from_the_cluster_and_wrong_password_from_init(load, trace, services, tmp_path):
    r = RedisServer(tmp_path, password="s3cret").start()
    rc = attach(services, cluster(r, "good", password="s3cret"), cluster(r, "nopass"))
    try:
        w = redis_filter()
        w.on("proxy_on_configure", init(w, "nopass", password="wrong") + " (i32.const 1)")
        w.on("proxy_on_request_headers", call(w, "good", resp("PING"), "good")
             + call(w, "nopass", resp("PING"), "wrong") + " (i32.const 0)")
        host = await load(w)
        assert "init 0" in trace.lines("f")          # as Higress: init does not connect
        trace.records.clear()
        s = await run_headers(host)
        await until(lambda: len(replies(trace)) == 2)
        out = "\n".join(trace.lines("f"))
        assert "reply 1 3 0\nsize 7\nbuf 0\n+PONG\r\n" in out
        assert "reply 1 7 0" in out and "-WRONGPASS invalid username-password pair" in out
        await s.finish(LogInfo())
    finally:
        r.stop()
        await rc.aclose()
