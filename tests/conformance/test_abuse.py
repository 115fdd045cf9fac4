"""Abuse suite: route /a runs an abusive filter, route /b a healthy one (separate filters, same
module). Concurrent requests hit both; every /b request must succeed, /a must be answered
(503 under fail_closed, pass-through under fail_open), the abusive instance is rebuilt so a
later /a request works, and /metrics counts the failure."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.conformance.probe import (filter_entry, get_trace, metrics_text, one, parse_report, probe_gateway, wait_for,
                                     samples, strict_module)

N_A = 6
N_B = 20


def routes():
    return [
        {"name": "a", "match": {"prefix": "/a"}, "cluster": "backend", "filters": ["abuse"]},
        {"name": "b", "match": {"prefix": "/b"}, "cluster": "backend", "filters": ["healthy"]},
    ]


def filters(tmp_path, policy="fail_closed", memory_mb=16, callback_ms=100, buffered=None):
    mod = strict_module(tmp_path)
    limits = {"memory_mb": memory_mb, "callback_ms": callback_ms}
    if buffered is not None:
        limits["max_buffered_body_bytes"] = buffered
    return [
        filter_entry("abuse", mod, config="ab", failure_policy=policy, limits=limits),
        filter_entry("healthy", mod, config="ok"),
    ]


async def fetch(session, url, method="GET", **kw):
    t0 = time.monotonic()
    async with session.request(method, url, **kw) as r:
        body = await r.read()
        return r.status, r.headers, body, time.monotonic() - t0


def failures(text: str, name: str = "abuse") -> float:
    """Sum of every sample labelled with this filter whose metric name speaks of failure."""
    total = 0.0
    for metric, labels, value in samples(text):
        if f'"{name}"' in labels and any(w in metric for w in ("fail", "trap", "error", "crash")):
            total += value
    return total


async def healthy_b(session, gw, n=N_B):
    results = await asyncio.gather(*[fetch(session, gw.url(f"/b/{i}")) for i in range(n)])
    for status, headers, body, _ in results:
        assert status == 200, (status, body[:200])
        rep = parse_report(headers.get("x-probe-ok"))
        assert one(rep, "viol") == "0"
    return results


async def abuse_round(session, gw, a_kwargs: dict, n_a=N_A, n_b=N_B, method="GET"):
    a = [fetch(session, gw.url(f"/a/{i}"), method=method, **a_kwargs) for i in range(n_a)]
    b = [fetch(session, gw.url(f"/b/{i}"), headers={"x-bee": str(i)}) for i in range(n_b)]
    results = await asyncio.gather(*a, *b)
    a_res, b_res = results[:n_a], results[n_a:]
    for status, headers, body, _ in b_res:
        assert status == 200, f"route B failed while A was abused: {status} {body[:200]!r}"
        assert one(parse_report(headers.get("x-probe-ok")), "viol") == "0"
    return a_res


async def a_works_again(session, gw, within_s: float = 8.0):
    """The abusive filter's instance comes back (after the rebuild backoff) and serves cleanly."""
    deadline = time.monotonic() + within_s
    while True:
        status, headers, body, _ = await fetch(session, gw.url("/a/again"))
        if status == 200 and "x-probe-ab" in headers:
            break
        assert time.monotonic() < deadline, \
            f"abusive filter's instance not rebuilt within {within_s} s: {status} {body[:200]!r}"
        await asyncio.sleep(0.05)
    assert one(parse_report(headers.get("x-probe-ab")), "viol") == "0"


@pytest.mark.parametrize("act,method,data", [
    ("trap", "GET", None),
    ("trap-resp", "GET", None),
    ("trap-body", "POST", b"b" * 3000),
])
async def test_trap_fail_closed_503_and_rebuilt(tmp_path, upstream, act, method, data):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        kw = {"headers": {"x-act": act}}
        if data is not None:
            kw["data"] = data
        a_res = await abuse_round(s, gw, kw, method=method)
        assert [r[0] for r in a_res] == [503] * N_A
        await a_works_again(s, gw)
        await healthy_b(s, gw, 5)
        after = failures(await metrics_text(s, gw))
        assert after >= before + 1, "the trap was not counted on /metrics"
        # the rebuilt instance went through the whole start sequence again
        trace = await get_trace(s, gw, "ab", prefix="/a")
    assert trace[0] == ("init",)
    assert [e[0] for e in trace[1:4]] == ["create", "vm_start", "configure"]
    root = trace[1][1]
    assert trace[1][2] == "0" and trace[2][1] == root and trace[3][1:] == (root, "2")


