"""Lifecycle and observability: drain on stop, admin endpoints, access log, CLI, workers."""
import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.gateway.conftest import basic_yaml
from tests.helpers import echo_upstream, run_cli_gateway, run_gateway

ROOT = Path(__file__).resolve().parents[2]


async def slow_upstream(delay: float):
    async def handler(request):
        await asyncio.sleep(delay)
        return web.Response(text="slow done")
    return echo_upstream(handler)


async def test_stop_drains_in_flight_and_refuses_new(tmp_path):
    async with await slow_upstream(0.3) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path, drain_timeout_s=5) as gw:
            port = gw.port()
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.admin_url + "/ready") as r:
                    assert r.status == 200 and await r.text() == "ready\n"
                # An idle keep-alive connection must not hold the drain up.
                idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
                inflight = asyncio.ensure_future(s.get(gw.url("/slow")))
                await asyncio.sleep(0.1)
                t0 = asyncio.get_running_loop().time()
                stopping = asyncio.ensure_future(gw.gateway.stop(drain_timeout_s=5))
                await asyncio.sleep(0.05)
                async with s.get(gw.admin_url + "/ready") as r:        # load balancers see it go
                    assert r.status == 503 and await r.text() == "draining\n"
                await stopping
                took = asyncio.get_running_loop().time() - t0
                r = await inflight
                assert r.status == 200 and await r.text() == "slow done"
                assert r.headers.get("Connection") == "close"
                assert took < 2
                assert await asyncio.wait_for(idle_reader.read(), 2) == b""     # closed by the drain
                idle_writer.close()
            try:
                await asyncio.open_connection("127.0.0.1", port)
                refused = False
            except OSError:
                refused = True
            assert refused


async def test_drain_timeout_cuts_off_stuck_requests(tmp_path):
    async with await slow_upstream(5) as up:
        async with run_gateway(basic_yaml(up.port), tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                inflight = asyncio.ensure_future(s.get(gw.url("/stuck")))
                await asyncio.sleep(0.1)
                t0 = asyncio.get_running_loop().time()
                await gw.gateway.stop(drain_timeout_s=0.3)
                assert asyncio.get_running_loop().time() - t0 < 1.5
                try:
                    await inflight
                    failed = False
                except aiohttp.ClientError:
                    failed = True
                assert failed


async def test_admin_endpoints(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(gw.url("/m")) as r:
                    assert r.status == 200
            async with s.get(gw.admin_url + "/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
            async with s.get(gw.admin_url + "/config") as r:
                cfg = await r.json()
            async with s.post(gw.admin_url + "/reload") as r:   # unchanged file: nothing to do
                assert r.status == 200 and (await r.text()).startswith("ok"), await r.text()
            async with s.get(gw.admin_url + "/nope") as r:
                assert r.status == 404
    assert 'wasmgate_requests_total{route="all",status="200"} ' in text
    assert re.search(r'wasmgate_upstream_latency_seconds_count\{cluster="backend"\} [34]\n', text)
    assert 'wasmgate_upstream_latency_seconds_bucket{cluster="backend",le="+Inf"}' in text
    assert "# TYPE wasmgate_active_connections gauge" in text
    assert re.search(r"wasmgate_active_connections [1-9]", text)
    assert "# TYPE wasmgate_errors_total counter" in text
    assert cfg["listeners"] == [{"name": "main", "address": "127.0.0.1", "port": gw.port()}]
    assert cfg["clusters"][0]["request_timeout_ms"] == 15000        # defaults filled in
    assert cfg["routes"][0]["name"] == "all"


async def test_access_log_line_per_request(upstream, tmp_path):
    log = tmp_path / "access.log"
    text = basic_yaml(upstream.port).replace("access_log: {path: null}", "access_log: {path: access.log}")
    async with run_gateway(text, tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url("/logged?x=1"), data=b"12345", headers={"x-request-id": "rid-9"}) as r:
                body = await r.read()
            async with s.get(gw.url("/nothing"), headers={"Host": "unrouted"}) as r:
                pass
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert {k: first[k] for k in ("request_id", "method", "path", "status", "bytes_in", "bytes_out", "route")} == {
        "request_id": "rid-9", "method": "POST", "path": "/logged?x=1", "status": 200, "bytes_in": 5,
        "bytes_out": len(body), "route": "all"}
    assert first["upstream"] == upstream.endpoint and first["client"].startswith("127.0.0.1:")
    assert first["duration_ms"] > 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert lines[1]["status"] == 200 and lines[1]["request_id"]


async def test_port_in_use_is_a_clear_start_error(upstream, tmp_path):
    from gateway.server import StartError
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        taken = gw.port()
        text = basic_yaml(upstream.port).replace("port: 0}]", f"port: {taken}}}]", 1)
        second = tmp_path / "second"
        second.mkdir()
        try:
            async with run_gateway(text, second):
                pass
            raised = None
        except StartError as e:
            raised = str(e)
        assert raised and f'listener "main": cannot bind 127.0.0.1:{taken}' in raised


async def test_cli_sigterm_drains_and_exits_zero(tmp_path):
    async with await slow_upstream(0.5) as up:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(basic_yaml(up.port))
        async with run_cli_gateway(cfg) as gw:
            async with aiohttp.ClientSession() as s:
                inflight = asyncio.ensure_future(s.get(gw.url("/slow")))
                await asyncio.sleep(0.2)
                gw.proc.send_signal(signal.SIGTERM)
                r = await inflight
                assert r.status == 200 and await r.text() == "slow done"
            assert await asyncio.wait_for(gw.proc.wait(), 10) == 0


async def test_cli_workers_share_port_with_so_reuseport(tmp_path):
    async with echo_upstream() as up:
        cfg = tmp_path / "w.yaml"
        cfg.write_text(basic_yaml(up.port).replace("access_log: {path: null}", "access_log: {path: access.log}"))
        async with run_cli_gateway(cfg, "--workers", "2") as gw:
            ok = 0
            deadline = asyncio.get_running_loop().time() + 15
            # Fresh connections hash across both workers' sockets.
            while ok < 40 and asyncio.get_running_loop().time() < deadline:
                try:
                    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                        async with s.get(gw.url(f"/w{ok}")) as r:
                            if r.status == 200:
                                ok += 1
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)     # workers still starting
            assert ok == 40
        assert gw.proc.returncode == 0
    pids = {json.loads(line)["worker"] for line in (tmp_path / "access.log").read_text().splitlines()}
    assert len(pids) == 2, pids


def test_cli_filter_load_failure_names_the_filter(tmp_path):
    (tmp_path / "broken.wasm").write_bytes(b"this is not wasm")
    cfg = tmp_path / "f.yaml"
    cfg.write_text("""
listeners: [{name: main, address: 127.0.0.1, port: 0}]
clusters: [{name: c, endpoints: ["127.0.0.1:1"]}]
routes: [{name: r, cluster: c, filters: [broken]}]
filters: [{name: broken, wasm: broken.wasm}]
""")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert 'filter "broken"' in r.stderr and "not started" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg), "--workers", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert 'filter "broken"' in r.stderr and "during start-up; stopping" in r.stderr
    assert "listener main on" not in r.stdout           # never announced a half-started gateway
    assert "Traceback" not in r.stderr


async def test_idle_keepalive_connections_are_closed(upstream, tmp_path):
    extra = "limits: {keepalive_timeout_s: 0.2}\n"
    async with run_gateway(basic_yaml(upstream.port, extra=extra), tmp_path) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port())
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head
        length = int(re.search(rb"content-length: (\d+)", head).group(1))
        await reader.readexactly(length)
        assert await asyncio.wait_for(reader.read(), 5) == b""     # closed by the keep-alive sweep
        writer.close()


