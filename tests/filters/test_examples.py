"""The languages examples (filters/examples/{rust,assemblyscript,c}): the same filter written
with our Rust SDK, Solo.io's AssemblyScript SDK from npm and the C header of our ABI, each built
from source by filters/examples/build.sh and run through the real gateway against a real
upstream. Each must do exactly the same thing, so one test body runs all three."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.filters.conftest import CARGO, ROOT, assert_start_refused, gateway_yaml, header_values
from tests.helpers import echo_upstream, run_gateway

BUILD = ROOT / "filters" / "examples" / "build.sh"
# Which tool each language needs; ./dev test installs all of them.
TOOLS = {"rust": CARGO, "assemblyscript": shutil.which("npm") or "npm", "c": "/usr/bin/clang-14"}
# Solo.io's SDK picks its root context by root_id (registerRootContext(..., "example")).
ROOT_ID = {"assemblyscript": "example"}
CONFIG = """
# one directive per line
add-header x-example-lang {lang}
add-header x-greeting hello there
require-header x-api-key
"""


@pytest.fixture(scope="module", params=sorted(TOOLS))
def example(request) -> tuple[str, Path]:
    lang = request.param
    if not os.access(TOOLS[lang], os.X_OK):
        pytest.skip(f"{TOOLS[lang]} not installed (./dev test installs it)")
    r = subprocess.run(["bash", str(BUILD), lang], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return lang, ROOT / "filters" / "examples" / "dist" / f"{lang}.wasm"


def entry(name: str, lang: str, wasm: Path, config: str) -> dict:
    f = {"name": name, "wasm": str(wasm), "config": config}
    if lang in ROOT_ID:
        f["root_id"] = ROOT_ID[lang]
    return f


async def test_adds_headers_and_rejects_requests_missing_the_required_one(tmp_path, example):
    lang, wasm = example
    # Two entries of one module with different configs: each filter instance keeps its own.
    filters = [entry("ex", lang, wasm, CONFIG.format(lang=lang)),
               entry("ex_open", lang, wasm, "add-header x-open yes")]
    routes = [{"name": "open", "match": {"prefix": "/open"}, "cluster": "backend", "filters": ["ex_open"]},
              {"name": "r", "cluster": "backend", "filters": ["ex"]}]
    async with echo_upstream() as up:
        async with run_gateway(gateway_yaml(up.port, filters, routes), tmp_path) as gw, \
                aiohttp.ClientSession() as s:
            async with s.get(gw.url("/a"), headers={"x-api-key": "k", "x-greeting": "overwritten"}) as r:
                assert r.status == 200
            got = up.requests[-1].headers
            assert header_values(got, "x-example-lang") == [lang]
            assert header_values(got, "x-greeting") == ["hello there"]      # replaced, not appended
            assert header_values(got, "x-open") == []

            n = len(up.requests)
            async with s.get(gw.url("/a")) as r:
                assert r.status == 403
                assert r.headers["content-type"] == "text/plain"
                assert await r.text() == "missing header x-api-key\n"
            assert len(up.requests) == n                                      # never reached upstream

            async with s.post(gw.url("/open/b"), data=b"body") as r:
                assert r.status == 200
            got = up.requests[-1].headers
            assert header_values(got, "x-open") == ["yes"]
            assert header_values(got, "x-example-lang") == []
            assert up.requests[-1].body == b"body"


async def test_bad_config_refuses_to_start_naming_the_line(tmp_path, example, caplog):
    lang, wasm = example
    yaml_text = gateway_yaml(9, [entry("f", lang, wasm, "add-header x-a b\nremove-header x-b")],
                             [{"name": "r", "cluster": "backend", "filters": ["f"]}])
    await assert_start_refused(tmp_path, yaml_text, caplog, "bad configuration, line 2: ")