@pytest.mark.parametrize("act,method,data", [
    ("trap", "GET", None),
    ("trap-resp", "GET", None),
    ("trap-body", "POST", b"b" * 3000),
])
async def test_trap_fail_open_passes_through(tmp_path, upstream, act, method, data):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, policy="fail_open"), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        kw = {"headers": {"x-act": act}}
        if data is not None:
            kw["data"] = data
        a_res = await abuse_round(s, gw, kw, method=method)
        for status, headers, body, _ in a_res:
            assert status == 200, body[:200]
            assert headers.get("x-upstream") == "echo"     # forwarded to the upstream
            assert "x-probe-ab" not in headers               # the failed filter was skipped
            echoed = json.loads(body)
            assert echoed["path"].startswith("/a/")
            if data is not None:
                assert echoed["body"] == data.decode()     # the body went through whole
        await a_works_again(s, gw)
        assert failures(await metrics_text(s, gw)) >= before + 1


@pytest.mark.parametrize("act", ["loop", "loop-resp"])
async def test_infinite_loop_hits_deadline(tmp_path, upstream, act):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, callback_ms=100), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, {"headers": {"x-act": act}}, n_a=3)
        for status, _, _, elapsed in a_res:
            assert status == 503
            assert elapsed < 5.0, f"deadline of 100 ms took {elapsed:.1f} s"
        await a_works_again(s, gw)
        assert failures(await metrics_text(s, gw)) >= before + 1


async def test_unbounded_memory_growth_hits_cap(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, memory_mb=16), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, {"headers": {"x-act": "oom"}}, n_a=3)
        assert [r[0] for r in a_res] == [503] * 3
        await a_works_again(s, gw)
        assert failures(await metrics_text(s, gw)) >= before + 1


async def test_memory_grow_fails_at_cap_without_trap(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, memory_mb=16), routes()) as (gw, s):
        status, headers, body, _ = await fetch(s, gw.url("/a/soft"), headers={"x-act": "oom-soft"})
        assert status == 200, body[:200]
        pages = int(one(parse_report(headers.get("x-probe-ab")), "pages"))
        assert 4 <= pages <= 16 * 1024 * 1024 // 65536
        await healthy_b(s, gw, 5)


OOB_CALLS = 49   # see $oob in wat/strict_sdk.wat


async def test_out_of_bounds_pointers_to_every_host_call(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        outcomes = {}
        for k in range(OOB_CALLS):
            a_res = await abuse_round(s, gw, {"headers": {"x-act": "oob", "x-oob": str(k)}}, n_a=1, n_b=3)
            status, headers, body, elapsed = a_res[0]
            assert elapsed < 10
            assert status in (200, 503) or 400 <= status < 600, status
            if status == 200 and "x-probe-ab" in headers:
                outcomes[k] = one(parse_report(headers["x-probe-ab"]), "oob")
            else:
                outcomes[k] = f"http {status}"
            # after every kind of abuse the filter serves a clean request again
            await a_works_again(s, gw)
        await healthy_b(s, gw, 5)
    assert len(outcomes) == OOB_CALLS
    # a call whose input cannot be read or whose result cannot be written must not claim
    # success (39: set_tick_period(0xFFFFFFFF) and 47: a reply with unparsable extra headers
    # are legitimately OK)
    claimed = {k: v for k, v in outcomes.items() if v == "0" and k not in (39, 47)}
    assert not claimed, f"OK returned for out-of-bounds arguments: {sorted(claimed)}"


@pytest.mark.parametrize("where,value", [("ret", "7"), ("ret", "-1"), ("ret-body", "7"), ("ret-body", "-1")])
async def test_invalid_actions_still_answered(tmp_path, upstream, where, value):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        kw = {"headers": {"x-act": where, "x-ret": value}}
        method = "POST" if where == "ret-body" else "GET"
        if method == "POST":
            kw["data"] = b"payload"
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, kw, n_a=2, method=method)
        for status, _, body, elapsed in a_res:
            assert 200 <= status < 600
            assert elapsed < 15
        await a_works_again(s, gw)
        # §3.4: Envoy would stop iteration for good; answering is the host's choice, but the
        # protocol violation must be visible
        assert failures(await metrics_text(s, gw)) >= before + 1, "invalid action not counted"
        # a protocol violation is not a trap: the instance (and its state) is kept
        trace = await get_trace(s, gw, "ab", prefix="/a")
    assert trace.count(("init",)) == 1


