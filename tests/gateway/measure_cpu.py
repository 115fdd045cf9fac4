"""Measure gateway CPU µs per proxied request vs a minimal aiohttp proxy (not a test).

    python tests/gateway/measure_cpu.py [--seconds 3] [--connections 10]

Each proxy runs in its own process in front of the same tiny upstream; wrk (one thread,
keep-alive) drives it for a bounded time; CPU is the proxy process's utime+stime from /proc.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

UPSTREAM = r'''
import asyncio, sys
RESP = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nhello, world\n"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESP * n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await srv.serve_forever()
import uvloop; uvloop.run(main())
'''

AIOHTTP_PROXY = r'''
import sys, aiohttp, uvloop
from aiohttp import web
UP = f"http://127.0.0.1:{sys.argv[2]}"
async def handler(request):
    body = await request.read()
    async with request.app["s"].request(request.method, UP + request.path_qs, data=body or None,
                                       headers={"host": request.host}) as r:
        data = await r.read()
        return web.Response(status=r.status, body=data, headers={"content-type": r.headers.get("content-type", "")})
async def mk():
    app = web.Application()
    async def ctx(app):
        app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)
        yield
        await app["s"].close()
    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
uvloop.install()
web.run_app(mk(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def load(pid: int, port: int, seconds: float, connections: int) -> tuple[int, float, float, float]:
    """(requests, user µs/request, system µs/request, requests/s) for process pid."""
    url = f"http://127.0.0.1:{port}/bench"
    subprocess.run(["wrk", "-t1", "-c4", "-d1s", url], capture_output=True, check=True)   # warm-up
    c0 = cpu_seconds(pid)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", url],
                         capture_output=True, text=True, check=True).stdout
    c1 = cpu_seconds(pid)
    n = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed responses:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return n, (c1[0] - c0[0]) / n * 1e6, (c1[1] - c0[1]) / n * 1e6, rps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--access-log", action="store_true", help="gateway writes its access log to a file")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed", file=sys.stderr)
        return 1
    up_port, gw_port, ah_port = free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "bench.yaml"
    cfg.write_text(textwrap.dedent(f"""
        listeners: [{{name: main, address: 127.0.0.1, port: {gw_port}}}]
        access_log: {{path: {str(tmp / "access.log") if args.access_log else "null"}}}
        clusters: [{{name: backend, endpoints: ["127.0.0.1:{up_port}"]}}]
        routes: [{{name: all, cluster: backend}}]
    """))
    procs = [subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port)])]
    try:
        wait_port(up_port)
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ah = subprocess.Popen([sys.executable, "-c", AIOHTTP_PROXY, str(ah_port), str(up_port)])
        procs += [gw, ah]
        wait_port(gw_port)
        wait_port(ah_port)
        for name, proc, port in (("wasmgate", gw, gw_port), ("aiohttp proxy", ah, ah_port)):
            n, user, system, rps = load(proc.pid, port, args.seconds, args.connections)
            print(f"{name:14s} {n:7d} requests  {user + system:6.1f} µs CPU/request "
                  f"(user {user:5.1f}, system {system:5.1f})  {rps:8.0f} req/s")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
