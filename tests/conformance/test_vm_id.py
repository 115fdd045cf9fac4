"""`vm_id` on a filter: Envoy's per-VM namespaces for shared data and shared queues.
Filters with the same vm_id share them, different ones are isolated (same key, different
values), in one process and across worker processes; `plugin_vm_id` names the VM; a sender
in one VM reaches a receiver's queue in another by `resolve_shared_queue(vm_id, name)`, as the
Go SDK's examples/shared_queue does."""
from __future__ import annotations

import logging

import aiohttp

from tests.abi.abi_wat import LOG_OUT, OUT, Wat, status
from tests.conformance import watlib
from tests.conformance.probe import (filter_entry, gateway_yaml, one, parse_report, probe_gateway,
                                     wait_for, wasmgate_check)
from tests.conformance.test_workers import _start, _stop

FILTERS = {"a1": "a", "a2": "a", "b1": "b", "d": None}      # filter → vm_id (None: default VM)


def counter_filters(tmp_path) -> tuple[list[dict], list[dict]]:
    wasm = watlib.build("vm_counter.wat", tmp_path)
    filters = [filter_entry(name, wasm, **({"vm_id": vm} if vm else {})) for name, vm in FILTERS.items()]
    routes = [{"name": n, "match": {"prefix": f"/{n}/"}, "cluster": "backend", "filters": [n]} for n in FILTERS]
    return filters, routes


def report(headers) -> tuple[str, int, int]:
    rep = parse_report(headers.get("x-vm"))
    return one(rep, "vm"), int(one(rep, "hits")), int(one(rep, "inst"))


async def test_same_vm_shares_data_other_vm_is_isolated(tmp_path, upstream):
    filters, routes = counter_filters(tmp_path)
    async with probe_gateway(tmp_path, upstream, filters, routes) as (gw, s):
        seen = []
        for name in ["a1", "a2", "a1", "b1", "d", "b1", "a2"]:
            async with s.get(gw.url(f"/{name}/x")) as r:
                assert r.status == 200
                seen.append((name, *report(r.headers)[:2]))
    # one key "hits" in three VMs: a1 and a2 count together, b and the default VM apart
    assert seen == [("a1", "a", 1), ("a2", "a", 2), ("a1", "a", 3), ("b1", "b", 1),
                    ("d", "", 1), ("b1", "b", 2), ("a2", "a", 4)]


async def test_vm_namespaces_hold_across_two_workers(tmp_path, upstream):
    filters, routes = counter_filters(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_yaml(upstream.port, filters, routes))
    proc, urls = await _start(cfg)
    try:
        assert "listener main" in urls, urls
        base = urls["listener main"]
        seen: dict[str, list[tuple[int, int]]] = {n: [] for n in FILTERS}
        a1_instances: set[int] = set()
        for i in range(60):
            name = ["a1", "a2", "b1", "d"][i % 4]
            # a new connection each time, so SO_REUSEPORT spreads requests over the workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(base + f"/{name}/{i}") as r:
                    assert r.status == 200
                    vm, hits, inst = report(r.headers)
            assert vm == (FILTERS[name] or "")
            seen[name].append((hits, inst))
            if name == "a1":
                a1_instances.add(inst)
            if i >= 16 and len(a1_instances) >= 2:
                break
    finally:
        await _stop(proc)
    # a1 answered from two instances, i.e. from both worker processes (one instance each)
    assert len(a1_instances) >= 2, seen
    # VM a: a1 and a2 in both workers counted one sequence; b and default each their own
    a = sorted(h for n in ("a1", "a2") for h, _ in seen[n])
    assert a == list(range(1, len(a) + 1)), seen
    for n in ("b1", "d"):
        assert [h for h, _ in seen[n]] == list(range(1, len(seen[n]) + 1)), seen


# -- shared queues across VMs: proxy-wasm-go-sdk examples/shared_queue ---------------------

def receiver_wat(tmp_path, name: str) -> str:
    """receiver/main.go: RegisterSharedQueue("http_headers") in OnVMStart; OnQueueReady
    dequeues and logs "dequeued data: <item>" (EMPTY: nothing to do)."""
    w = Wat("0_2_0")
    w.on("proxy_on_vm_start",
         status(w, "registered", f"(call $proxy_register_shared_queue {w.s('http_headers')} (i32.const {OUT + 8}))")
         + " (i32.const 1)")
    w.on("proxy_on_queue_ready",
         f"(block $done (loop $next"
         f" (br_if $done (call $proxy_dequeue_shared_queue (local.get $b) (i32.const {OUT}) (i32.const {OUT + 4})))"
         f" (drop (call $proxy_log (i32.const 2) {w.s('dequeued data:')}))"
         f" {LOG_OUT} (br $next)))")
    path = tmp_path / f"{name}.wat"
    path.write_text(w.render())
    return str(path)


