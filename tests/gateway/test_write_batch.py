"""Writes queued in one event-loop turn go out together when it ends (gateway/write_batch.py),
never out of order with the writes made at once, and never lost when a connection closes."""
import asyncio
import socket

import pytest
import uvloop
from aiohttp import web

from gateway.write_batch import MAX_QUEUED, batch_for
from tests.gateway.conftest import basic_yaml
from tests.helpers import echo_upstream, raw_exchange, run_gateway, split_responses


async def _pair():
    """A real transport (the loop's) to a plain non-blocking socket we read without the loop."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, sock=ours)
    return transport, theirs


def _received(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


async def test_queued_writes_leave_together_when_the_turn_ends():
    batch = batch_for(asyncio.get_running_loop())
    pairs = [await _pair() for _ in range(3)]
    try:
        for i, (transport, _) in enumerate(pairs):
            batch.write(transport, b"answer %d;" % i)
        batch.write(pairs[1][0], b"more")     # appended to the same transport's bytes
        assert [_received(theirs) for _, theirs in pairs] == [b"", b"", b""]   # not before the turn ends
        await asyncio.sleep(0)      # one turn of the loop: the flush runs
        assert [_received(theirs) for _, theirs in pairs] == [b"answer 0;", b"answer 1;more", b"answer 2;"]
    finally:
        for transport, theirs in pairs:
            transport.close()
            theirs.close()


async def test_settle_writes_now_in_order_and_large_writes_do_not_wait():
    batch = batch_for(asyncio.get_running_loop())
    (t1, s1), (t2, s2) = await _pair(), await _pair()
    try:
        batch.write(t1, b"first ")
        batch.write(t1, b"second ")
        batch.settle(t1)
        t1.write(b"third")
        assert _received(s1) == b"first second third"
        big = b"x" * (MAX_QUEUED + 1)
        batch.write(t2, big)
        got = _received(s2)
        assert got and big.startswith(got)      # sent at once (as much as the socket took)
        batch.settle(t1)                        # nothing queued: nothing written
        assert _received(s1) == b""
    finally:
        for t, s in ((t1, s1), (t2, s2)):
            t.close()
            s.close()


async def test_a_closed_transport_drops_its_queue_and_the_others_still_go():
    batch = batch_for(asyncio.get_running_loop())
    (t1, s1), (t2, s2) = await _pair(), await _pair()
    try:
        batch.write(t1, b"lost")
        batch.write(t2, b"kept")
        t1.abort()
        await asyncio.sleep(0)
        assert _received(s1) == b""
        assert _received(s2) == b"kept"
    finally:
        t2.close()
        s1.close()
        s2.close()


async def _gather_many_writes() -> None:
    batch = batch_for(asyncio.get_running_loop())
    t, s = await _pair()
    try:
        pieces = [b"answer %06d\n" % i for i in range(4 * MAX_QUEUED // 14)]
        early = b""
        for piece in pieces:
            batch.write(t, piece)
            early += _received(s)   # the socket never fills: what the batch hands over arrives
        total = sum(map(len, pieces))
        # All but the last MAX_QUEUED bytes (and one piece) went out before the turn ended.
        assert total - len(early) <= MAX_QUEUED + len(pieces[0]), (total, len(early))
        assert len(early) >= 3 * MAX_QUEUED
        await asyncio.sleep(0)
        assert early + _received(s) == b"".join(pieces)     # all of it, in order
    finally:
        t.close()
        s.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_many_writes_to_one_transport_in_a_turn_go_out_at_the_bound_in_order(loop_kind):
    """Many answers to one connection in one turn (pipelined requests the gateway answers itself,
    with limits.max_requests_per_io_cycle raised): what its transport gathers is handed over each
    time it passes MAX_QUEUED (memory stays bounded outside the transport's flow control), in
    order, on both loops the gateway runs on (the gathered bytes reach it as a bytearray)."""
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(_gather_many_writes())
    finally:
        loop.close()


@pytest.mark.parametrize("per_cycle", [None, 100_000])
async def test_thousands_of_pipelined_local_replies_come_back_whole_and_in_order(tmp_path, per_cycle):
    """3,000 requests in one write, each answered by the gateway itself (404: no route): one a
    turn by default (limits.max_requests_per_io_cycle), or all that were read in one turn, their
    answers gathered past MAX_QUEUED. Either way every one arrives, in request order."""
    extra = "" if per_cycle is None else f"limits: {{max_requests_per_io_cycle: {per_cycle}}}\n"
    routes = "  - {name: fixed, match: {prefix: /fixed}, cluster: backend}\n"
    async with echo_upstream(_streaming_upstream) as up, \
            run_gateway(basic_yaml(up.port, routes=routes, extra=extra), tmp_path) as gw:
        n = 3000
        raw = await raw_exchange(gw.port(), b"".join(
            b"GET /nowhere/%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(n - 1))
            + b"GET /nowhere/last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", timeout=30)
    answers = split_responses(raw)
    assert len(answers) == n
    assert all(status == 404 for status, _, _ in answers)
    assert [b"/nowhere/%d" % i in body for i, (_, _, body) in enumerate(answers[:-1])] == [True] * (n - 1)
    assert b"/nowhere/last" in answers[-1][2]


async def _streaming_upstream(request: web.Request) -> web.StreamResponse:
    if request.path == "/stream":       # chunked: the gateway writes it as it comes, not queued
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"stream-1 ")
        await resp.write(b"stream-2")
        await resp.write_eof()
        return resp
    body = await request.read()
    return web.Response(body=b"fixed " + request.path_qs.encode() + b" " + body)


async def test_pipelined_answers_keep_their_order_across_queued_and_immediate_writes(tmp_path):
    """Queued answers (fixed bodies, HEAD, a local 404) and immediate ones (a streamed body, a
    100-continue before a body) on one connection: every answer in request order, the last
    (Connection: close) complete before the FIN."""
    routes = ("  - {name: fixed, match: {prefix: /fixed}, cluster: backend}\n"
              "  - {name: stream, match: {prefix: /stream}, cluster: backend}\n")
    async with echo_upstream(_streaming_upstream) as up, \
            run_gateway(basic_yaml(up.port, routes=routes), tmp_path) as gw:
        raw = await raw_exchange(gw.port(), (
            b"GET /fixed?1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /fixed?2 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n"
            b"HEAD /fixed?3 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /fixed?4 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody"
            b"GET /fixed?5 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    # HEAD's answer has a Content-Length and no body: split it off by hand.
    head_at = raw.index(b"HTTP/1.1 200", raw.index(b"HTTP/1.1 404"))
    head_end = raw.index(b"\r\n\r\n", head_at) + 4
    before, head, after = raw[:head_at], raw[head_at:head_end], raw[head_end:]
    answers = [(s, b) for s, _, b in split_responses(before)]
    assert answers[:3] == [(200, b"fixed /fixed?1 "), (200, b"stream-1 stream-2"), (200, b"fixed /fixed?2 ")]
    assert answers[3][0] == 404
    assert head.startswith(b"HTTP/1.1 200")
    assert after.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    rest = [(s, b) for s, _, b in split_responses(after[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])]
    assert rest == [(200, b"fixed /fixed?4 body"), (200, b"fixed /fixed?5 ")]
