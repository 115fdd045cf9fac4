"""Conformance through real HTTP with a strict-SDK WAT probe (wat/strict_sdk.wat).

The probe traps wherever the Rust SDK would panic (unexpected statuses, bad context ids, bad
maps), so any host deviation turns into a 503 or a missing report; deviations the SDK would
tolerate are reported as `viol` bits and must be 0.
"""
from __future__ import annotations

import asyncio
import json
import re
import struct
import time

import aiohttp

from tests.conformance.probe import (filter_entry, get_trace, ints, metrics_text, one,
                                     parse_report, probe_gateway, samples, strict_module, wait_for)


def probe_filter(tmp_path, name="probe", tag="p1", **extra):
    return filter_entry(name, strict_module(tmp_path), config=tag, **extra)


async def fetch(session, url, method="GET", **kw):
    async with session.request(method, url, **kw) as r:
        body = await r.read()
        return r.status, r.headers, body


def report_of(headers, tag="p1"):
    rep = parse_report(headers.get(f"x-probe-{tag}"))
    assert one(rep, "viol") == "0", f"host deviations (bits) {rep['viol']}: see strict_sdk.wat $violate"
    return rep


# ---------------------------------------------------------------- start sequence, context ids
async def test_start_sequence_root_id_and_config_with_signed_max_size(tmp_path, upstream):
    f = probe_filter(tmp_path, tag="p1", vm_config="vm-configuration")
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/x"))
        assert status == 200
        rep = report_of(headers)
        # get_buffer_bytes(7, 0, 0xFFFFFFFF) must return the whole configuration ("p1")
        assert one(rep, "cfglen") == "2"
        assert one(rep, "vmcfglen") == str(len("vm-configuration"))
        trace = [ints(e) if e[0] != "init" else e for e in await get_trace(s, gw, "p1")]
    assert trace[0] == ("init",)
    create, vm_start, configure = trace[1], trace[2], trace[3]
    assert create[0] == "create" and create[2] == 0
    root = create[1]
    assert root != 0
    assert vm_start == ("vm_start", root, len("vm-configuration"))
    assert configure == ("configure", root, 2)
    # every stream context is created with parent = root, and ids are never reused while live
    creates = [e for e in trace[4:] if e[0] == "create"]
    assert creates and all(e[2] == root for e in creates)
    assert len({e[1] for e in creates}) == len(creates)
    assert root not in {e[1] for e in creates}


async def test_context_ids_fresh_per_request_per_filter(tmp_path, upstream):
    mod = strict_module(tmp_path)
    filters = [filter_entry("fa", mod, config="a"), filter_entry("fb", mod, config="b")]
    async with probe_gateway(tmp_path, upstream, filters) as (gw, s):
        seq = [await fetch(s, gw.url(f"/seq/{i}")) for i in range(4)]
        conc = await asyncio.gather(*[fetch(s, gw.url(f"/conc/{i}")) for i in range(8)])
        reps = {"a": [], "b": []}
        for status, headers, _ in seq + list(conc):
            assert status == 200
            for tag in "ab":
                reps[tag].append(report_of(headers, tag))
        trace_a = await get_trace(s, gw, "a")
    root_a = int(trace_a[1][1])
    for tag in "ab":
        ids = [one(r, "ctx") for r in reps[tag]]
        assert len(set(ids)) == len(ids), f"filter {tag}: context ids reused {ids}"
        roots = {one(r, "root") for r in reps[tag]}
        assert len(roots) == 1
        assert roots.isdisjoint(ids)
    assert {one(r, "root") for r in reps["a"]} == {str(root_a)}


# ---------------------------------------------------------------- headers
async def test_request_headers_count_pseudo_headers_and_eos(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/get?a=1"), headers={"x-one": "1"})
        assert status == 200
        rep = report_of(headers)
        keys = one(rep, "keys").split(",")
        assert keys[:4] and set(keys[:4]) == {":method", ":path", ":authority", ":scheme"}, keys
        assert "x-one" in keys
        assert int(one(rep, "n")) == len(keys) == int(one(rep, "pairs"))
        assert one(rep, "eos") == "1"            # GET without a body
        assert "rb" not in rep                   # no body callback for a body-less GET

        status, headers, _ = await fetch(s, gw.url("/post"), method="POST", data=b"hello body")
        assert status == 200
        rep = report_of(headers)
        assert one(rep, "eos") == "0"            # a body follows
        rb = [tuple(int(x) for x in v.split("/")) for v in rep["rb"]]
        assert rb[-1] == (len(b"hello body"), 1)
        # response side: :status counted, reported by value
        assert one(rep, "status") == "200"
        assert int(one(rep, "rn")) == int(one(rep, "rpairs"))


async def test_header_map_get_add_replace_remove(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/hdrs"), headers=[
            ("x-act", "hdrs"), ("x-replace", "old"), ("x-remove", "bye"), ("x-empty", ""),
            ("X-Mixed-Case", "mixedval"), ("x-dup", "first"), ("x-dup", "second"),
            ("x-dup-rep", "1"), ("x-dup-rep", "2"), ("x-dup-rm", "1"), ("x-dup-rm", "2")])
        assert status == 200
        rep = report_of(headers)
        seen = upstream.main_requests()[-1]
        assert seen.all("x-added") == ["a1"]
        assert seen.all("x-replace") == ["new"]
        assert seen.all("x-replace-new") == ["created"]
        assert seen.all("x-remove") == []
        # missing header -> NOT_FOUND (1), nothing returned
        assert one(rep, "missing") == "1:0:0"
        # empty value -> OK with (0, 0), no allocation
        assert one(rep, "empty") == "0:0:0"
        # keys are matched case-insensitively (Envoy lower-cases the key)
        assert one(rep, "mixed") == "mixedval"
        assert one(rep, "readback") == "a1"
        assert one(rep, "authority") == f"127.0.0.1:{gw.port()}"
        assert one(rep, "scheme") == "http"
        assert one(rep, "method") == "GET"
        assert one(rep, "upper") == "up"
        # bodies that do not exist in on_request_headers: NOT_FOUND (or OK, empty) — never a panic
        for key in ("buf_req", "buf_resp", "buf_call"):
            assert one(rep, key) in ("1:0:0", "0:0:0"), (key, rep[key])
        # multi-valued: get answers the first value; replace and remove act on every occurrence
        assert one(rep, "dup") == "first"
        assert seen.all("x-dup") == ["first", "second"]
        assert seen.all("x-dup-rep") == ["one"]
        assert seen.all("x-dup-rm") == []
        # response side reached the client
        assert headers.getall("x-resp-added") == ["r1"]
        assert headers.getall("x-up-replace") == ["replaced"]
        assert "x-up-remove" not in headers
        assert headers.get("x-upstream") == "echo"