@pytest.mark.parametrize("act", ["alloc0", "allocoob"])
async def test_huge_buffer_with_failing_allocator_is_isolated(tmp_path, upstream, act):
    big = b"z" * (2 * 1024 * 1024)          # buffered whole: over the 1 MiB default buffer limit
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, memory_mb=64, buffered=4 << 20),
                             routes()) as (gw, s):
        a_res = await abuse_round(s, gw, {"headers": {"x-act": act}, "data": big}, n_a=2, method="POST")
        for status, headers, body, _ in a_res:
            assert status in (200, 503), (status, body[:200])
            if status == 200 and "x-probe-ab" in headers:
                rep = parse_report(headers["x-probe-ab"])
                st, ptr, size = one(rep, "huge").split(":")
                # the host must not claim success with data it could not place in guest memory
                assert not (st == "0" and size != "0" and ptr in ("0", str(0xFFFFFF00))), rep["huge"]
        await a_works_again(s, gw)
        await healthy_b(s, gw, 5)


# ---------------------------------------------------------------- failures outside request headers
@pytest.mark.parametrize("act", ["call-trap", "call-loop"])
async def test_failure_in_http_call_callback_answers_503(tmp_path, upstream, act):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, {"headers": {"x-act": act, "x-cluster": "callout"}}, n_a=3)
        for status, _, body, elapsed in a_res:
            assert status == 503, body[:200]
            assert elapsed < 5.0
        assert [r.path for r in upstream.main_requests() if r.path.startswith("/a/")] == []
        await a_works_again(s, gw)
        assert failures(await metrics_text(s, gw)) >= before + 1


