"""Loading: ABI 0.1.0, Go-like 0.2.0 and C++-like modules load and run; bad modules are refused
with an error naming the file and the cause (FilterLoadError, gateway start, `wasmgate run`)."""
from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from abi.api import FilterLimits, FilterLoadError, FilterSpec, load_filter_host
from tests.conformance import watlib
from tests.conformance.probe import (filter_entry, gateway_yaml, parse_report, probe_gateway,
                                     strict_module, wasmgate_check)
from tests.helpers import run_gateway

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


async def fetch(session, url, **kw):
    async with session.get(url, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_abi_0_1_0_module_two_arg_header_callbacks_and_get_configuration(tmp_path, upstream):
    f = filter_entry("old", watlib.build("abi010.wat", tmp_path), config="cfg-010")
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/old"))
    assert status == 200
    assert upstream.main_requests()[-1].first("x-abi010") == "cfg-010"
    rep = {k: v[0] for k, v in parse_report(headers.get("x-abi010-report")).items()}
    assert rep["cfg"] == "cfg-010"
    assert int(rep["n"]) >= 4            # pseudo-headers counted; 2-arg callback got num_headers
    assert int(rep["rn"]) >= 1
    # §0.1: v0.1.0 get_header_map_value answers OK + empty for a missing key (NOT_FOUND is 0.2.x)
    assert rep["missing"] == "0"


async def test_go_like_0_2_0_module_with_start_and_wasi(tmp_path, upstream):
    f = filter_entry("golike", watlib.build("golike.wat", tmp_path), config="x",
                     environment={"PROBE_ENV": "hello"})
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/go"))
    assert status == 200
    rep = {k: v[0] for k, v in parse_report(headers.get("x-golike")).items()}
    assert rep["start"] == "1"           # _start runs when _initialize is absent
    assert rep["argc"] == "0"            # no args
    assert rep["clock"] == "0"           # clock_time_get(MONOTONIC) succeeds
    assert rep["envc"] == "1"            # only what the config grants
    assert rep["env"] == "PROBE_ENV=hello"


async def test_cpp_like_module_wasi_unstable_malloc_initialize_then_main(tmp_path, upstream):
    f = filter_entry("cpplike", watlib.build("cpplike.wat", tmp_path), config={"a": 1, "b": "two"})
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/cpp"))
    assert status == 200
    raw = headers.get("x-cpplike")
    assert raw is not None
    head, _, cfg = raw.partition(";cfg=")
    rep = {k: v[0] for k, v in parse_report(head).items()}
    assert rep["init"] == "1" and rep["main"] == "1"
    assert rep["order"] == "1"           # main(0,0) after _initialize
    assert rep["rootid"] == "1"          # plugin_root_id answered OK
    # getProperty({"request", "path"}) as the C++ SDK sends it: "request\0path\0"
    assert (rep["pathst"], rep["path"]) == ("0", "/cpp")
    # proxy_get_buffer_status(PLUGIN_CONFIGURATION) outside on_configure: NOT_FOUND, or OK
    # with the configuration's length
    assert (rep["bufst"], rep["buflen"]) in (("1", "0"), ("0", str(len(cfg))))
    assert json.loads(cfg) == {"a": 1, "b": "two"}   # mapping config → JSON bytes


class _Services:
    log = logging.getLogger("conformance")

    def has_cluster(self, name):
        return False

    async def http_call(self, *a, **k):
        raise AssertionError("not used")


async def _load_error(path, name="bad") -> FilterLoadError:
    with pytest.raises(FilterLoadError) as ei:
        host = await load_filter_host([FilterSpec(name=name, wasm_path=path, configuration=b"x")], _Services())
        await host.close()
    return ei.value


async def test_module_without_abi_marker_is_refused_naming_the_file(tmp_path):
    path = watlib.build("nomarker.wat", tmp_path)
    err = await _load_error(path)
    assert err.filter_name == "bad"
    assert str(path) in str(err) or path.name in str(err)
    assert "abi" in str(err).lower() or "proxy_abi_version" in str(err)


async def test_unknown_import_is_refused_naming_the_import(tmp_path):
    path = watlib.build("unknown_import.wat", tmp_path)
    err = await _load_error(path)
    assert "foo_bar" in str(err)
    assert str(path) in str(err) or path.name in str(err)


async def test_on_configure_false_is_a_load_error(tmp_path):
    path = strict_module(tmp_path)
    with pytest.raises(FilterLoadError) as ei:
        host = await load_filter_host([FilterSpec(name="rejecting", wasm_path=path, configuration=b"reject")],
                                      _Services())
        await host.close()
    assert ei.value.filter_name == "rejecting"
    assert "configure" in str(ei.value)


async def test_gateway_refuses_to_start_with_unloadable_filter(tmp_path, upstream):
    path = watlib.build("unknown_import.wat", tmp_path)
    yaml_text = gateway_yaml(upstream.port, [filter_entry("broken", path)],
                             [{"name": "all", "cluster": "backend", "filters": ["broken"]}])
    with pytest.raises(FilterLoadError) as ei:
        async with run_gateway(yaml_text, tmp_path):
            pass
    assert "foo_bar" in str(ei.value)


async def test_wasmgate_run_exits_with_clear_error(tmp_path, upstream):
    path = watlib.build("nomarker.wat", tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_yaml(upstream.port, [filter_entry("nomark", path)],
                                [{"name": "all", "cluster": "backend", "filters": ["nomark"]}]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("wasmgate run kept running with a filter that has no ABI marker")
    assert proc.returncode != 0
    text = err.decode()
    assert "nomark" in text and "nomarker" in text, text


async def test_initialize_preferred_over_start_and_main_called_once(tmp_path, upstream):
    f = filter_entry("both", watlib.build("both_entries.wat", tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/both"))
    assert status == 200
    assert headers.get("x-entry") == "init=1;main=1"


async def test_wasmgate_check_reports_unloadable_filters(tmp_path, upstream):
    """`wasmgate check` promises to list every error before deployment; a filter that cannot
    load (no ABI marker, unknown import) is such an error."""
    marker = watlib.build("nomarker.wat", tmp_path)
    unknown = watlib.build("unknown_import.wat", tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_yaml(upstream.port, [filter_entry("nomark", marker), filter_entry("unknown", unknown)],
                                [{"name": "all", "cluster": "backend", "filters": ["nomark", "unknown"]}]))
    returncode, text = await wasmgate_check(cfg)
    assert returncode != 0, text
    assert "nomarker.wat" in text and "foo_bar" in text, text


async def test_go124_like_module_with_full_wasi_surface(tmp_path, upstream):
    f = filter_entry("go124", watlib.build("go124like.wat", tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/go124"))
    assert status == 200
    rep = {k: v[0] for k, v in parse_report(headers.get("x-go124")).items()}
    assert rep["prestat"] == "8"         # BADF: no preopens (wasi-libc / Go stop scanning here)
    assert rep["poll"] == "0"            # the Go runtime requires SUCCESS
    assert rep["yield"] == "0"
    assert rep["random"] == "0" and rep["rnz"] == "1"
    assert rep["fdstat"] == "0"
    assert rep["clockres"] == "0"
    assert rep["pathopen"] != "0"        # no filesystem


async def test_filter_hanging_in_on_configure_fails_to_load_within_deadline(tmp_path):
    import time
    path = strict_module(tmp_path)
    spec = FilterSpec(name="hanging", wasm_path=path, configuration=b"hang",
                      limits=FilterLimits(callback_ms=100))
    t0 = time.monotonic()
    with pytest.raises(FilterLoadError) as ei:
        host = await asyncio.wait_for(load_filter_host([spec], _Services()), timeout=20)
        await host.close()
    assert time.monotonic() - t0 < 10
    assert ei.value.filter_name == "hanging"
    assert "configure" in str(ei.value)


async def test_initial_memory_above_limit_fails_to_load(tmp_path):
    path = watlib.build("bigmem.wat", tmp_path)
    spec = FilterSpec(name="big", wasm_path=path, limits=FilterLimits(memory_bytes=16 * 1024 * 1024))
    with pytest.raises(FilterLoadError) as ei:
        host = await load_filter_host([spec], _Services())
        await host.close()
    assert ei.value.filter_name == "big"


async def test_guest_logs_and_stdout_reach_the_gateway_log_tagged(tmp_path, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    filters = [filter_entry("loudgo", watlib.build("golike.wat", tmp_path), config="x"),
               filter_entry("loudprobe", strict_module(tmp_path), config="p1")]
    async with probe_gateway(tmp_path, upstream, filters) as (gw, s):
        status, _, _ = await fetch(s, gw.url("/log"))
        assert status == 200
    records = [(r.getMessage(), r.name) for r in caplog.records]
    stdout = [m for m, n in records if "golike: _start()" in m]
    assert stdout, "WASI fd_write(1) output not in the gateway log"
    assert any("loudgo" in m or "loudgo" in n for m, n in records if "golike: _start()" in m)
    logged = [m for m, n in records if "strict_sdk configured" in m]
    assert logged and any("loudprobe" in m or "loudprobe" in n for m, n in records if "strict_sdk configured" in m)


async def test_gateway_stop_tears_down_root_contexts(tmp_path, upstream, caplog):
    # cpp-host WasmBase::startShutdown: proxy_on_done(root) then proxy_on_delete(root)
    caplog.set_level(logging.DEBUG)
    async with probe_gateway(tmp_path, upstream, [filter_entry("stopper", strict_module(tmp_path), config="p1")]) as (gw, s):
        status, _, _ = await fetch(s, gw.url("/x"))
        assert status == 200
        assert not [r for r in caplog.records if "root on_done" in r.getMessage()]
    msgs = [r.getMessage() for r in caplog.records]
    done = [i for i, m in enumerate(msgs) if "strict_sdk: root on_done" in m]
    deleted = [i for i, m in enumerate(msgs) if "strict_sdk: root on_delete" in m]
    assert len(done) == 1 and len(deleted) == 1, (done, deleted)
    assert done[0] < deleted[0]


async def test_missing_callbacks_are_continue_and_the_rest_still_runs(tmp_path, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    f = filter_entry("partial", watlib.build("partial_exports.wat", tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        async with s.post(gw.url("/partial"), data=b"twelve bytes") as r:
            assert r.status == 200
            await r.read()
        await asyncio.sleep(0.1)
    assert upstream.main_requests()[-1].body == b"twelve bytes"
    msgs = [r.getMessage() for r in caplog.records]
    assert any("partial: body 12 1" in m for m in msgs), [m for m in msgs if "partial" in m]
    assert any("partial: log " in m for m in msgs)


@pytest.mark.parametrize("module,callback", [("init_trap.wat", "_initialize"), ("vm_start_false.wat", "vm_start")])
async def test_start_sequence_failures_are_load_errors(tmp_path, module, callback):
    path = watlib.build(module, tmp_path)
    with pytest.raises(FilterLoadError) as ei:
        host = await load_filter_host([FilterSpec(name="starter", wasm_path=path)], _Services())
        await host.close()
    assert ei.value.filter_name == "starter"
    assert callback in str(ei.value), str(ei.value)


async def test_known_import_with_wrong_signature_is_refused_naming_it(tmp_path):
    path = watlib.build("wrong_signature.wat", tmp_path)
    err = await _load_error(path)
    assert "proxy_grpc_call" in str(err), str(err)
    assert str(path) in str(err) or path.name in str(err)


async def test_abi_0_1_0_module_with_three_arg_header_callbacks_gets_end_of_stream(tmp_path, upstream):
    # TinyGo `-tags abi_010` / 2020-21 C++ SDK shape: 0.1.0 marker, (ctx, n, end_of_stream).
    f = filter_entry("tinygo010", watlib.build("abi010_eos.wat", tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        status, headers, _ = await fetch(s, gw.url("/no-body"))
        assert status == 200
        assert upstream.main_requests()[-1].first("x-eos") == "1"     # GET: the headers end it
        assert headers.get("x-resp-eos") == "0"                       # the echo has a body
        async with s.post(gw.url("/with-body"), data=b"payload") as r:
            assert r.status == 200
        assert upstream.main_requests()[-1].first("x-eos") == "0"     # a body follows
        async with s.get(gw.url("/nobody")) as r:                     # upstream answers 204
            assert r.status == 204
            assert r.headers.get("x-resp-eos") == "1"


@pytest.mark.parametrize("version, params, accepted", [
    # 0.1.0 header callbacks: 2 (spec, cpp-host) or 3 (TinyGo abi_010, MOSN); 4 never existed
    ("0_1_0", "i32 i32 i32 i32", "(i32, i32) -> (i32) or (i32, i32, i32) -> (i32)"),
    # every 0.2.x host calls the 3-argument form
    ("0_2_0", "i32 i32", "(i32, i32, i32) -> (i32)"),
])
async def test_header_callback_arity_no_host_used_is_refused(tmp_path, version, params, accepted):
    path = tmp_path / "arity.wat"
    path.write_text(f'''(module (memory (export "memory") 1)
      (func (export "proxy_abi_version_{version}"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_on_response_headers") (param {params}) (result i32) (i32.const 0)))''')
    err = await _load_error(path)
    assert err.filter_name == "bad"
    assert (f"proxy_on_response_headers is ({', '.join(params.split())}) -> (i32), "
            f"expected {accepted}") in str(err), str(err)
    assert "arity.wat" in str(err)
