"""Bodies far larger than the memory bound stream through a gateway process with flat memory."""
import hashlib
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.helpers import echo_upstream, run_cli_gateway

TOTAL = 300 * 1024 * 1024
CHUNK = b"0123456789abcdef" * 65536          # 1 MiB
RSS_BOUND = 50 * 1024 * 1024


def rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def big_download(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = TOTAL
    await resp.prepare(request)
    for _ in range(TOTAL // len(CHUNK)):
        await resp.write(CHUNK)
    return resp


def config(tmp_path: Path, up_port: int, down_port: int) -> Path:
    p = tmp_path / "stream.yaml"
    p.write_text(f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
access_log: {{path: null}}
limits: {{max_request_body_bytes: {TOTAL * 2}}}
clusters:
  - {{name: echo, endpoints: ["127.0.0.1:{up_port}"]}}
  - {{name: big, endpoints: ["127.0.0.1:{down_port}"]}}
routes:
  - {{name: download, match: {{prefix: /download}}, cluster: big}}
  - {{name: upload, cluster: echo}}
""")
    return p


async def test_300mb_up_and_down_with_flat_gateway_memory(tmp_path):
    runner = web.ServerRunner(web.Server(big_download))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    down_port = site._server.sockets[0].getsockname()[1]
    try:
        async with echo_upstream(keep_body_bytes=0) as up:
            async with run_cli_gateway(config(tmp_path, up.port, down_port)) as gw:
                pid = gw.proc.pid
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                    async with s.get(gw.url("/warm")) as r:
                        assert r.status == 200
                    base = rss_peak(pid)
                    t0 = time.monotonic()

                    async def produce():
                        for _ in range(TOTAL // len(CHUNK)):
                            yield CHUNK
                    async with s.post(gw.url("/upload"), data=produce()) as r:      # chunked upload
                        echo = await r.json()
                    assert echo["body_length"] == TOTAL
                    digest = hashlib.sha256()
                    for _ in range(TOTAL // len(CHUNK)):
                        digest.update(CHUNK)
                    assert echo["body_sha256"] == digest.hexdigest()

                    received = 0
                    async with s.get(gw.url("/download")) as r:
                        assert r.headers["Content-Length"] == str(TOTAL)
                        async for chunk in r.content.iter_any():
                            received += len(chunk)
                    assert received == TOTAL
                    elapsed = time.monotonic() - t0
                growth = rss_peak(pid) - base
                assert growth < RSS_BOUND, f"gateway peak RSS grew {growth / 2**20:.1f} MiB"
                print(f"600 MiB through in {elapsed:.1f}s, peak RSS growth {growth / 2**20:.1f} MiB")
    finally:
        await runner.cleanup()