async def test_trap_in_on_tick_rebuilds_instance(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        status, _, _, _ = (await abuse_round(s, gw, {"headers": {"x-act": "tick-trap"}}, n_a=1))[0]
        # the request itself is fine, unless the first tick (20 ms) trapped while it was in
        # flight: then its context died with the instance
        assert status in (200, 503)

        async def counted():
            return failures(await metrics_text(s, gw)) >= before + 1
        assert await wait_for(counted, timeout=3.0), "trap in on_tick not counted"
        await a_works_again(s, gw)
        await healthy_b(s, gw, 5)


async def test_trap_in_on_log_after_response_was_sent(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        # one at a time: a trap poisons the instance, so requests in flight on it fail too
        a_res = await abuse_round(s, gw, {"headers": {"x-act": "trap-log"}}, n_a=1)
        for status, headers, body, _ in a_res:
            assert status == 200                  # the response was complete before on_log
            assert headers.get("x-upstream") == "echo"

        async def counted():
            return failures(await metrics_text(s, gw)) >= before + 1
        assert await wait_for(counted, timeout=3.0), "trap in on_log not counted"
        await a_works_again(s, gw)


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_failure_in_the_middle_of_a_chain(tmp_path, upstream, policy):
    mod = strict_module(tmp_path)
    fl = [filter_entry("first", mod, config="f1"),
          filter_entry("abuse", mod, config="ab", failure_policy=policy),
          filter_entry("last", mod, config="f3")]
    rt = [{"name": "chain", "cluster": "backend", "filters": ["first", "abuse", "last"]}]
    async with probe_gateway(tmp_path, upstream, fl, rt) as (gw, s):
        status, headers, body, _ = await fetch(s, gw.url("/chain"), headers={"x-act-ab": "trap"})
        if policy == "fail_closed":
            assert status == 503
            assert upstream.main_requests() == []
            # the 503 is encoded through the filters that saw the request (Envoy sends the
            # failure reply through the encoder chain)
            assert "f1" in headers.getall("x-chain-resp", [])
        else:
            assert status == 200, body[:200]
            seen = upstream.main_requests()[-1]
            # the failed filter is skipped, the ones around it still run in order (what the
            # failed filter wrote before trapping may stay, as in Envoy's in-place header map)
            chain = seen.all("x-chain")
            assert chain in (["f1", "f3"], ["f1", "ab", "f3"]), chain
            assert headers.getall("x-chain-resp") == ["f3", "f1"]


async def test_pause_never_resumed_is_answered(tmp_path, upstream, monkeypatch):
    import abi.chain
    monkeypatch.setattr(abi.chain, "PAUSE_TIMEOUT_S", 0.5)
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        a_res = await abuse_round(s, gw, {"headers": {"x-act": "ret", "x-ret": "1"}}, n_a=2)
        for status, _, _, elapsed in a_res:
            assert status >= 500
            assert elapsed < 5
        assert [r.path for r in upstream.main_requests() if r.path.startswith("/a/")] == []


async def test_client_gone_while_paused_on_callout(tmp_path, upstream):
    """The client disconnects while the filter waits for its callout: no callback for a deleted
    context (Envoy cancels pending calls in ~Context), the instance is not poisoned."""
    import aiohttp as _aiohttp
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        async with _aiohttp.ClientSession(timeout=_aiohttp.ClientTimeout(total=0.05)) as impatient:
            with pytest.raises(asyncio.TimeoutError):
                async with impatient.get(gw.url("/a/gone"), headers={"x-act": "call", "x-cluster": "callout"}) as r:
                    await r.read()
        await asyncio.sleep(0.4)                  # the callout (0.1 s) has completed by now
        status, headers, body, _ = await fetch(s, gw.url("/a/next"))
        assert status == 200, body[:200]
        rep = parse_report(headers.get("x-probe-ab"))
        assert one(rep, "viol") == "0"
        from tests.conformance.probe import get_trace

        async def all_deleted():
            tr = await get_trace(s, gw, "ab", prefix="/a")
            streams = [e[1] for e in tr if e[0] == "create" and e[2] != "0"][:-1]   # minus the dump itself
            return tr if all(("delete", c) in tr for c in streams) else None
        trace = await wait_for(all_deleted)
    assert trace, "a context was never deleted"
    assert trace[0] == ("init",) and trace.count(("init",)) == 1, "instance was rebuilt (trap?)"


@pytest.mark.parametrize("act", ["recurse", "alloc-trap", "alloc-loop", "exit"])
async def test_stack_overflow_allocator_failures_and_proc_exit(tmp_path, upstream, act):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, {"headers": {"x-act": act}}, n_a=3)
        for status, _, body, elapsed in a_res:
            assert status == 503, body[:200]
            assert elapsed < 5.0
        await a_works_again(s, gw)
        assert failures(await metrics_text(s, gw)) >= before + 1


async def test_close_stream_from_request_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        async def closing():
            try:
                status, _, _, _ = await fetch(s, gw.url("/a/close"), headers={"x-act": "close"})
                return status
            except aiohttp.ClientError:
                return "reset"
        results = await asyncio.gather(*[closing() for _ in range(3)], healthy_b(s, gw, 10))
        for r in results[:3]:
            assert r == "reset" or r >= 400, r
        assert [r.path for r in upstream.main_requests() if r.path == "/a/close"] == []
        await a_works_again(s, gw)


@pytest.mark.parametrize("act", ["rm-pseudo", "bad-status"])
async def test_filter_breaks_pseudo_headers(tmp_path, upstream, act):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        a_res = await abuse_round(s, gw, {"headers": {"x-act": act}}, n_a=3)
        for status, _, body, elapsed in a_res:
            assert 200 <= status < 600, (status, body[:200])    # answered, whatever it is
            assert elapsed < 5.0
        await a_works_again(s, gw)


async def test_header_injection_from_filter_does_not_reach_the_wire(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        status, headers, body, _ = await fetch(s, gw.url("/a/inj"), headers={"x-act": "crlf-req"})
        for r in upstream.main_requests():
            names = [k.lower() for k, _ in r.headers]
            assert "injected-req" not in names and "injected-req2" not in names, r.headers
            assert "bad name" not in names
        try:
            status, headers, body, _ = await fetch(s, gw.url("/a/inj-resp"), headers={"x-act": "crlf-resp"})
        except aiohttp.ClientError:
            status, headers = None, {}
        if status is not None:
            assert "injected-resp" not in {k.lower() for k in headers.keys()}
            assert "injected-resp2" not in {k.lower() for k in headers.keys()}
        await a_works_again(s, gw)
        await healthy_b(s, gw, 5)


@pytest.mark.parametrize("code", ["0", "99", "100", "101", "204", "304", "1000", "-1"])
async def test_local_reply_with_odd_status_codes(tmp_path, upstream, code):
    """A filter asks for a local reply with an odd status (and a body). Whatever the gateway
    makes of it, the wire must carry one well-formed final response: no "HTTP/1.1 0", no 1xx
    followed by the body as a second message, no body after a 204/304 — the next request on
    the same keep-alive connection must get its own response."""
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as one_conn:
            try:
                status, _, body, elapsed = await fetch(one_conn, gw.url("/a/odd"),
                                                       headers={"x-act": "reply-status", "x-ret": code})
            except aiohttp.ClientError as e:
                pytest.fail(f"malformed response for a local reply with status {code}: {e!r}")
            assert 200 <= status < 600, status
            if status in (204, 304):
                assert body == b""
            follow, headers, fbody, _ = await fetch(one_conn, gw.url("/b/next"))
            assert follow == 200 and "x-probe-ok" in headers, (follow, fbody[:100])
        await healthy_b(s, gw, 5)
        await a_works_again(s, gw)


async def test_local_reply_with_framing_headers_stays_well_framed(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as one_conn:
            try:
                status, headers, body, _ = await fetch(one_conn, gw.url("/a/framing"), headers={"x-act": "reply-framing"})
            except aiohttp.ClientError as e:
                pytest.fail(f"malformed local reply: {e!r}")
            assert status == 403 and body == b"framed body"
            assert headers.get("x-ok") == "1"
            if headers.get("connection", "").lower() != "close":
                follow, h2, _, _ = await fetch(one_conn, gw.url("/b/next"))
                assert follow == 200 and "x-probe-ok" in h2


async def test_local_reply_after_response_body_started_never_appends_a_second_response(tmp_path, upstream):
    """On the response side a reply is only possible before anything went downstream; later the
    connection is closed — never a second HTTP message glued after the first."""
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"GET /a/stream HTTP/1.1\r\nHost: x\r\nx-act: reply-resp-late\r\n\r\n")
        await writer.drain()
        data = b""
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 3)
                if not chunk:
                    break
                data += chunk
        except asyncio.TimeoutError:
            pass
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:200]    # headers + first parts went out
        assert b"part-one;" in data
        assert data.count(b"HTTP/1.1 ") == 1, data
        assert b"too late" not in data, data
        await a_works_again(s, gw)
        await healthy_b(s, gw, 5)