async def test_set_header_map_pairs_replaces_whole_map(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/pairs?q=2"), headers={"x-act": "setpairs", "x-keep": "k"})
        assert status == 200
        rep = report_of(headers)
        # `pairs` was counted before the probe added x-chain; set_header_map_pairs then added one more
        assert int(one(rep, "pairs_after")) == int(one(rep, "pairs")) + 2
        seen = upstream.main_requests()[-1]
        assert seen.first("x-set-pairs") == "yes"
        assert seen.first("x-keep") == "k"
        assert seen.path == "/pairs?q=2"


async def test_replace_path_pseudo_header_reaches_upstream(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/orig"), headers={"x-act": "path"})
        assert status == 200
        report_of(headers)
        assert upstream.main_requests()[-1].path == "/rewritten?q=1"
        assert json.loads(body)["path"] == "/rewritten?q=1"


# ---------------------------------------------------------------- bodies
async def test_request_body_cumulative_while_paused_and_replaced(tmp_path, upstream):
    chunks = [b"chunk-one|", b"chunk-two|", b"chunk-three"]
    total = b"".join(chunks)

    async def gen():
        for c in chunks:
            yield c
            await asyncio.sleep(0.05)

    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/body"), method="POST", data=gen(),
                                            headers={"x-act": "body"})
        assert status == 200, body
        rep = report_of(headers)
    rb = [tuple(int(x) for x in v.split("/")) for v in rep["rb"]]
    sizes = [sz for sz, _ in rb]
    assert sizes == sorted(sizes), f"body_size must be cumulative while paused: {rb}"
    assert rb[-1] == (len(total), 1)
    assert all(eos == 0 for _, eos in rb[:-1])
    assert one(rep, "past") == "0:0:0"          # start >= len -> OK, (0, 0)
    assert one(rep, "past2") == "0:0:0"         # start 0x80000000 (negative as signed i32) too
    assert one(rep, "slice") == total[2:5].hex()
    assert one(rep, "bodylen") == str(len(total))  # max_size 0xFFFFFFFF (-1 signed) = all
    seen = upstream.main_requests()[-1]
    assert seen.body == b"<<tagged:" + total + b">>"


async def test_response_body_replaced(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/resp-body"), headers={"x-act": "resp-body"})
    assert status == 200
    assert body.startswith(b"rewritten: ")
    echoed = json.loads(body[len(b"rewritten: "):])
    assert echoed["path"] == "/resp-body"
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)


# ---------------------------------------------------------------- local responses
async def test_send_local_response_from_request_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        for method, data in (("GET", None), ("POST", b"some body")):
            status, headers, body = await fetch(s, gw.url("/deny"), method=method, data=data,
                                                headers={"x-act": "reply-hdrs"})
            assert status == 403
            assert body == b"denied in request headers"
            assert headers.get("x-reply-by") == "probe"
            assert headers.get("x-reply-extra") == "1"
        assert upstream.main_requests() == []


async def test_send_local_response_from_request_body(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/deny-body"), method="POST", data=b"x" * 5000,
                                            headers={"x-act": "reply-body"})
        assert status == 422
        assert body == b"denied in request body"
        assert headers.get("x-reply-by") == "probe"
        await asyncio.sleep(0.1)
        assert [r for r in upstream.main_requests() if r.path == "/deny-body"] == []
        # the gateway still serves
        status, headers, _ = await fetch(s, gw.url("/after"))
        assert status == 200


async def test_send_local_response_from_response_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/deny-resp"), headers={"x-act": "reply-resp"})
        assert status == 451
        assert body == b"denied in response headers"
        assert headers.get("x-reply-by") == "probe"
        assert "x-upstream" not in headers       # the upstream response was discarded
        assert [r.path for r in upstream.main_requests()] == ["/deny-resp"]


# ---------------------------------------------------------------- lifecycle and chain
async def test_teardown_order_done_log_delete(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/life"))
        assert status == 200
        ctx = int(one(report_of(headers), "ctx"))

        async def deleted():
            tr = await get_trace(s, gw, "p1")
            return tr if ("delete", str(ctx)) in tr else None
        trace = await wait_for(deleted)
    assert trace, "on_delete never called for the request context"
    mine = [e[0] for e in trace if len(e) > 1 and e[1] == str(ctx)]
    assert mine == ["create", "req_hdrs", "resp_hdrs", "resp_body", "done", "log", "delete"] or \
        mine == ["create", "req_hdrs", "resp_hdrs", "done", "log", "delete"], mine
    assert mine[-3:] == ["done", "log", "delete"]


async def test_chain_order_request_yaml_order_response_reverse(tmp_path, upstream):
    mod = strict_module(tmp_path)
    filters = [filter_entry("first", mod, config="a"), filter_entry("second", mod, config="b"),
               filter_entry("third", mod, config="c")]
    async with probe_gateway(tmp_path, upstream, filters) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/chain"))
        assert status == 200
        for tag in "abc":
            report_of(headers, tag)
    assert upstream.main_requests()[-1].all("x-chain") == ["a", "b", "c"]
    assert headers.getall("x-chain-resp") == ["c", "b", "a"]


# ---------------------------------------------------------------- properties
def decode_map(data: bytes) -> list[tuple[str, str]]:
    if not data:
        return []
    (n,) = struct.unpack_from("<I", data, 0)
    sizes = [struct.unpack_from("<II", data, 4 + 8 * i) for i in range(n)]
    pos, out = 4 + 8 * n, []
    for kl, vl in sizes:
        k = data[pos:pos + kl]
        pos += kl + 1
        v = data[pos:pos + vl]
        pos += vl + 1
        out.append((k.decode(), v.decode()))
    assert pos == len(data)
    return out


def prop(rep, key):
    st, _, hexval = one(rep, key).partition(":")
    return int(st), bytes.fromhex(hexval)


async def test_properties_envoy_encoding(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, name="propfilter")]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/props/x?y=1"),
                                         headers={"x-act": "props", "x-prop-hdr": "hv"})
        assert status == 200
        rep = report_of(headers)
        ctx = one(rep, "ctx")

        async def logged():
            tr = await get_trace(s, gw, "p1")
            return tr if ("log", ctx) in tr else None
        trace = await wait_for(logged)
    assert prop(rep, "p_path") == (0, b"/props/x?y=1")
    assert prop(rep, "p_method") == (0, b"GET")
    assert prop(rep, "p_protocol") == (0, b"HTTP/1.1")
    assert prop(rep, "p_scheme") == (0, b"http")
    assert prop(rep, "p_url_path") == (0, b"/props/x")
    st, src = prop(rep, "p_source")
    assert st == 0 and re.fullmatch(rb"127\.0\.0\.1:\d+", src), src
    st, port = prop(rep, "p_source_port")
    assert st == 0 and len(port) == 8 and struct.unpack("<q", port)[0] == int(src.rsplit(b":", 1)[1])
    st, dport = prop(rep, "p_dest_port")
    assert st == 0 and struct.unpack("<q", dport)[0] == gw.port()
    assert prop(rep, "p_plugin_name") == (0, b"propfilter")
    assert prop(rep, "p_root_id")[0] == 0        # C++ SDK aborts unless plugin_root_id is OK
    assert prop(rep, "p_nosuch") == (1, b"")
    assert prop(rep, "p_hdr") == (0, b"hv")
    assert prop(rep, "p_custom") == (0, b"hello-prop")
    assert prop(rep, "p_query") == (0, b"y=1")
    st, req_id = prop(rep, "p_req_id")
    assert st == 0 and req_id.decode() == upstream.main_requests()[-1].first("x-request-id")
    st, t = prop(rep, "p_time")                      # timestamp: int64 LE ns since the epoch
    assert st == 0 and len(t) == 8 and abs(struct.unpack("<q", t)[0] / 1e9 - time.time()) < 120
    st, conn = prop(rep, "p_conn_id")                # uint: 8 bytes LE
    assert st == 0 and len(conn) == 8
    assert prop(rep, "p_vm_id")[0] == 0
    st, hmap = prop(rep, "p_headers")                # map: §4.1 serialization, lower-case names
    assert st == 0
    pairs = decode_map(hmap)
    assert ("x-prop-hdr", "hv") in pairs and ("x-act", "props") in pairs
    st, code = prop(rep, "p_resp_code")
    assert st in (0, 1)
    if st == 0:
        assert code == struct.pack("<q", 200)
    # trailing NUL (C++ SDK style) names the same property
    assert prop(rep, "p_path_nul") == prop(rep, "p_path")
    assert prop(rep, "p_root_nul") == prop(rep, "p_root_id")
    assert prop(rep, "p_hdr_nul") == prop(rep, "p_hdr")
    assert prop(rep, "p_host") == (0, f"127.0.0.1:{gw.port()}".encode())
    assert prop(rep, "p_dest") == (0, f"127.0.0.1:{gw.port()}".encode())
    st, rh = prop(rep, "p_resp_headers")
    assert st == 0 and ("x-upstream", "echo") in decode_map(rh)
    # response.code in on_log: int64 LE, 200 -> c8 00 00 00 00 00 00 00
    assert trace, "on_log not seen"
    codes = [e for e in trace if e[0] == "code"]
    assert codes and codes[-1][1:] == ("0", "c800000000000000"), codes
    rhp = [e for e in trace if e[0] == "resp_headers_prop"]
    assert rhp and rhp[-1][1] == "0", rhp
    assert ("x-upstream", "echo") in decode_map(bytes.fromhex(rhp[-1][2]))


