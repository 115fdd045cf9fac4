"""Abuse suite: route /a runs an abusive filter, route /b a healthy one (separate filters, same
module). Concurrent requests hit both; every /b request must succeed, /a must be answered
(503 under fail_closed, pass-through under fail_open), the abusive instance is rebuilt so a
later /a request works, and /metrics counts the failure."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conformance.probe import (filter_entry, metrics_text, one, parse_report, probe_gateway,
                                     samples, strict_module)

N_A = 6
N_B = 20


def routes():
    return [
        {"name": "a", "match": {"prefix": "/a"}, "cluster": "backend", "filters": ["abuse"]},
        {"name": "b", "match": {"prefix": "/b"}, "cluster": "backend", "filters": ["healthy"]},
    ]


def filters(tmp_path, policy="fail_closed", memory_mb=16, callback_ms=100):
    mod = strict_module(tmp_path)
    return [
        filter_entry("abuse", mod, config="ab", failure_policy=policy,
                     limits={"memory_mb": memory_mb, "callback_ms": callback_ms}),
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


async def test_trap_fail_open_passes_through(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, policy="fail_open"), routes()) as (gw, s):
        before = failures(await metrics_text(s, gw))
        a_res = await abuse_round(s, gw, {"headers": {"x-act": "trap"}})
        for status, headers, body, _ in a_res:
            assert status == 200, body[:200]
            assert headers.get("x-upstream") == "echo"     # forwarded to the upstream
            assert "x-probe-ab" not in headers               # the failed filter was skipped
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


@pytest.mark.parametrize("where,value", [("ret", "7"), ("ret", "-1"), ("ret-body", "7"), ("ret-body", "-1")])
async def test_invalid_actions_still_answered(tmp_path, upstream, where, value):
    async with probe_gateway(tmp_path, upstream, filters(tmp_path), routes()) as (gw, s):
        kw = {"headers": {"x-act": where, "x-ret": value}}
        method = "POST" if where == "ret-body" else "GET"
        if method == "POST":
            kw["data"] = b"payload"
        a_res = await abuse_round(s, gw, kw, n_a=2, method=method)
        for status, _, body, elapsed in a_res:
            assert 200 <= status < 600
            assert elapsed < 15
        await a_works_again(s, gw)


@pytest.mark.parametrize("act", ["alloc0", "allocoob"])
async def test_huge_buffer_with_failing_allocator_is_isolated(tmp_path, upstream, act):
    big = b"z" * (2 * 1024 * 1024)
    async with probe_gateway(tmp_path, upstream, filters(tmp_path, memory_mb=64), routes()) as (gw, s):
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
