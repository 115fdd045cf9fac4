"""Per-filter capabilities and readable properties, end to end through the real gateway.

The filter is a WAT module with the Rust SDK's import set: on each request it tries an HTTP
callout and two property reads, and reports each host call's status in a request header, so the
upstream shows exactly what the host answered and that the request went on by the filter's logic.
"""
from __future__ import annotations

import logging

import aiohttp
import pytest
import wasmtime

from gateway.config import ConfigError, load_config
from tests.abi.abi_wat import OUT, Wat
from tests.conformance.watlib import serialize_map
from tests.gateway.conftest import basic_yaml
from tests.helpers import run_gateway

NUM = 0x8800      # scratch for $hdr_num's digits (the trace buffer is 0x8000..)


def prober() -> bytes:
    w = Wat()
    call = (f"(call $proxy_http_call {w.s('backend')} "
            f"{w.s(serialize_map([(b':method', b'GET'), (b':path', b'/side'), (b':authority', b'side')]))} "
            f"(i32.const 0) (i32.const 0) {w.s(serialize_map([]))} (i32.const 1000) (i32.const {OUT}))")
    prop = lambda path: f"(call $proxy_get_property {w.s(path)} (i32.const {OUT}) (i32.const {OUT + 4}))"  # noqa: E731
    w.on("proxy_on_request_headers",
         f"(call $hdr_num {w.s('x-callout-status')} {call}) "
         f"(call $hdr_num {w.s('x-source-address-status')} {prop(b'source' + bytes(1) + b'address')}) "
         f"(call $hdr_num {w.s('x-request-path-status')} {prop(b'request' + bytes(1) + b'path')}) "
         f"(call $hdr_num {w.s('x-set-property-status')} "
         f"(call $proxy_set_property {w.s(b'wasmgate' + bytes(1) + b'probe')} {w.s('1')})) "
         "(i32.const 0)")
    w.on("proxy_on_http_call_response", "")
    w.extra.append(f"""
(func $hdr_num (param $k i32) (param $klen i32) (param $v i32)
  (local $end i32)
  (local.set $end (call $put_num (i32.const {NUM}) (local.get $v)))
  (drop (call $proxy_add_header_map_value (i32.const 0) (local.get $k) (local.get $klen)
        (i32.const {NUM + 1}) (i32.sub (local.get $end) (i32.const {NUM + 1})))))""")
    return wasmtime.wat2wasm(w.render())


@pytest.fixture
def probe_wasm(tmp_path):
    path = tmp_path / "probe.wasm"
    path.write_bytes(prober())
    return path


def yaml_with(up_port: int, filter_extra: str, top: str = "") -> str:
    return basic_yaml(up_port, routes="  - {name: all, cluster: backend, filters: [probe]}\n", extra=(
        top + "filters:\n  - name: probe\n    wasm: probe.wasm\n" + filter_extra))


async def statuses(gw, up, n: int = 1) -> dict[str, str]:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(gw.url("/hello")) as r:
                assert r.status == 200
    seen = [r for r in up.requests if r.path == "/hello"][-1]
    return {k: seen.header(k) for k in ("x-callout-status", "x-source-address-status",
                                        "x-request-path-status", "x-set-property-status")}


async def metrics(gw) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/metrics") as r:
            return await r.text()


async def test_all_capabilities_by_default(tmp_path, upstream, probe_wasm):
    async with run_gateway(yaml_with(upstream.port, ""), tmp_path) as gw:
        assert await statuses(gw, upstream) == {"x-callout-status": "0", "x-source-address-status": "0",
                                                "x-request-path-status": "0", "x-set-property-status": "0"}
        assert "wasmgate_filter_denied_calls_total" not in await metrics(gw)


async def test_denied_http_call_answers_internal_failure_and_the_request_goes_on(tmp_path, upstream, probe_wasm,
                                                                                 caplog):
    caplog.set_level(logging.WARNING)
    text = yaml_with(upstream.port, "    capabilities: [log, metrics]\n"
                                    "    readable_properties: [request]\n")
    async with run_gateway(text, tmp_path) as gw:
        got = await statuses(gw, upstream, n=3)
        # cpp-host's restricted-capability stub answer: INTERNAL_FAILURE (10); the filter, by its
        # own logic, only noted it and let the request through (200 above).
        assert got["x-callout-status"] == "10"
        assert got["x-set-property-status"] == "10"                 # properties_write not granted
        assert got["x-source-address-status"] == "1"                # outside readable_properties: NOT_FOUND
        assert got["x-request-path-status"] == "0"                  # request.* readable
        assert not [r for r in upstream.requests if r.path == "/side"]   # no callout left the gateway
        text_metrics = await metrics(gw)
        assert 'wasmgate_filter_denied_calls_total{filter="probe",capability="http_call"} 3' in text_metrics
        assert 'wasmgate_filter_denied_calls_total{filter="probe",capability="properties_write"} 3' in text_metrics
        assert 'wasmgate_filter_denied_calls_total{filter="probe",capability="readable_properties"} 3' in text_metrics
    denials = [r.getMessage() for r in caplog.records if "denied: capability" in r.getMessage()]
    assert sorted(denials) == sorted([   # once per function, not per call
        'filter "probe": proxy_http_call denied: capability "http_call" not granted (logged once; '
        "counted in wasmgate_filter_denied_calls_total)",
        'filter "probe": proxy_set_property denied: capability "properties_write" not granted (logged once; '
        "counted in wasmgate_filter_denied_calls_total)",
        'filter "probe": property source.address denied: capability "readable_properties" not granted '
        "(logged once; counted in wasmgate_filter_denied_calls_total)"])


async def test_default_capabilities_apply_to_filters_without_their_own(tmp_path, upstream, probe_wasm):
    text = yaml_with(upstream.port, "", top="default_capabilities: [log, http_call]\n")
    async with run_gateway(text, tmp_path) as gw:
        got = await statuses(gw, upstream)
        assert got["x-callout-status"] == "0" and got["x-set-property-status"] == "10"


async def test_strict_capabilities_refuses_the_module_naming_the_import(tmp_path, upstream, probe_wasm):
    text = yaml_with(upstream.port, "    capabilities: [log, http_call, shared_data, shared_queue, metrics, tick,\n"
                                    "                   foreign_functions, grpc_call]\n"
                                    "    strict_capabilities: true\n")
    with pytest.raises(Exception) as e:
        async with run_gateway(text, tmp_path):
            pass
    assert 'filter "probe"' in str(e.value)
    assert ("imports functions its capabilities do not grant (strict_capabilities): "
            "env.proxy_set_property (capability properties_write)") in str(e.value)


def test_unknown_capability_is_a_config_error(tmp_path, probe_wasm):
    (tmp_path / "config.yaml").write_text(yaml_with(1, "    capabilities: [log, http_calls]\n"))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "config.yaml")
    assert ('config.yaml:11 filters[0].capabilities[1]: unknown capability "http_calls" '
            "(known: foreign_functions, grpc_call, http_call, log,") in e.value.errors[0]