async def test_body_rewrite_with_stale_content_length_cannot_smuggle(tmp_path, upstream):
    """A careless filter grows the request body but leaves content-length: 3. Whatever goes to
    the upstream must be one request: the extra bytes must never be parsed by the upstream as
    a request of their own (on a pooled keep-alive connection that would hit someone else)."""
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        try:
            status, _, body, _ = await fetch(s, gw.url("/a/cl"), method="POST", data=b"abc",
                                             headers={"x-act": "body-keep-cl"})
        except aiohttp.ClientError:
            status = None
        # no phantom request made of the leftover bytes may show up at the upstream
        await asyncio.gather(*[fetch(s, gw.url(f"/b/after/{i}")) for i in range(5)])
        await asyncio.sleep(0.1)
        paths = [r.path for r in upstream.requests]
        assert not any(p.startswith("<<") or "tagged" in p or p == "/smuggled" for p in paths), paths
        for r in upstream.main_requests():
            if r.path == "/a/cl":
                assert r.body in (b"abc", b"<<tagged:abc>>"), r.body
        assert status is None or 200 <= status < 600
        await healthy_b(s, gw, 5)


async def test_response_rewrite_with_stale_content_length_keeps_connection_in_sync(tmp_path, upstream):
    """The same careless rewrite on the response: the client's keep-alive connection must stay
    in sync — the next response on it is its own, not the tail of the previous body."""
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as one_conn:
            try:
                status, headers, body, _ = await fetch(one_conn, gw.url("/a/rcl"), headers={"x-act": "resp-body-keep-cl"})
            except aiohttp.ClientError:
                status, body = None, b""
            if status is not None:
                assert status == 200
                declared = headers.get("content-length")
                assert declared is None or int(declared) == len(body)
            try:
                follow, h2, fbody, _ = await fetch(one_conn, gw.url("/b/next"))
            except aiohttp.ClientError as e:
                pytest.fail(f"the next response on the connection is garbage: {e!r}")
            assert follow == 200 and "x-probe-ok" in h2
            assert json.loads(fbody)["path"] == "/b/next"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_memory_of_discarded_instances_is_released(tmp_path, upstream):
    """20 times: the filter fills its 32 MiB cap (touching every page), traps, is rebuilt.
    Leaked instances would keep ~640 MiB resident."""
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, memory_mb=32), routes()) as (gw, s):
        await a_works_again(s, gw)
        base = _rss_mb()
        for _ in range(20):
            status, _, _, _ = await fetch(s, gw.url("/a/oom"), headers={"x-act": "oom"})
            assert status == 503
            await a_works_again(s, gw)
        grown = _rss_mb() - base
    assert grown < 200, f"RSS grew by {grown:.0f} MiB over 20 discarded 32 MiB instances"