# ---------------------------------------------------------------- http_call
async def test_http_call_callback_on_root_and_resume(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/with-call"), headers={"x-act": "call", "x-cluster": "callout"})
        assert status == 200, body
        rep = report_of(headers)
        trace = await get_trace(s, gw, "p1")
    root = trace[1][1]
    assert one(rep, "callst") == "0"
    token = one(rep, "token")
    calls = [e for e in trace if e[0] == "call_resp"]
    assert len(calls) == 1
    assert calls[0][1] == root and calls[0][2] == token      # first arg is the ROOT id
    assert int(one(rep, "cnh")) >= 2
    assert one(rep, "cstatus") == "201"
    assert one(rep, "cheader") == "yes"
    assert one(rep, "cbs") == str(len(b"callout-ok"))
    assert one(rep, "cbody") == "callout-ok"
    assert one(rep, "ctrailers") == "0"
    co = upstream.callouts()[-1]
    assert co.path == "/callout/probe" and co.method == "GET"
    assert co.first("x-probe-call") == "1"
    assert co.first("host") == "callout.local"
    # the paused request was resumed by continue_stream(0) inside the callback
    assert json.loads(body)["path"] == "/with-call"


async def test_http_call_unknown_cluster_is_bad_argument(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/nocluster"), headers={"x-act": "call", "x-cluster": "nope"})
        assert status == 200
        assert one(report_of(headers), "callst") == "2"


async def test_http_call_to_dead_cluster_reports_failure(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/deadcall"), headers={"x-act": "call", "x-cluster": "dead"})
        assert status == 200, body
        rep = report_of(headers)
    assert one(rep, "callst") == "0"
    assert one(rep, "cnh") == "0" and one(rep, "cbs") == "0"
    assert "cfail" in rep
    assert one(rep, "cfail_pairs") == "0"
    assert one(rep, "cfail_status") == "1"
    assert one(rep, "cfail_body") in ("0:0:0", "1:0:0")


# ---------------------------------------------------------------- shared data, metrics, ticks
async def test_shared_data_cas(tmp_path, upstream):
    key = f"conf-key-{tmp_path.name}"
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/shared"), headers={"x-act": "shared", "x-key": key})
        assert status == 200
        rep = report_of(headers)
    assert one(rep, "g1") == "1"            # NOT_FOUND
    assert one(rep, "s1") == "0"
    assert one(rep, "g2") == "0" and one(rep, "v2") == "v1"
    cas1 = int(one(rep, "cas1"))
    assert cas1 != 0
    assert one(rep, "s2") == "8"            # CAS_MISMATCH
    assert one(rep, "s3") == "0"
    assert one(rep, "g3") == "0" and one(rep, "v3") == "v2"
    cas2 = int(one(rep, "cas2"))
    assert cas2 not in (0, cas1)
    assert one(rep, "s4") == "0"            # missing key + non-zero cas still succeeds
    assert one(rep, "s5") == "0"
    assert one(rep, "g5") == "0:0:0"        # empty value -> OK, (0, 0)


async def test_metrics_visible_on_admin(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, tag="m1")]) as (gw, s):
        reps = []
        for i in range(3):
            status, headers, _ = await fetch(s, gw.url(f"/m/{i}"), headers={"x-act": "metrics"})
            assert status == 200
            reps.append(report_of(headers, "m1"))
        text = await metrics_text(s, gw)
    assert one(reps[-1], "mcount") == "3"
    assert one(reps[-1], "mgauge") == "9"
    smp = samples(text)
    counters = [v for n, _, v in smp if "probe_requests_m1" in n]
    gauges = [v for n, _, v in smp if "probe_gauge_m1" in n]
    hists = [n for n, _, v in smp if "probe_hist_m1" in n]
    assert counters == [3.0], [l for l in text.splitlines() if "probe_" in l]
    assert gauges == [9.0]
    assert hists, "histogram not exported"
    # every sample line stays parseable Prometheus text despite the odd metric name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? \S+', line), line
    assert [v for n, _, v in smp if "weird" in n] == [3.0]


async def test_on_tick_fires_on_root_after_set_tick_period(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/tick"), headers={"x-act": "tick"})
        assert status == 200

        async def three_ticks():
            tr = await get_trace(s, gw, "p1")
            return tr if len([e for e in tr if e[0] == "tick"]) >= 3 else None
        trace = await wait_for(three_ticks, timeout=3.0)
        assert trace, "on_tick did not fire 3 times within 3 s of set_tick_period(20)"
        root = trace[1][1]
        assert {e[1] for e in trace if e[0] == "tick"} == {root}
        await asyncio.sleep(0.2)                 # period set to 0 after the third tick
        later = await get_trace(s, gw, "p1")
    assert len([e for e in later if e[0] == "tick"]) == 3


async def test_binary_wasm_path_loads(tmp_path, upstream):
    f = filter_entry("bin", strict_module(tmp_path, binary=True), config="p1")
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/bin"))
        assert status == 200
        report_of(headers)


# ---------------------------------------------------------------- more SDK-faithfulness probes
async def test_post_with_empty_body_has_end_of_stream_in_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/empty"), method="POST", data=b"")
        assert status == 200
        rep = report_of(headers)
    assert one(rep, "eos") == "1"        # Content-Length: 0 -> no body follows
    assert "rb" not in rep


async def test_response_without_body_has_end_of_stream_in_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/nobody"))
        assert status == 204
        rep = report_of(headers)
        ctx = one(rep, "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    assert one(rep, "reos") == "1"
    assert one(rep, "status") == "204"
    assert trace and not [e for e in trace if e[0] == "resp_body" and e[1] == ctx]


async def _deleted(s, gw, ctx, tag="p1"):
    tr = await get_trace(s, gw, tag)
    return tr if ("delete", ctx) in tr else None


async def test_streamed_response_body_cumulative_while_paused(tmp_path, upstream):
    from tests.conformance.probe import STREAM_PARTS
    total = b"".join(STREAM_PARTS)
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/stream"), headers={"x-act": "resp-body"})
        assert status == 200
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    assert body == b"rewritten: " + total
    calls = [(int(e[2]), int(e[3])) for e in trace if e[0] == "resp_body" and e[1] == ctx]
    sizes = [sz for sz, _ in calls]
    assert sizes == sorted(sizes), calls
    assert calls[-1] == (len(total), 1), calls
    assert all(eos == 0 for _, eos in calls[:-1])


async def test_local_reply_runs_the_filters_response_callbacks(tmp_path, upstream):
    # Envoy runs encode callbacks for a local reply (verified trace of the Rust http_headers
    # example: send_local_response in on_request_headers, then on_response_headers, on_done...)
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/deny"), headers={"x-act": "reply-hdrs"})
        assert status == 403
        rep = parse_report(headers.get("x-probe-p1"))
        ctx = one(rep, "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    mine = [e[0] for e in trace if len(e) > 1 and e[1] == ctx]
    assert mine[:3] == ["create", "req_hdrs", "resp_hdrs"], mine
    assert mine[-3:] == ["done", "log", "delete"], mine
    assert one(rep, "status") == "403"


async def test_local_reply_then_continue_still_short_circuits(tmp_path, upstream):
    # cpp-host: after send_local_response the callback's return value is treated as Stop
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/deny-continue"), headers={"x-act": "reply-continue"})
        assert status == 403
        assert body == b"denied, then Continue returned"
        await asyncio.sleep(0.05)
    assert upstream.main_requests() == []


async def test_local_reply_from_http_call_callback(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/call-deny"), headers={"x-act": "call-deny", "x-cluster": "callout"})
        assert status == 401
        assert body == b"denied after callout"
        assert headers.get("x-reply-by") == "probe"
    assert len(upstream.callouts()) == 1
    assert upstream.main_requests() == []


async def test_chain_waits_for_paused_filter_and_effective_context_writes(tmp_path, upstream):
    mod = strict_module(tmp_path)
    filters = [filter_entry("caller", mod, config="a"), filter_entry("next", mod, config="b")]
    async with probe_gateway(tmp_path, upstream, filters) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/chain-call"), method="POST", data=b"payload-after-call",
                                            headers={"x-act": "call", "x-cluster": "callout"})
        assert status == 200, body
        rep_a, rep_b = report_of(headers, "a"), report_of(headers, "b")
    # both filters act on x-act: a calls out and pauses; b's request headers run only after a
    # resumed, so b sees what a wrote from inside its callback through the effective context;
    # then b calls out too, and both writes reach the upstream in order
    assert one(rep_b, "after_call") == "a"
    assert len(upstream.callouts()) == 2
    seen = upstream.main_requests()[-1]
    assert seen.all("x-after-call") == ["a", "b"]
    assert seen.body == b"payload-after-call"
    assert one(rep_a, "cstatus") == "201"


async def test_headers_readable_in_on_log(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/logmaps"), headers={"x-act": "log-maps"})
        assert status == 200
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    assert trace, "context never deleted (a trap in on_log?)"
    logmaps = [e for e in trace if e[0] == "logmaps"]
    assert len(logmaps) == 1, trace
    _, path_st, path_len, n_req, n_resp, status_st = logmaps[0]
    assert (path_st, path_len) == ("0", str(len("/logmaps")))
    assert int(n_req) >= 4 and int(n_resp) >= 1
    assert status_st == "0"


async def test_replace_status_pseudo_header(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/status"), headers={"x-act": "status-rewrite"})
    assert status == 202
    assert json.loads(body)["path"] == "/status"


async def test_shared_queue_register_resolve_enqueue_on_queue_ready(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/queue"), headers={"x-act": "queue", "x-key": f"queue-{tmp_path.name}"})
        assert status == 200
        rep = report_of(headers)

        async def ready():
            tr = await get_trace(s, gw, "p1")
            return tr if [e for e in tr if e[0] == "queue"] else None
        trace = await wait_for(ready)
    qid = one(rep, "qid")
    assert qid != "0"
    assert one(rep, "qres") == "0" and one(rep, "qres_same") == "1"
    assert one(rep, "qenq") == "0"
    assert one(rep, "qenq_unknown") == "1"          # NOT_FOUND
    assert trace, "proxy_on_queue_ready never called"
    root = trace[1][1]
    events = [e for e in trace if e[0] == "queue"]
    assert events[0] == ("queue", root, qid, "0", "queued-message", "7"), events   # then EMPTY


async def test_grpc_and_foreign_function_fail_softly(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/grpc"), headers={"x-act": "grpc"})
        assert status == 200
        rep = report_of(headers)
    # a status the SDKs treat as a failed call (the probe traps on anything Rust does not accept)
    assert one(rep, "grpc") in ("4", "10")
    assert one(rep, "grpc_stream") in ("4", "10")
    assert one(rep, "foreign") == "1"               # unknown name -> NOT_FOUND


async def test_concurrent_callouts_get_their_own_tokens_and_responses(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        results = await asyncio.gather(*[
            fetch(s, gw.url(f"/cc/{i}"), headers={"x-act": "call", "x-cluster": "callout"}) for i in range(8)])
    tokens = []
    for i, (status, headers, body) in enumerate(results):
        assert status == 200, body
        rep = report_of(headers)
        assert one(rep, "cbody") == "callout-ok"
        assert json.loads(body)["path"] == f"/cc/{i}"
        tokens.append(one(rep, "token"))
    assert len(set(tokens)) == len(tokens)


async def test_http_call_timeout_is_honoured(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/timeoutcall"), headers={
            "x-act": "call", "x-cluster": "callout", "x-timeout": "20"})
        assert status == 200, body
        rep = report_of(headers)
    # the callout answers after 100 ms; with a 20 ms timeout the callback reports a failure
    assert one(rep, "cnh") == "0" and one(rep, "cbs") == "0"
    assert "cfail" in rep
    assert one(rep, "cfail_pairs") == "0"
    assert one(rep, "cfail_status") == "1"
    assert one(rep, "cfail_body") in ("0:0:0", "1:0:0")
    assert json.loads(body)["path"] == "/timeoutcall"


async def test_unpaused_request_body_chunks_reported_once(tmp_path, upstream):
    chunks = [b"a" * 3000, b"b" * 3000, b"c" * 3000]

    async def gen():
        for c in chunks:
            yield c
            await asyncio.sleep(0.05)

    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/stream-up"), method="POST", data=gen())
        assert status == 200
        rep = report_of(headers)
    rb = [tuple(int(x) for x in v.split("/")) for v in rep["rb"]]
    # not paused: each callback sees only the data that arrived since the previous one
    assert sum(sz for sz, _ in rb) == 9000, rb
    assert rb[-1][1] == 1
    assert upstream.main_requests()[-1].body == b"".join(chunks)


async def _body_vs_callout_order(tmp_path, upstream, deliver: bool):
    async def gen():
        yield b"early-body"
        await asyncio.sleep(0.01)
        yield b"|rest"

    f = probe_filter(tmp_path, deliver_body_while_paused=deliver)
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/pause-body"), method="POST", data=gen(),
                                            headers={"x-act": "call", "x-cluster": "callout"})
        assert status == 200, body
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    mine = [e[0] for e in trace if len(e) > 1 and e[1] == ctx]
    resp_at = next(i for i, e in enumerate(trace) if e[0] == "call_resp")
    first_body = next(i for i, e in enumerate(trace) if e[0] == "req_body" and e[1] == ctx)
    assert upstream.main_requests()[-1].body == b"early-body|rest"
    return first_body < resp_at, mine


async def test_pause_in_headers_holds_body_callbacks_envoy_default(tmp_path, upstream):
    body_first, mine = await _body_vs_callout_order(tmp_path, upstream, deliver=False)
    assert not body_first, f"body delivered while paused in request headers: {mine}"


async def test_deliver_body_while_paused_option(tmp_path, upstream):
    body_first, mine = await _body_vs_callout_order(tmp_path, upstream, deliver=True)
    assert body_first, f"body not delivered while paused although configured: {mine}"


async def test_guest_grown_memory_is_visible_to_host_calls(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/grow"), headers={"x-act": "grow-then-call"})
        assert status == 200, body[:300]
        rep = report_of(headers)
    assert one(rep, "grown_len") == "3" and one(rep, "grown_time") == "1"
    assert upstream.main_requests()[-1].all("x-grown") == ["yes"]


# The probe buffers the whole 3 MiB body: over the 1 MiB default of max_buffered_body_bytes.
BIG_BUFFER = {"max_buffered_body_bytes": 8 << 20}


async def test_large_request_body_read_whole_and_replaced(tmp_path, upstream):
    from tests.conformance.probe import BIG_BODY
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, limits=BIG_BUFFER)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/bigpost"), method="POST", data=BIG_BODY,
                                            headers={"x-act": "body"})
        assert status == 200, body[:300]
        rep = report_of(headers)
    assert one(rep, "bodylen") == str(len(BIG_BODY))
    seen = upstream.main_requests()[-1]
    assert len(seen.body) == len(BIG_BODY) + 11
    assert seen.body == b"<<tagged:" + BIG_BODY + b">>"


async def test_large_response_body_read_whole_and_replaced(tmp_path, upstream):
    from tests.conformance.probe import BIG_BODY
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, limits=BIG_BUFFER)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/big"), headers={"x-act": "resp-body"})
    assert status == 200
    assert len(body) == len(BIG_BODY) + 11
    assert body == b"rewritten: " + BIG_BODY


async def test_client_abort_still_tears_down_context(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as impatient:
            try:
                async with impatient.get(gw.url("/slow")) as r:
                    await r.read()
            except asyncio.TimeoutError:
                pass
            else:
                raise AssertionError("the slow upstream answered within 0.1 s")

        async def torn_down():
            tr = await get_trace(s, gw, "p1")
            first = [e for e in tr if e[0] == "create" and e[2] != "0"][0][1]
            return tr if ("delete", first) in tr else None
        trace = await wait_for(torn_down, timeout=3.0)
        assert trace, "context of an aborted request never deleted"
        first = [e for e in trace if e[0] == "create" and e[2] != "0"][0][1]
        mine = [e[0] for e in trace if len(e) > 1 and e[1] == first]
        assert mine[-1] == "delete" and mine.count("delete") == 1, mine
        assert "log" in mine and mine.index("log") < mine.index("delete")


async def test_on_done_false_on_http_stream_still_logs_and_deletes(tmp_path, upstream):
    # Envoy ignores proxy_on_done's result for HTTP streams (reference §2.6)
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/done-false"), headers={"x-act": "done-false"})
        assert status == 200
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx), timeout=3.0)
        assert trace, "on_delete never came after on_done returned false"
        mine = [e[0] for e in trace if len(e) > 1 and e[1] == ctx]
        assert mine[-3:] == ["done", "log", "delete"], mine


async def test_response_code_property_after_local_reply(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/rp"), headers={"x-act": "reply-props"})
        assert status == 403
        ctx = one(parse_report(headers.get("x-probe-p1")), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    codes = [e for e in trace if e[0] == "code"]
    assert codes and codes[-1][1:] == ("0", struct.pack("<q", 403).hex()), codes


async def test_metrics_and_shared_data_survive_instance_rebuild(tmp_path, upstream):
    key = f"survive-{tmp_path.name}"
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, tag="m2")]) as (gw, s):
        for i in range(2):
            status, headers, _ = await fetch(s, gw.url(f"/m/{i}"), headers={"x-act": "metrics"})
            assert status == 200
        status, headers, _ = await fetch(s, gw.url("/sh"), headers={"x-act": "shared", "x-key": key})
        assert status == 200
        before = [v for n, _, v in samples(await metrics_text(s, gw)) if "probe_requests_m2" in n]
        assert before == [3.0]
        status, _, _ = await fetch(s, gw.url("/boom"), headers={"x-act": "trap"})
        assert status == 503

        async def back():
            st, hd, _ = await fetch(s, gw.url("/get"), headers={"x-act": "shared-get", "x-key": key})
            return hd if st == 200 and "x-probe-m2" in hd else None
        headers = await wait_for(back, timeout=5.0)
        assert headers, "instance not rebuilt"
        rep = report_of(headers, "m2")
        after = [v for n, _, v in samples(await metrics_text(s, gw)) if "probe_requests_m2" in n]
    # host-side state (Envoy stats, shared data) outlives the wasm instance
    assert one(rep, "sg") == "0" and one(rep, "sgv") == "v2"
    assert len(after) == 1 and after[0] >= 5.0, after     # 3 + the trapping request + this one


async def _no_body_response(s, gw, method, path):
    status, headers, body = await fetch(s, gw.url(path), method=method)
    rep = report_of(headers)
    ctx = one(rep, "ctx")
    trace = await wait_for(lambda: _deleted(s, gw, ctx))
    assert trace
    body_calls = [e for e in trace if e[0] == "resp_body" and e[1] == ctx]
    return status, body, rep, body_calls


async def test_head_response_has_end_of_stream_in_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, body, rep, body_calls = await _no_body_response(s, gw, "HEAD", "/head")
    assert status == 200 and body == b""
    # a HEAD response never has a body: Envoy's codec ends the stream with the headers
    assert one(rep, "reos") == "1", rep
    assert body_calls == []


async def test_304_response_has_end_of_stream_in_headers(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, body, rep, body_calls = await _no_body_response(s, gw, "GET", "/notmodified")
    assert status == 304 and body == b""
    assert one(rep, "reos") == "1", rep
    assert body_calls == []


async def test_mixed_concurrent_requests_keep_contexts_apart(tmp_path, upstream):
    """Callouts, paused bodies, local replies and body rewrites interleave on one instance."""
    kinds = ["plain", "call", "body", "reply", "resp-body"]

    async def one_request(i):
        kind = kinds[i % len(kinds)]
        if kind == "plain":
            return kind, i, await fetch(s, gw.url(f"/mix/{i}"))
        if kind == "call":
            return kind, i, await fetch(s, gw.url(f"/mix/{i}"), headers={"x-act": "call", "x-cluster": "callout"})
        if kind == "body":
            return kind, i, await fetch(s, gw.url(f"/mix/{i}"), method="POST", data=f"body-{i}".encode() * 50,
                                        headers={"x-act": "body"})
        if kind == "reply":
            return kind, i, await fetch(s, gw.url(f"/mix/{i}"), headers={"x-act": "reply-hdrs"})
        return kind, i, await fetch(s, gw.url(f"/mix/{i}"), headers={"x-act": "resp-body"})

    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        results = await asyncio.gather(*[one_request(i) for i in range(40)])
        ctxs = []
        for kind, i, (status, headers, body) in results:
            if kind == "reply":
                assert status == 403 and body == b"denied in request headers"
                continue
            assert status == 200, (kind, i, status, body[:200])
            if kind == "resp-body":
                assert body.startswith(b"rewritten: ")
                assert json.loads(body[len(b"rewritten: "):])["path"] == f"/mix/{i}"
                continue
            rep = report_of(headers)
            ctxs.append(one(rep, "ctx"))
            assert json.loads(body)["path"] == f"/mix/{i}"
            if kind == "call":
                assert one(rep, "cbody") == "callout-ok"
            if kind == "body":
                assert json.loads(body)["body"] == "<<tagged:" + f"body-{i}" * 50 + ">>"
        assert len(set(ctxs)) == len(ctxs)
        # everything torn down exactly once, nothing poisoned: a fresh request is clean
        await asyncio.sleep(0.2)
        trace = await get_trace(s, gw, "p1")
        status, headers, _ = await fetch(s, gw.url("/after-mix"))
        assert status == 200
        report_of(headers)
    assert trace.count(("init",)) == 1
    created = [e[1] for e in trace if e[0] == "create" and e[2] != "0"]
    deleted = [e[1] for e in trace if e[0] == "delete"]
    assert sorted(deleted) == sorted(set(deleted))
    assert set(created) - set(deleted) <= {created[-1]}      # only the trace request is still live


async def test_replace_authority_changes_upstream_host(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/auth"), headers={"x-act": "authority"})
        assert status == 200
        report_of(headers)
    assert upstream.main_requests()[-1].first("host") == "rewritten.example"


async def test_mixed_abi_versions_in_one_chain(tmp_path, upstream):
    from tests.conformance import watlib
    filters = [probe_filter(tmp_path, name="probe"),
               filter_entry("old", watlib.build("abi010.wat", tmp_path), config="cfg-010"),
               filter_entry("golike", watlib.build("golike.wat", tmp_path), config="x"),
               filter_entry("cpplike", watlib.build("cpplike.wat", tmp_path), config="c")]
    async with probe_gateway(tmp_path, upstream, filters) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/mixed"))
    assert status == 200
    report_of(headers)
    assert "cfg=cfg-010" in headers.get("x-abi010-report", "")
    assert headers.get("x-golike", "").startswith("start=1")
    assert "pathst=0" in headers.get("x-cpplike", "")
    assert upstream.main_requests()[-1].first("x-abi010") == "cfg-010"


async def test_grpc_request_gets_grpc_local_reply(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/pkg.Svc/Method"), method="POST", data=b"\x00\x00\x00\x00\x00",
                                            headers={"x-act": "reply-hdrs", "content-type": "application/grpc"})
    # Envoy sendLocalReply for a gRPC request: HTTP 200, grpc-status from the HTTP code
    # (403 -> 7 PERMISSION_DENIED), the body as grpc-message
    assert status == 200
    assert headers.get("grpc-status") == "7"
    assert headers.get("grpc-message") == "denied in request headers"
    assert upstream.main_requests() == []


async def test_upstream_failure_still_tears_down_with_response_code(tmp_path, upstream):
    f = probe_filter(tmp_path)
    routes = [{"name": "dead", "cluster": "dead", "filters": ["probe"]}]
    async with probe_gateway(tmp_path, upstream, [f], routes) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/to-dead"), headers={"x-act": "props"})
        assert status in (502, 503)

        async def torn_down():
            tr = await get_trace(s, gw, "p1")
            first = [e for e in tr if e[0] == "create" and e[2] != "0"][0][1]
            return tr if ("delete", first) in tr else None
        trace = await wait_for(torn_down)
    assert trace, "context never deleted after an upstream failure"
    ctx = [e for e in trace if e[0] == "create" and e[2] != "0"][0][1]
    mine = [e[0] for e in trace if len(e) > 1 and e[1] == ctx]
    assert mine[-3:] == ["done", "log", "delete"], mine
    codes = [e for e in trace if e[0] == "code"]
    assert codes and codes[0][1:] == ("0", struct.pack("<q", status).hex()), codes


async def test_upstream_failure_reply_passes_the_filters_response_callbacks(tmp_path, upstream):
    # Envoy encodes the router's "upstream connect error" 503 through the filter chain: the
    # filter's on_response_headers sees it (and can add headers to it)
    f = probe_filter(tmp_path)
    routes = [{"name": "dead", "cluster": "dead", "filters": ["probe"]}]
    async with probe_gateway(tmp_path, upstream, [f], routes) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/to-dead"))
    assert status in (502, 503)
    rep = report_of(headers)
    assert one(rep, "status") == str(status)


async def test_http_call_from_response_headers_resumes_response(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/resp-call"), headers={"x-act": "call-resp", "x-cluster": "callout"})
    assert status == 200, body[:200]
    assert headers.getall("x-after-call") == ["p1"]      # written from the callback, then resumed
    assert json.loads(body)["path"] == "/resp-call"
    assert len(upstream.callouts()) == 1


async def test_send_local_response_from_response_body(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/stream"), headers={"x-act": "reply-resp-body"})
        assert status == 500
        assert body == b"denied in response body"
        assert headers.get("x-reply-by") == "probe"
        status, _, _ = await fetch(s, gw.url("/after"))
        assert status == 200


async def test_local_reply_at_end_of_streamed_request_body(tmp_path, upstream):
    async def gen():
        yield b"first-part|" * 100
        await asyncio.sleep(0.1)
        yield b"last-part"

    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/late"), method="POST", data=gen(),
                                            headers={"x-act": "reply-body-late"})
        assert status == 422, body[:200]
        assert body == b"denied at the end of the request body"
        await asyncio.sleep(0.1)
        # the upstream may have started receiving the body, but never got it complete
        for r in upstream.main_requests():
            assert not r.body.endswith(b"last-part"), "the rejected body reached the upstream"
        status, _, _ = await fetch(s, gw.url("/after"))
        assert status == 200


async def test_many_requests_contexts_are_released(tmp_path, upstream):
    # the probe has 256 context slots: contexts that are never deleted would exhaust them
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        sem = asyncio.Semaphore(10)

        async def one_req(i):
            async with sem:
                return await fetch(s, gw.url(f"/many/{i}"))
        results = await asyncio.gather(*[one_req(i) for i in range(300)])
        for status, headers, _ in results:
            assert status == 200
            report_of(headers)
        ids = [int(one(report_of(h), "ctx")) for _, h, _ in results]
        assert len(set(ids)) == 300


async def test_many_headers_counted(tmp_path, upstream):
    extra = [(f"x-h{i:03d}", f"v{i}") for i in range(100)]
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/many-headers"), headers=extra)
        assert status == 200
        rep = report_of(headers)
    keys = one(rep, "keys").split(",")
    assert int(one(rep, "n")) == len(keys)
    assert [k for k in keys if k.startswith("x-h")] == [k for k, _ in extra]


async def test_tick_armed_in_on_configure(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, tag="tick")]) as (gw, s):
        async def three_ticks():
            tr = await get_trace(s, gw, "tick")
            return tr if len([e for e in tr if e[0] == "tick"]) >= 3 else None
        trace = await wait_for(three_ticks, timeout=3.0)
    assert trace, "a timer armed in on_configure never fired"
    root = trace[1][1]
    assert {e[1] for e in trace if e[0] == "tick"} == {root}


async def test_http_call_from_root_context_on_tick(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path, tag="tickcall")]) as (gw, s):
        async def answered():
            tr = await get_trace(s, gw, "tickcall")
            return tr if [e for e in tr if e[0] == "root_call_resp"] else None
        trace = await wait_for(answered, timeout=3.0)
    assert trace, "the root context's callout never got its callback"
    root = trace[1][1]
    calls = [e for e in trace if e[0] == "call_resp"]
    token = [e for e in trace if e[0] == "root_call"][0][1]
    assert calls and calls[0][1] == root and calls[0][2] == token
    resp = [e for e in trace if e[0] == "root_call_resp"][0]
    assert resp[2] == "201"
    assert [r.path for r in upstream.callouts()] == ["/callout/from-tick"]


async def test_http_call_timeout_zero_means_no_timeout(tmp_path, upstream):
    # Envoy: a zero timeout on an async HTTP call means "no timeout", not "fail at once"
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/t0"), headers={
            "x-act": "call", "x-cluster": "callout", "x-timeout": "0"})
        assert status == 200, body
        rep = report_of(headers)
    assert one(rep, "cstatus") == "201"
    assert one(rep, "cbody") == "callout-ok"


