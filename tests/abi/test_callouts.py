"""HTTP callouts, pause/continue, ticks, shared data, queues and metrics (§5.2-§5.7)."""
from __future__ import annotations

import asyncio

from abi.api import CallFailed, CallResponse, Forward, LocalReply, LogInfo
from abi.pairs import serialize
from abi.shared_store import LocalStore

from abi_helpers import REQ, body_iter, collect, info
from abi_wat import LOG_OUT, OUT, Wat, out_ptr_size, status

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"
CALL_HEADERS = serialize([(b":method", b"GET"), (b":path", b"/check"), (b":authority", b"auth"),
                          (b"x-token", b"t")])


def callout_filter(on_response: str, *, cluster: str = "authz", timeout_ms: int = 500) -> Wat:
    """SDK-like: dispatch in on_request_headers and Pause; the response callback first sets
    the effective context to the stream (Rust/Go dispatchers do), then runs `on_response`."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {OUT + 16}) (local.get $a))"
         + status(w, "dispatch", f"(call $proxy_http_call {w.s(cluster)} {w.s(CALL_HEADERS)} {w.s('ping')} {w.s(serialize([]))} (i32.const {timeout_ms}) (i32.const {OUT + 12}))")
         + f"(call $log_num {w.s('token')} (i32.load (i32.const {OUT + 12})))"
         + " (i32.const 1)")
    w.on("proxy_on_http_call_response",
         w.trace("callback", 5)
         + f"(call $trace {w.s('counts')} (i32.const 3) (local.get $c) (local.get $d) (local.get $e))"
         + status(w, "effective", f"(call $proxy_set_effective_context (i32.load (i32.const {OUT + 16})))")
         + on_response)
    return w


async def test_http_call_resume_reads_response(load, services, trace):
    services.clusters["authz"] = CallResponse(200, [("X-Verdict", "ok")], b"allowed")
    w = callout_filter("")
    w.callbacks["proxy_on_http_call_response"] += (
        status(w, "status-hdr", f"(call $proxy_get_header_map_value (i32.const 6) {w.s(':status')} {O})") + LOG_OUT
        + status(w, "verdict", f"(call $proxy_get_header_map_value (i32.const 6) {w.s('x-verdict')} {O})") + LOG_OUT
        + status(w, "body", f"(call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (i32.const -1) {O})") + LOG_OUT
        + status(w, "trailers", f"(call $proxy_get_header_map_pairs (i32.const 7) {O})") + out_ptr_size(w, "tr")
        + status(w, "getstatus", f"(call $proxy_get_status (i32.const {OUT + 20}) {O})")
        + f"(call $log_num {w.s('code')} (i32.load (i32.const {OUT + 20})))"
        + f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-authz')} {w.s('done')}))"
        + status(w, "continue", "(call $proxy_continue_stream (i32.const 0))"))
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await asyncio.wait_for(s.request(REQ, None), 5)
    assert isinstance(fwd, Forward)
    assert ("x-authz", "done") in fwd.headers
    cluster, method, path, authority, headers, body, timeout = services.calls[0]
    assert (cluster, method, path, authority, headers, body, timeout) == (
        "authz", "GET", "/check", "auth", [("x-token", "t")], b"ping", 0.5)
    lines = trace.lines("f")
    assert lines[1:3] == ["dispatch 0", "token 4"]
    # Callback goes to the ROOT context id with the token; counts include :status.
    assert lines[3:5] == ["callback 1 4 2", "counts 2 7 0"]
    assert lines[5:] == ["effective 0", "status-hdr 0", "200", "verdict 0", "ok", "body 0", "allowed",
                         "trailers 0", "tr 0 0", "getstatus 0", "code 0", "continue 0"]
    await s.finish(LogInfo())


async def test_http_call_failure_reports_zero_counts_and_broken_connection(load, services, trace):
    services.clusters["authz"] = CallFailed("connection refused")
    w = callout_filter(
        "(drop (call $proxy_get_status (i32.const 0x9020) (i32.const 0x9000) (i32.const 0x9004)))"
        "(call $trace (i32.const 0) (i32.const 0) (i32.const 1) (i32.load (i32.const 0x9020)) (i32.const 0) (i32.const 0))")
    w.callbacks["proxy_on_http_call_response"] += (
        LOG_OUT + f"(drop (call $proxy_send_local_response (i32.const 503) (i32.const 0) (i32.const 0) {w.s('authz down')} (i32.const 0) (i32.const 0) (i32.const -1)))")
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    out = await asyncio.wait_for(s.request(REQ, None), 5)
    assert isinstance(out, LocalReply) and out.status == 503 and out.body == b"authz down"
    lines = trace.lines("f")
    assert "counts 0 0 0" in lines and " 11" in lines and "reset" in lines
    await s.finish(LogInfo())


async def test_http_call_unknown_cluster_and_missing_pseudo_headers(load, services, trace):
    services.clusters["ok"] = CallResponse(200, [], b"")
    w = Wat()
    bad_headers = serialize([(b":method", b"GET"), (b":path", b"/")])
    w.on("proxy_on_request_headers",
         status(w, "unknown", f"(call $proxy_http_call {w.s('nope')} {w.s(CALL_HEADERS)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const {OUT}))")
         + status(w, "noauth", f"(call $proxy_http_call {w.s('ok')} {w.s(bad_headers)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const {OUT}))")
         + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    assert trace.lines("f")[1:] == ["unknown 2", "noauth 2"]
    assert services.calls == []


async def test_http_call_timeout(load, services, trace):
    async def slow(*a):
        await asyncio.sleep(5)
        return CallResponse(200, [], b"")
    services.clusters["authz"] = slow
    w = callout_filter("(drop (call $proxy_continue_stream (i32.const 0)))", timeout_ms=50)
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await asyncio.wait_for(s.request(REQ, None), 3)
    assert isinstance(fwd, Forward)
    assert "counts 0 0 0" in trace.lines("f")
    await s.finish(LogInfo())


async def test_pending_callout_is_cancelled_when_the_request_ends(load, services, trace):
    started = asyncio.Event()

    async def hang(*a):
        started.set()
        await asyncio.sleep(10)
    services.clusters["authz"] = hang
    host = await load(callout_filter(""))
    s = host.stream(["f"], info())
    task = asyncio.ensure_future(s.request(REQ, None))
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    await s.finish(LogInfo())
    f = host.filters["f"]
    assert f._calls == {}
    assert not any(l.startswith("callback") for l in trace.lines("f"))


async def test_continue_inside_the_pausing_callback_does_not_stall(load, trace):
    w = Wat()
    w.on("proxy_on_request_headers", "(drop (call $proxy_continue_stream (i32.const 0))) (i32.const 1)")
    host = await load(w)
    s = host.stream(["f"], info())
    assert isinstance(await asyncio.wait_for(s.request(REQ, None), 2), Forward)


async def test_envoy_pause_in_headers_withholds_body_until_resume(load, services, trace):
    services.clusters["authz"] = CallResponse(200, [], b"")
    w = callout_filter("(drop (call $proxy_continue_stream (i32.const 0)))")
    w.on("proxy_on_request_body", w.trace("body", 3) + " (i32.const 0)")
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await asyncio.wait_for(s.request(REQ + [("content-length", "5")], body_iter(b"abc", b"de")), 3)
    lines = trace.lines("f")
    assert not any(l.startswith("body") for l in lines)     # nothing before resume
    assert await collect(fwd.body) == b"abcde"
    assert [l for l in trace.lines("f") if l.startswith("body")] == ["body 2 3 0", "body 2 2 1"]


async def test_deliver_body_while_paused(load, trace):
    # A WAF-like filter: pause in headers, inspect the whole body, add a header, continue.
    w = Wat()
    w.on("proxy_on_request_headers", "(i32.const 1)")
    w.on("proxy_on_request_body",
         w.trace("body", 3)
         + "(if (local.get $c) (then "
         + f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-body-seen')} {w.s('yes')}))"
         + "(return (i32.const 0)))) (i32.const 1)")
    host = await load(w, deliver_body_while_paused=True)
    trace.records.clear()
    s = host.stream(["f"], info())
    fwd = await asyncio.wait_for(s.request(REQ + [("content-length", "5")], body_iter(b"abc", b"de")), 3)
    assert ("x-body-seen", "yes") in fwd.headers
    assert await collect(fwd.body) == b"abcde"
    assert [l for l in trace.lines("f") if l.startswith("body")] == ["body 2 3 0", "body 2 5 1"]


async def test_deliver_body_while_paused_passes_body_through_earlier_filters(load, trace):
    first, waf = Wat(), Wat()
    first.on("proxy_on_request_body",
             "(drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) "
             + f"{first.s('X')})) (i32.const 0)")
    waf.on("proxy_on_request_headers", "(i32.const 1)")
    waf.on("proxy_on_request_body",
           status(waf, "get", f"(call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {O})")
           + LOG_OUT + "(i32.xor (local.get $c) (i32.const 1))")
    host = await load({"first": first, "waf": waf}, deliver_body_while_paused=True)
    trace.records.clear()
    s = host.stream(["first", "waf"], info())
    fwd = await asyncio.wait_for(s.request(REQ + [("content-length", "4")], body_iter(b"ab", b"cd")), 3)
    assert await collect(fwd.body) == b"XX"
    assert trace.lines("waf")[1:] == ["get 0", "X", "get 0", "XX"]


async def test_ticks_go_to_root_context(load, trace):
    w = Wat()
    w.on("proxy_on_configure", "(drop (call $proxy_set_tick_period_milliseconds (i32.const 10))) (i32.const 1)")
    w.on("proxy_on_tick", w.trace("tick", 1)
         + "(drop (call $proxy_set_tick_period_milliseconds (i32.const 0)))")
    await load(w)
    await asyncio.sleep(0.1)
    assert [l for l in trace.lines("f") if l.startswith("tick")] == ["tick 1"]


async def test_shared_data_cas(load, trace):
    w = Wat()
    body = (
        status(w, "get-miss", f"(call $proxy_get_shared_data {w.s('k')} {O} (i32.const {OUT + 8}))")
        + status(w, "set-cas-missing", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v1')} (i32.const 42))")
        + status(w, "get", f"(call $proxy_get_shared_data {w.s('k')} {O} (i32.const {OUT + 8}))") + LOG_OUT
        + f"(i32.store (i32.const {OUT + 24}) (i32.load (i32.const {OUT + 8})))"
        + status(w, "set-stale", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v2')} (i32.add (i32.load (i32.const {OUT + 24})) (i32.const 1000)))")
        + status(w, "set-cas", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v3')} (i32.load (i32.const {OUT + 24})))")
        + status(w, "set-nocas", f"(call $proxy_set_shared_data {w.s('k')} (i32.const 0) (i32.const 0) (i32.const 0))")
        + status(w, "get-empty", f"(call $proxy_get_shared_data {w.s('k')} {O} (i32.const {OUT + 8}))") + out_ptr_size(w, "empty")
        + f"(call $log_num {w.s('cas-nonzero')} (i32.ne (i32.load (i32.const {OUT + 8})) (i32.const 0)))"
    )
    w.on("proxy_on_request_headers", body + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await host.stream(["f"], info()).request(REQ, None)
    assert trace.lines("f")[1:] == ["get-miss 1", "set-cas-missing 0", "get 0", "v1", "set-stale 8",
                                    "set-cas 0", "set-nocas 0", "get-empty 0", "empty 0 0",
                                    "cas-nonzero 1"]


async def test_shared_queue_notifies_registering_root(load, trace):
    producer, consumer = Wat(), Wat()
    consumer.on("proxy_on_configure",
                status(consumer, "reg", f"(call $proxy_register_shared_queue {consumer.s('jobs')} (i32.const {OUT + 8}))")
                + f"(call $log_num {consumer.s('qid')} (i32.load (i32.const {OUT + 8}))) (i32.const 1)")
    consumer.on("proxy_on_queue_ready",
                consumer.trace("ready", 2)
                + status(consumer, "deq", f"(call $proxy_dequeue_shared_queue (local.get $b) {O})") + LOG_OUT
                + status(consumer, "deq-empty", f"(call $proxy_dequeue_shared_queue (local.get $b) {O})")
                + status(consumer, "deq-unknown", f"(call $proxy_dequeue_shared_queue (i32.const 999) {O})"))
    producer.on("proxy_on_request_headers",
                status(producer, "resolve", f"(call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) {producer.s('jobs')} (i32.const {OUT + 8}))")
                # both filters are in the default VM: VM "vm" has no queue "jobs"
                + status(producer, "resolve-vm", f"(call $proxy_resolve_shared_queue {producer.s('vm')} {producer.s('jobs')} (i32.const {OUT + 12}))")
                + status(producer, "resolve-miss", f"(call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) {producer.s('none')} (i32.const {OUT + 12}))")
                + status(producer, "enq", f"(call $proxy_enqueue_shared_queue (i32.load (i32.const {OUT + 8})) {producer.s('job-1')})")
                + status(producer, "enq-unknown", f"(call $proxy_enqueue_shared_queue (i32.const 999) {producer.s('x')})")
                + "(i32.const 0)")
    host = await load({"consumer": consumer, "producer": producer})
    trace.records.clear()
    await host.stream(["producer"], info()).request(REQ, None)
    assert trace.lines("producer")[1:] == ["resolve 0", "resolve-vm 1", "resolve-miss 1", "enq 0", "enq-unknown 1"]
    assert trace.lines("consumer") == []            # delivered later, never inside a guest call
    await asyncio.sleep(0.01)
    assert trace.lines("consumer") == ["ready 1 1", "deq 0", "job-1", "deq-empty 7", "deq-unknown 1"]


async def test_metrics_define_increment_record_get(load, trace):
    w = Wat()
    body = (
        status(w, "def-c", f"(call $proxy_define_metric (i32.const 0) {w.s('reqs')} (i32.const {OUT + 8}))")
        + status(w, "def-g", f"(call $proxy_define_metric (i32.const 1) {w.s('inflight')} (i32.const {OUT + 12}))")
        + status(w, "def-h", f"(call $proxy_define_metric (i32.const 2) {w.s('lat')} (i32.const {OUT + 16}))")
        + status(w, "def-bad", f"(call $proxy_define_metric (i32.const 3) {w.s('x')} (i32.const {OUT + 20}))")
        + f"(call $trace {w.s('ids')} (i32.const 3) (i32.load (i32.const {OUT + 8})) (i32.load (i32.const {OUT + 12})) (i32.load (i32.const {OUT + 16})))"
        + status(w, "inc-c", f"(call $proxy_increment_metric (i32.load (i32.const {OUT + 8})) (i64.const 5))")
        + status(w, "inc-c-neg", f"(call $proxy_increment_metric (i32.load (i32.const {OUT + 8})) (i64.const -1))")
        + status(w, "inc-g-neg", f"(call $proxy_increment_metric (i32.load (i32.const {OUT + 12})) (i64.const -3))")
        + status(w, "inc-h", f"(call $proxy_increment_metric (i32.load (i32.const {OUT + 16})) (i64.const 1))")
        + status(w, "rec-h", f"(call $proxy_record_metric (i32.load (i32.const {OUT + 16})) (i64.const 7))")
        + status(w, "rec-c", f"(call $proxy_record_metric (i32.load (i32.const {OUT + 8})) (i64.const 2))")
        + status(w, "get-c", f"(call $proxy_get_metric (i32.load (i32.const {OUT + 8})) (i32.const {OUT + 24}))")
        + f"(call $log_num {w.s('c')} (i32.load (i32.const {OUT + 24})))"
        + status(w, "get-h", f"(call $proxy_get_metric (i32.load (i32.const {OUT + 16})) (i32.const {OUT + 24}))")
        + status(w, "get-unknown", f"(call $proxy_get_metric (i32.const 4000) (i32.const {OUT + 24}))")
        + status(w, "inc-unknown", f"(call $proxy_increment_metric (i32.const 4000) (i64.const 1))")
    )
    w.on("proxy_on_request_headers", body + "(i32.const 0)")
    host = await load(w)
    trace.records.clear()
    await host.stream(["f"], info()).request(REQ, None)
    assert trace.lines("f")[1:] == ["def-c 0", "def-g 0", "def-h 0", "def-bad 2", "ids 0 1 2",
                                    "inc-c 0", "inc-c-neg 2", "inc-g-neg 0", "inc-h 2", "rec-h 0",
                                    "rec-c 0", "get-c 0", "c 7", "get-h 2", "get-unknown 1",
                                    "inc-unknown 1"]
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value for m in host.metrics()}
    assert samples[("wasmcustom_reqs", ())] == 7
    assert samples[("wasmcustom_inflight", ())] == -3
    assert samples[("wasmcustom_lat_count", ())] == 1
    assert samples[("wasmcustom_lat_bucket", (("le", "10.0"),))] == 1
    assert samples[("wasmcustom_lat_bucket", (("le", "5.0"),))] == 0


async def test_reply_from_earlier_filter_while_later_one_is_fed_paused_body(load, trace):
    first, waf = Wat(), Wat()
    first.on("proxy_on_request_body",
             f"(drop (call $proxy_send_local_response (i32.const 413) (i32.const 0) (i32.const 0) {first.s('too big')} (i32.const 0) (i32.const 0) (i32.const -1))) (i32.const 1)")
    waf.on("proxy_on_request_headers", "(i32.const 1)")
    host = await load({"first": first, "waf": waf}, deliver_body_while_paused=True)
    s = host.stream(["first", "waf"], info())
    out = await asyncio.wait_for(s.request(REQ, body_iter(b"ab", b"cd")), 3)
    assert isinstance(out, LocalReply) and out.status == 413 and out.body == b"too big"
