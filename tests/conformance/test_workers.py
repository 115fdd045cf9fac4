"""Two worker processes (wasmgate run --workers 2): each has its own instance of the filter,
but host-side state — shared data (§5.4: key space per VM id, process-wide in Envoy) and the
filter's metrics on /metrics (Envoy aggregates worker stats) — is one."""
from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import aiohttp
from tests.conformance.probe import filter_entry, gateway_yaml, one, parse_report, samples, strict_module

ROOT = Path(__file__).resolve().parents[2]


async def _start(cfg: Path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg), "--workers", "2", cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    urls = {}
    try:
        while len(urls) < 2:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not line:
                break
            m = re.search(r"(listener main|admin) on (http://\S+)", line)
            if m:
                urls[m.group(1)] = m.group(2)
    except asyncio.TimeoutError:
        pass
    return proc, urls


async def _stop(proc):
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def test_two_workers_share_data_and_metrics(tmp_path, upstream):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_yaml(upstream.port, [filter_entry("probe", strict_module(tmp_path), config="w1")],
                                [{"name": "all", "cluster": "backend", "filters": ["probe"]}]))
    proc, urls = await _start(cfg)
    try:
        assert "listener main" in urls and "admin" in urls, urls
        base, admin = urls["listener main"], urls["admin"]
        key = f"workers-{tmp_path.name}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/set", headers={"x-act": "shared", "x-key": key}) as r:
                assert r.status == 200
            seen = []
            for i in range(20):
                # new connection each time so that SO_REUSEPORT spreads them over the workers
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s1:
                    async with s1.get(base + f"/get/{i}", headers={"x-act": "shared-get", "x-key": key}) as r:
                        assert r.status == 200
                        rep = parse_report(r.headers.get("x-probe-w1"))
                        seen.append((one(rep, "sg"), rep.get("sgv")))
            async with s.get(admin + "/metrics") as r:
                text = await r.text()
    finally:
        await _stop(proc)
    assert all(st == "0" and v == ["v2"] for st, v in seen), seen
    counters = [v for n, _, v in samples(text) if "probe_requests_w1" in n]
    # 21 requests went through the filter (plus none other): one aggregated counter
    assert counters == [21.0], [l for l in text.splitlines() if "probe_requests" in l]