async def test_header_value_with_crlf_is_accepted_but_never_reaches_the_wire(tmp_path, upstream):
    # Envoy's add/replace_header_map_value answer OK; the Rust SDK panics on anything else,
    # so a host that refuses the value with BAD_ARGUMENT turns it into a 503
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/crlf"), headers={"x-act": "crlf-strict"})
        assert status == 200, (status, body[:200])
        report_of(headers)
    for r in upstream.main_requests():
        names = {k.lower() for k, _ in r.headers}
        assert not names & {"injected-req", "injected-req2"}, r.headers


async def _raw_trailer_upstream():
    async def handle(reader, writer):
        try:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-resp-trailer\r\n"
                         b"content-type: text/plain\r\n\r\n5\r\nhello\r\n0\r\nx-resp-trailer: t1\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _trailer_exchange(tmp_path, upstream):
    """Issue 3: trailers callbacks when present (HTTP/1.1 chunked trailers, both directions)."""
    from tests.conformance.probe import gateway_yaml
    from tests.helpers import run_gateway
    server, port = await _raw_trailer_upstream()
    try:
        text = gateway_yaml(upstream.port, [probe_filter(tmp_path)],
                            [{"name": "tr", "match": {"prefix": "/tr"}, "cluster": "trailers", "filters": ["probe"]},
                             {"name": "all", "cluster": "backend", "filters": ["probe"]}])
        text = text.replace("clusters:\n", f"clusters:\n- name: trailers\n  endpoints: ['127.0.0.1:{port}']\n", 1)
        async with run_gateway(text, tmp_path) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
            writer.write(b"POST /with-trailers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\nx-req-trailer: r1\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200"), head
            async with aiohttp.ClientSession() as s:
                status, _, body = await fetch(s, gw.url("/tr/resp"))
                assert status == 200 and body == b"hello"
                await asyncio.sleep(0.2)
                trace = await get_trace(s, gw, "p1")
    finally:
        server.close()
        await server.wait_closed()
    return trace


