"""Property: whatever (valid) request headers a client sends, the strict probe sees all of them
(num_headers = pairs = keys, lower-cased names in order, pseudo-headers first) and the upstream
receives every one unchanged."""
from __future__ import annotations

import asyncio
import string
import tempfile
from pathlib import Path

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conformance.probe import (filter_entry, gateway_yaml, one, parse_report, recording_upstream,
                                     strict_module)
from tests.helpers import run_gateway

TOKEN = string.ascii_letters + string.digits + "-_.~!#$&'*+^`|"
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))

names = st.text(TOKEN, min_size=1, max_size=12).map(lambda s: "x-f-" + s)
values = st.builds(lambda a, b: a + b, st.text(VISIBLE, min_size=1, max_size=1),
                   st.text(VISIBLE + " ", max_size=30)).map(str.rstrip)
headers = st.lists(st.tuples(names, values), min_size=0, max_size=12,
                   unique_by=lambda nv: nv[0].lower())


async def _exchange(pairs):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with recording_upstream() as up:
            f = filter_entry("probe", strict_module(tmp), config="p1")
            text = gateway_yaml(up.port, [f], [{"name": "all", "cluster": "backend", "filters": ["probe"]}])
            async with run_gateway(text, tmp) as gw:
                async with aiohttp.ClientSession() as s:
                    async with s.get(gw.url("/fuzz"), headers=pairs) as r:
                        await r.read()
                        return r.status, r.headers.get("x-probe-p1"), up.main_requests()[-1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers)
def test_any_valid_header_set_reaches_filter_and_upstream(pairs):
    status, report, seen = asyncio.run(_exchange(pairs))
    assert status == 200
    rep = parse_report(report)
    assert one(rep, "viol") == "0"
    keys = one(rep, "keys").split(",")
    assert int(one(rep, "n")) == int(one(rep, "pairs")) == len(keys)
    assert keys[:4] and {k for k in keys[:4]} == {":method", ":path", ":authority", ":scheme"}
    sent = [k.lower() for k, _ in pairs]
    assert [k for k in keys if k.startswith("x-f-")] == sent
    for k, v in pairs:
        assert seen.all(k) == [v], (k, v, seen.headers)


async def _body_exchange(chunks, act):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with recording_upstream() as up:
            f = filter_entry("probe", strict_module(tmp), config="p1")
            text = gateway_yaml(up.port, [f], [{"name": "all", "cluster": "backend", "filters": ["probe"]}])
            async with run_gateway(text, tmp) as gw:
                async def gen():
                    for c in chunks:
                        yield c
                        await asyncio.sleep(0)
                async with aiohttp.ClientSession() as s:
                    async with s.post(gw.url("/fuzz-body"), data=gen(), headers={"x-act": act}) as r:
                        await r.read()
                        return r.status, r.headers.get("x-probe-p1"), up.main_requests()[-1]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=6),
       st.sampled_from(["body", ""]))
def test_any_chunking_of_a_request_body(chunks, act):
    total = b"".join(chunks)
    status, report, seen = asyncio.run(_body_exchange(chunks, act))
    assert status == 200
    rep = parse_report(report)
    assert one(rep, "viol") == "0"
    rb = [tuple(int(x) for x in v.split("/")) for v in rep.get("rb", [])]
    assert rb and rb[-1][1] == 1 and all(eos == 0 for _, eos in rb[:-1])
    if act == "body":
        # paused until the end: sizes are cumulative, the last one is everything
        assert [sz for sz, _ in rb] == sorted(sz for sz, _ in rb) and rb[-1][0] == len(total)
        assert seen.body == b"<<tagged:" + total + b">>"
    else:
        # not paused: every byte is reported exactly once
        assert sum(sz for sz, _ in rb) == len(total)
        assert seen.body == total