async def test_paused_body_over_the_gateway_limit(tmp_path, upstream):
    from tests.conformance.probe import gateway_yaml, get_trace
    from tests.helpers import run_gateway
    text = gateway_yaml(upstream.port, filters(tmp_path), routes())
    text = "limits: {max_request_body_bytes: 100000}\n" + text
    async with run_gateway(text, tmp_path) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            try:
                status, _, _, _ = await fetch(s, gw.url("/a/too-big"), method="POST", data=b"q" * 300_000,
                                              headers={"x-act": "body"})
            except aiohttp.ClientError:
                status = "reset"
            assert status == 413 or status == "reset", status
            assert [r for r in upstream.main_requests() if r.path == "/a/too-big" and len(r.body) >= 300_000] == []
            await a_works_again(s, gw)

            async def torn_down():
                tr = await get_trace(s, gw, "ab", prefix="/a")
                first = [e for e in tr if e[0] == "create" and e[2] != "0"][0][1]
                return tr if ("delete", first) in tr else None
            assert await wait_for(torn_down), "the context of the refused request was never deleted"


async def test_conflicting_framing_headers_from_a_filter_cannot_desync_the_upstream(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        try:
            status, _, body, _ = await fetch(s, gw.url("/a/framing"), method="POST", data=b"abc",
                                             headers={"x-act": "framing-req"})
        except aiohttp.ClientError:
            status = None
        assert status is None or 200 <= status < 600
        await asyncio.gather(*[fetch(s, gw.url(f"/b/after/{i}")) for i in range(5)])
        await asyncio.sleep(0.1)
        for r in upstream.requests:
            assert r.path.startswith(("/a/framing", "/b/after/")), r.path     # no phantom request
            if r.path == "/a/framing":
                assert r.body == b"abc", r.body
        await healthy_b(s, gw, 5)
        await a_works_again(s, gw)


async def test_conflicting_framing_headers_on_a_response_keep_the_client_in_sync(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as one_conn:
            try:
                status, headers, body, _ = await fetch(one_conn, gw.url("/a/rframing"), headers={"x-act": "framing-resp"})
                assert status == 200
                assert json.loads(body)["path"] == "/a/rframing"
            except aiohttp.ClientError as e:
                pytest.fail(f"malformed response: {e!r}")
            follow, h2, fbody, _ = await fetch(one_conn, gw.url("/b/next"))
            assert follow == 200 and json.loads(fbody)["path"] == "/b/next"