async def test_cli_worker_crash_is_restarted(tmp_path):
    import os
    async with echo_upstream() as up:
        cfg = tmp_path / "w.yaml"
        cfg.write_text(basic_yaml(up.port))
        async with run_cli_gateway(cfg, "--workers", "2") as gw:
            for _ in range(100):
                pids_line = next((line for line in gw.output if "2 workers:" in line), None)
                if pids_line:
                    break
                await asyncio.sleep(0.05)
            victim = int(pids_line.split()[-1])
            os.kill(victim, signal.SIGKILL)
            deadline = asyncio.get_running_loop().time() + 10
            while not any(f"worker {victim} exited" in line for line in gw.output):
                assert asyncio.get_running_loop().time() < deadline, gw.output
                await asyncio.sleep(0.1)
            ok = 0
            while ok < 10 and asyncio.get_running_loop().time() < deadline:
                try:
                    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                        async with s.get(gw.url("/after")) as r:
                            ok += r.status == 200
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            assert ok == 10
        assert gw.proc.returncode == 0


async def test_access_log_lines_are_strict_json_with_escaping(tmp_path):
    from gateway.accesslog import AccessLog
    log = AccessLog(str(tmp_path / "a.log"))
    log.write(request_id='id"\n\u00e9', client="127.0.0.1:1", method="GET", path='/p?"q"=\\', status=400,
              bytes_in=1, bytes_out=2, route="", upstream="", duration_ms=1.23456, error='bad "x"')
    log.close()
    entry = json.loads((tmp_path / "a.log").read_text())
    assert entry["request_id"] == 'id"\n\u00e9' and entry["path"] == '/p?"q"=\\'
    assert entry["duration_ms"] == 1.235 and entry["error"] == 'bad "x"' and entry["status"] == 400


async def test_admin_methods_and_errors(upstream, tmp_path):
    from tests.helpers import raw_exchange
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.admin_url + "/reload") as r:
                assert r.status == 405 and r.headers["Allow"] == "POST"
            async with s.head(gw.admin_url + "/ready") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "6"
            async with s.get(gw.admin_url + "/metrics?x=1") as r:
                assert r.status == 200
        raw = await raw_exchange(gw.gateway.admin_port, b"GET /ready HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                 b"GET /config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert raw.count(b"HTTP/1.1 200 OK") == 2 and raw.endswith(b"}\n")
        raw = await raw_exchange(gw.gateway.admin_port, b"BAD REQUEST LINE\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")
