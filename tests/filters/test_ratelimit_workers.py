"""ratelimit across worker processes: `wasmgate run --workers 2` shares each listener port
(SO_REUSEPORT); the token bucket lives in gateway-wide shared data, so the number of admitted
requests must still equal the burst exactly, whichever worker serves each connection."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.filters.conftest import ROOT, gateway_yaml
from tests.helpers import echo_upstream

BURST = 10
REQUESTS = 40


async def _wait_for_listener(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buf = ""
    while loop.time() < deadline:
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), deadline - loop.time())
        if not line:
            break
        buf += line
        m = re.search(r"listener main on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"gateway did not announce its listener: {buf!r}")


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:   # LISTEN on our port
                inodes.add(f[9])
    return inodes


def _workers_listening(supervisor: int, port: int) -> int:
    """How many child processes of `supervisor` hold a listening socket on `port`."""
    inodes = _listening_inodes(port)
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != supervisor:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes
                   for fd in fds):
                count += 1
        except OSError:
            continue
    return count


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs /proc to see both workers listen")
async def test_exact_admission_across_two_workers(tmp_path):
    async with echo_upstream() as up:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(gateway_yaml(up.port, [
            {"name": "rl", "wasm": "ratelimit", "config": {
                "limits": [{"name": "g", "key": "global", "rate": 1, "period_s": 3600, "burst": BURST}]}}],
            [{"name": "all", "cluster": "backend", "filters": ["rl"]}]))
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg), "--workers", "2"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            port = await _wait_for_listener(proc)
            for _ in range(200):         # until both workers have loaded the filter and listen
                if _workers_listening(proc.pid, port) == 2:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the two workers did not both start listening")

            async def one(session):
                async with session.get(f"http://127.0.0.1:{port}/x") as r:
                    await r.read()
                    return r.status

            # a fresh connection per request, so SO_REUSEPORT spreads them over both workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as s:
                statuses = await asyncio.gather(*[one(s) for _ in range(REQUESTS)])
            assert statuses.count(200) == BURST, statuses
            assert statuses.count(429) == REQUESTS - BURST, statuses
            assert len(up.requests) == BURST
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