async def test_request_trailers_reach_the_filter(tmp_path, upstream):
    trace = await _trailer_exchange(tmp_path, upstream)
    trl = [e for e in trace if e[0] == "req_trl"]
    assert trl, "on_request_trailers never called"
    assert trl[0][2:] == ("1", "1", "x-req-trailer"), trl


async def test_response_trailers_reach_the_filter(tmp_path, upstream):
    trace = await _trailer_exchange(tmp_path, upstream)
    trl = [e for e in trace if e[0] == "resp_trl"]
    assert trl, "on_response_trailers never called"
    assert trl[0][2:] == ("1", "1", "x-resp-trailer"), trl


async def test_http_call_from_request_body_then_resume(tmp_path, upstream):
    async def gen():
        yield b"first-half|"
        await asyncio.sleep(0.05)
        yield b"second-half"

    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/body-call"), method="POST", data=gen(),
                                            headers={"x-act": "call-body", "x-cluster": "callout"})
        assert status == 200, body[:200]
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
    assert upstream.main_requests()[-1].body == b"first-half|second-half"
    assert len(upstream.callouts()) == 1
    mine = [e[0] for e in trace if len(e) > 1 and e[1] == ctx]
    last_body = max(i for i, e in enumerate(trace) if e[0] == "req_body" and e[1] == ctx)
    call = next(i for i, e in enumerate(trace) if e[0] == "call_resp")
    assert last_body < call, mine