def sender_wat(tmp_path) -> str:
    """sender/main.go: NewHttpContext resolves ("receiver", "http_headers"); OnHttpRequestHeaders
    enqueues `{"key": ":path","value": "<path>"}` (the example enqueues every header so)."""
    w = Wat("0_2_0")
    qid = OUT + 40
    w.on("proxy_on_context_create",
         f"(if (local.get $b) (then"
         + status(w, "resolve", f"(call $proxy_resolve_shared_queue {w.s('receiver')} {w.s('http_headers')} (i32.const {qid}))")
         + status(w, "resolve-own", f"(call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) {w.s('http_headers')} (i32.const {OUT + 44}))")
         + "))")
    prefix, suffix = b'{"key": ":path","value": "', b'"}'
    msg = 0x7000
    w.on("proxy_on_request_headers",
         f"(drop (call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} (i32.const {OUT}) (i32.const {OUT + 4})))"
         f"(memory.copy (i32.const {msg}) {w.s(prefix)})"
         f"(memory.copy (i32.const {msg + len(prefix)}) (i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})))"
         f"(memory.copy (i32.add (i32.const {msg + len(prefix)}) (i32.load (i32.const {OUT + 4}))) {w.s(suffix)})"
         + status(w, "enqueue", f"(call $proxy_enqueue_shared_queue (i32.load (i32.const {qid})) (i32.const {msg})"
                                f" (i32.add (i32.const {len(prefix) + len(suffix)}) (i32.load (i32.const {OUT + 4}))))")
         + " (i32.const 0)")
    path = tmp_path / "sender.wat"
    path.write_text(w.render())
    return str(path)


async def test_go_sdk_shared_queue_sender_reaches_receiver_vm(tmp_path, upstream, caplog):
    caplog.set_level(logging.INFO)
    filters = [
        filter_entry("receiver", receiver_wat(tmp_path, "receiver"), vm_id="receiver"),
        # the same queue name in the default VM: must get nothing
        filter_entry("decoy", receiver_wat(tmp_path, "decoy")),
        filter_entry("sender", sender_wat(tmp_path), vm_id="sender"),
    ]
    routes = [{"name": "all", "cluster": "backend", "filters": ["sender"]}]   # receivers: no route
    async with probe_gateway(tmp_path, upstream, filters, routes) as (gw, s):
        for path in ("/one", "/two?x=1"):
            async with s.get(gw.url(path)) as r:
                assert r.status == 200

        def lines(name):
            out = [r.getMessage().split('": ', 1)[1] for r in caplog.records
                   if r.getMessage().startswith(f'filter "{name}": ')]
            return [line for line in out if not line.startswith("proxy_on_")]   # callback traces

        async def delivered():
            return lines("receiver").count("dequeued data:") >= 2
        assert await wait_for(delivered, timeout=10), lines("receiver")
    got = lines("receiver")
    assert got[0] == "registered 0"
    assert [got[i + 1] for i, l in enumerate(got) if l == "dequeued data:"] == [
        '{"key": ":path","value": "/one"}', '{"key": ":path","value": "/two?x=1"}']
    assert lines("decoy") == ["registered 0"]                  # the default VM's own queue
    sent = lines("sender")
    # resolve in VM "receiver": OK; resolve with vm_id "" = the sender's own VM: NOT_FOUND
    assert sent.count("resolve 0") == 2 and sent.count("resolve-own 1") == 2, sent
    assert sent.count("enqueue 0") == 2, sent


async def test_wasmgate_check_names_a_bad_vm_id(tmp_path, upstream):
    wasm = watlib.build("vm_counter.wat", tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_yaml(upstream.port, [filter_entry("f", wasm, vm_id="")],
                                [{"name": "all", "cluster": "backend", "filters": ["f"]}]))
    returncode, text = await wasmgate_check(cfg)
    assert returncode != 0, text
    line = cfg.read_text().splitlines().index("  vm_id: ''") + 1
    assert f"{cfg}:{line} filters[0].vm_id: must not be empty" in text, text
