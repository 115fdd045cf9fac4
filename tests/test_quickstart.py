"""The README's quick start, against the committed config.yaml: every request it shows answers
as the README says (ports moved to free ones, the cluster pointed at a test echo upstream)."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.helpers import echo_upstream, run_gateway

ROOT = Path(__file__).resolve().parent.parent


def localized(up_port: int, tmp_path: Path) -> str:
    """config.yaml on free ports against the test upstream; the TLS listener's .demo-tls/ files
    written next to where run_gateway puts the config, as `./dev demo` does."""
    from gateway.demo import write_demo_certificates
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    assert write_demo_certificates(tmp_path / "config.yaml")
    doc = yaml.safe_load((ROOT / "config.yaml").read_text())
    for lst in doc["listeners"]:
        lst["port"] = 0
    doc["admin"]["port"] = 0
    doc["access_log"] = {"path": None}
    doc["clusters"][0]["endpoints"] = [f"127.0.0.1:{up_port}"]
    for f in doc["filters"]:
        f["wasm"] = str((ROOT / f["wasm"]).resolve())
    return json.dumps(doc)


async def test_readme_quick_start_requests(tmp_path):
    alice = {"x-api-key": "demo-key-alice"}
    async with echo_upstream() as up:
        async with run_gateway(localized(up.port, tmp_path), tmp_path) as gw, aiohttp.ClientSession() as s:
            async with s.get(gw.url("/hello")) as r:                      # public route, no filters
                assert r.status == 200 and "ratelimit-limit" not in r.headers
            async with s.get(gw.url("/api/hello")) as r:                  # 401 from auth
                assert r.status == 401 and r.headers.getall("www-authenticate")
            async with s.get(gw.url("/api/hello"), headers=alice) as r:   # identity upstream
                assert r.status == 200
            assert dict(up.requests[-1].headers).get("x-auth-identity") == "alice"
            async with s.post(gw.url("/payments/charge"), data=b'{"amount": 20000}', headers=alice) as r:
                assert r.status == 403                                    # risk rejects
            async with s.get(gw.admin_url + "/metrics") as r:
                text = await r.text()
            assert r.status == 200
            assert 'wasmgate_requests_total{route="api",status="401"} 1' in text
            assert 'wasmgate_requests_total{route="payments",status="403"} 1' in text
            # curl -k -H 'x-api-key: demo-key-alice' https://127.0.0.1:8443/api/hello
            tls_url = f"https://127.0.0.1:{gw.port('main_tls')}/api/hello"
            async with s.get(tls_url, headers=alice, ssl=False) as r:      # ssl=False: curl -k
                assert r.status == 200 and (await r.json())["path"] == "/api/hello"
            assert dict(up.requests[-1].headers).get("x-auth-identity") == "alice"
            assert up.requests[-1].header("x-forwarded-proto") == "https"


async def test_readme_quick_start_over_http2(tmp_path):
    """The README's HTTP/2 lines, with curl as shown: h2c with prior knowledge on the plain
    listener and `curl -k --http2` (ALPN h2) on the TLS one; the filters answer per stream."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")

    async def run(*args: str) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(curl, "-s", "-i", *args, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        head, _, body = out.decode().partition("\r\n\r\n")
        return head, body

    async with echo_upstream() as up:
        async with run_gateway(localized(up.port, tmp_path), tmp_path) as gw:
            head, _ = await run("--http2-prior-knowledge", "-H", "x-api-key: demo-key-alice",
                                gw.url("/api/hello"))
            assert head.startswith("HTTP/2 200") and "ratelimit-limit" in head
            head, body = await run("-k", "--http2", f"https://127.0.0.1:{gw.port('main_tls')}/api/hello",
                                   "-H", "x-api-key: demo-key-alice")
            assert head.startswith("HTTP/2 200") and json.loads(body)["path"] == "/api/hello"
            head, _ = await run("-k", "--http2", f"https://127.0.0.1:{gw.port('main_tls')}/api/hello")
            assert head.startswith("HTTP/2 401")
    assert up.requests[-1].header("x-auth-identity") == "alice"
    assert up.requests[-1].header("x-forwarded-proto") == "https"