async def test_obs_text_header_bytes_reach_the_filter_and_upstream_unchanged(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"GET /latin HTTP/1.1\r\nHost: x\r\nx-act: hdrs\r\nx-latin: caf\xe9\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200"), head[:200]
    report = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-probe-p1:")]
    rep = parse_report(report[0] if report else None)
    assert upstream.main_requests()[-1].first("x-latin") == "caf\xe9"   # latin-1 decoded by the recorder
    # and what the filter writes as raw bytes goes out as those bytes
    assert upstream.main_requests()[-1].first("x-latin-out") == "caf\xe9"
    assert one(rep, "latin") == b"caf\xe9".hex()          # raw bytes, not re-encoded as UTF-8


async def test_raw_path_bytes_reach_the_filter_unchanged(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"GET /caf\xe9?q=\xff HTTP/1.1\r\nHost: x\r\nx-act: props\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    report = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-probe-p1:")]
    if not report:
        # the gateway refused the non-ASCII request line before any filter ran: acceptable
        assert head.startswith("HTTP/1.1 400"), head[:200]
        return
    # (the upstream may answer 400 to such a path: the filter's view is what counts here)
    rep = parse_report(report[0])
    assert prop(rep, "p_path") == (0, b"/caf\xe9?q=\xff")


async def test_http10_request_protocol_property(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"GET /old HTTP/1.0\r\nHost: x\r\nx-act: props\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.split(" ")[1] == "200", head[:200]
    report = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-probe-p1:")]
    rep = parse_report(report[0] if report else None)
    assert prop(rep, "p_protocol") == (0, b"HTTP/1.0")


async def test_chunked_request_with_empty_body_ends_in_a_body_callback(tmp_path, upstream):
    # Envoy's HTTP/1 codec cannot know a chunked body is empty until the last chunk: headers
    # come with end_of_stream=false, then on_request_body(0, end_of_stream=true)
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"POST /chunked-empty HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n0\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.split(" ")[1] == "200", head[:200]
    report = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-probe-p1:")]
    rep = parse_report(report[0] if report else None)
    assert one(rep, "eos") == "0"
    assert rep.get("rb") == ["0/1"], rep.get("rb")


async def test_go_sdk_style_body_replace_prepend_append(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/go-body"), method="POST", data=b"original body",
                                            headers={"x-act": "body-go"})
        assert status == 200, body[:200]
        report_of(headers)
    assert upstream.main_requests()[-1].body == b"<REPLACED>"


async def test_callout_from_on_log_never_calls_back_a_deleted_context(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/log-call"), headers={"x-act": "call-in-log"})
        assert status == 200
        ctx = one(report_of(headers), "ctx")
        trace = await wait_for(lambda: _deleted(s, gw, ctx))
        assert trace
        await asyncio.sleep(0.3)                 # the callout (0.1 s) would have answered by now
        trace = await get_trace(s, gw, "p1")
        status, headers, _ = await fetch(s, gw.url("/after"))
        assert status == 200
        report_of(headers)
    assert trace.count(("init",)) == 1, "instance rebuilt: a callback reached a deleted context"
    log_calls = [e for e in trace if e[0] == "log_call"]
    assert len(log_calls) == 1
    if log_calls[0][1] == "0":
        token = log_calls[0][2]
        assert not [e for e in trace if e[0] == "call_resp" and e[2] == token]


async def test_local_reply_from_body_while_headers_paused(tmp_path, upstream):
    f = probe_filter(tmp_path, deliver_body_while_paused=True)
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/paused-deny"), method="POST", data=b"x" * 100,
                                            headers={"x-act": "call-body-deny", "x-cluster": "callout"})
        assert status == 413, body[:200]
        assert body == b"body refused while headers paused"
        await asyncio.sleep(0.3)                 # the callout answers meanwhile: must be harmless
        status, headers, _ = await fetch(s, gw.url("/after"))
        assert status == 200
        report_of(headers)
        trace = await get_trace(s, gw, "p1")
    assert upstream.main_requests()[-1].path == "/after"
    assert trace.count(("init",)) == 1


async def test_set_response_header_map_replaces_everything(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, body = await fetch(s, gw.url("/resp-pairs"), headers={"x-act": "resp-setpairs"})
        assert status == 201
        assert headers.get("x-only") == "1"
        assert "x-upstream" not in headers and "x-up-replace" not in headers
        assert json.loads(body)["path"] == "/resp-pairs"     # the body is untouched
        report_of(headers)                                   # added after the replacement


async def test_http_call_without_required_pseudo_headers_is_bad_argument(tmp_path, upstream):
    async with probe_gateway(tmp_path, upstream, [probe_filter(tmp_path)]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/noauth"), headers={"x-act": "call-noauth"})
        assert status == 200
        rep = report_of(headers)
        await asyncio.sleep(0.2)
    assert one(rep, "noauth") == "2" and one(rep, "nopath") == "2"
    assert upstream.callouts() == []


async def test_one_instance_per_filter_shared_by_routes(tmp_path, upstream):
    f = probe_filter(tmp_path, name="shared")
    routes = [{"name": "x", "match": {"prefix": "/x"}, "cluster": "backend", "filters": ["shared"]},
              {"name": "y", "match": {"prefix": "/y"}, "cluster": "backend", "filters": ["shared"]}]
    async with probe_gateway(tmp_path, upstream, [f], routes) as (gw, s):
        ids = []
        for path in ("/x/1", "/y/1", "/x/2", "/y/2"):
            status, headers, _ = await fetch(s, gw.url(path))
            assert status == 200
            ids.append(one(report_of(headers), "ctx"))
        trace = await get_trace(s, gw, "p1", prefix="/x")
    assert trace.count(("init",)) == 1
    assert len(set(ids)) == 4
    assert {e[1] for e in trace if e[0] == "req_hdrs"} >= set(ids)


async def test_root_id_from_yaml_is_the_plugin_root_id_property(tmp_path, upstream):
    # C++/AssemblyScript SDK filters pick their root context by plugin_root_id: it must be the
    # filter entry's root_id, byte for byte.
    flt = probe_filter(tmp_path, name="rooted", root_id="my_root")
    async with probe_gateway(tmp_path, upstream, [flt]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/props/r"), headers={"x-act": "props", "x-prop-hdr": "v"})
    assert status == 200
    assert prop(report_of(headers), "p_root_id") == (0, b"my_root")
