"""The audit trail (audit_log) and GET /filters, through the real gateway and admin listener."""
from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import wasmtime

from tests.abi.abi_wat import Wat
from tests.gateway.conftest import basic_yaml
from tests.helpers import run_gateway

ROOT = Path(__file__).resolve().parents[2]
HEADERS = ROOT / "filters" / "dist" / "headers.wasm"


def trapper() -> bytes:
    """Traps in on_request_headers when the request has an x-trap header."""
    w = Wat()
    w.on("proxy_on_request_headers",
         f"(if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) {w.s('x-trap')} "
         "(i32.const 0x9000) (i32.const 0x9004))) (then unreachable)) (i32.const 0)")
    return wasmtime.wat2wasm(w.render())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(up_port: int, probe_config: str, tagger_pin: str) -> str:
    return basic_yaml(up_port, routes="  - {name: all, cluster: backend, filters: [probe, tagger]}\n", extra=(
        "audit_log: {path: audit.jsonl}\n"
        "filters:\n"
        "  - name: probe\n    wasm: probe.wasm\n"
        f"    config: {probe_config}\n"
        "    capabilities: [log]\n"
        f"  - name: tagger\n    wasm: {HEADERS}\n    sha256: {tagger_pin}\n"
        "    config: {request: {set: {x-tagged: on-the-way}}}\n"))


def lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        assert d.pop("time").endswith("Z") and d.pop("pid") > 0
        out.append(d)
    return out


async def wait_for_lines(path: Path, n: int, timeout_s: float = 30.0) -> list[dict]:
    async with asyncio.timeout(timeout_s):
        while len(path.read_text().splitlines()) < n:
            await asyncio.sleep(0.02)
    return lines(path)


async def test_start_reload_trap_rebuild_refused_reload_stop(tmp_path, upstream):
    probe = trapper()
    (tmp_path / "probe.wasm").write_bytes(probe)
    tagger_sha = sha(HEADERS.read_bytes())
    audit = tmp_path / "audit.jsonl"
    probe_rec = {"filter": "probe", "source": str(tmp_path / "probe.wasm"), "sha256": sha(probe),
                 "capabilities": ["log"], "readable_properties": "all"}
    tagger_rec = {"filter": "tagger", "source": str(HEADERS), "sha256": tagger_sha, "capabilities": "all",
                  "readable_properties": "all",
                  "config_digest": sha(b'{"request":{"set":{"x-tagged":"on-the-way"}}}')}
    async with run_gateway(config(upstream.port, '"a"', tagger_sha), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            # Reload from the admin API with probe's configuration changed: probe reloads,
            # tagger is kept (no line).
            gw.config_path.write_text(config(upstream.port, '"b"', tagger_sha))
            async with s.post(gw.admin_url + "/reload") as r:
                assert r.status == 200, await r.text()
            # A trap: the request fails closed, the instance is rebuilt off the request path.
            async with s.get(gw.url("/x"), headers={"x-trap": "1"}) as r:
                assert r.status == 503
            await wait_for_lines(audit, 4)
            # A reload whose tagger pin does not match its file is refused; both keep serving.
            gw.config_path.write_text(config(upstream.port, '"c"', "0" * 64))
            async with s.post(gw.admin_url + "/reload") as r:
                assert r.status == 422
            async with s.get(gw.url("/x")) as r:
                assert r.status == 200
            async with s.get(gw.admin_url + "/filters") as r:
                view = await r.json()
        admin_client = next(d["admin_client"] for d in lines(audit) if d["event"] == "reload")
        assert admin_client.startswith("127.0.0.1:")
    got = lines(audit)
    assert got == [
        {"event": "load", **probe_rec, "config_digest": sha(b"a"), "outcome": "ok", "trigger": "start", "generation": 1},
        {"event": "load", **tagger_rec, "outcome": "ok", "trigger": "start", "generation": 1},
        {"event": "reload", **probe_rec, "config_digest": sha(b"b"), "outcome": "ok", "trigger": "admin",
         "admin_client": admin_client, "generation": 2},
        {"event": "rebuild", **probe_rec, "config_digest": sha(b"b"), "outcome": "ok", "trigger": "failure",
         "generation": 2},
        {"event": "refuse", **tagger_rec, "sha256": "0" * 64, "outcome": "failed",
         "error": f"{HEADERS} has sha256 {tagger_sha}, the config pins {'0' * 64}",
         "trigger": "admin", "admin_client": admin_client, "generation": 2},
        {"event": "unload", **probe_rec, "config_digest": sha(b"b"), "outcome": "ok", "trigger": "stop", "generation": 2},
        {"event": "unload", **tagger_rec, "outcome": "ok", "trigger": "stop", "generation": 2},
    ]
    # GET /filters: the running filters with the same fields, plus this worker's counters.
    assert view["generation"] == 2
    probe_view, tagger_view = view["filters"]
    assert {k: probe_view[k] for k in probe_rec} == probe_rec
    assert probe_view["config_digest"] == sha(b"b")
    assert probe_view["up"] is True and probe_view["failures"] == 1 and probe_view["rebuilds"] == 1
    assert probe_view["calls"] >= 4 and probe_view["guest_us"] >= 0
    assert {k: tagger_view[k] for k in tagger_rec} == tagger_rec
    assert tagger_view["failures"] == 0 and tagger_view["calls"] >= 4


async def test_refused_start_is_audited(tmp_path, upstream):
    (tmp_path / "probe.wasm").write_bytes(b"\0asm\1\0\0\0")      # a module without the ABI marker
    text = config(upstream.port, '"a"', sha(HEADERS.read_bytes()))
    from abi.api import FilterLoadError
    try:
        async with run_gateway(text, tmp_path):
            raise AssertionError("started")
    except FilterLoadError:
        pass
    (got,) = lines(tmp_path / "audit.jsonl")
    assert got["event"] == "refuse" and got["filter"] == "probe" and got["outcome"] == "failed"
    assert got["trigger"] == "start" and "missing or unknown Proxy-Wasm ABI version" in got["error"]
