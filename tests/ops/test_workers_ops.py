"""`wasmgate run --workers 2` as operators use it: reloads reach every worker without failing a
request, gateway-wide state (CAS counter, rate limit, /metrics) is one, a killed worker comes back.

Exact admission of the rate limiter across workers without reloads: tests/filters/test_ratelimit_workers.py;
filter metrics and shared data across workers: tests/conformance/test_workers.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import msgpack

from gateway.counter_page import read_page
from gateway.metrics import Counts
from tests.helpers import echo_upstream

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "filters" / "dist"

# Increments shared-data key "hits" (u64 LE) once per request with a CAS loop; seeds it at configure.
CAS_COUNTER_WAT = r'''
(module
  (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "hits")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (i32.and (i32.add (local.get $n) (i32.const 7)) (i32.const -8))))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func $read (result i32)                      ;; status; value ptr at 64, size at 68, cas at 72
    (global.set $heap (i32.const 4096))
    (i32.store (i32.const 64) (i32.const 0)) (i32.store (i32.const 68) (i32.const 0))
    (i32.store (i32.const 72) (i32.const 0))
    (call $get (i32.const 16) (i32.const 4) (i32.const 64) (i32.const 68) (i32.const 72)))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (i32.eq (call $read) (i32.const 1))     ;; NOT_FOUND: seed 0 (a restart or reload keeps it)
      (then (i64.store (i32.const 80) (i64.const 0))
            (drop (call $set (i32.const 16) (i32.const 4) (i32.const 80) (i32.const 8) (i32.const 0)))))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $v i64)
    (loop $retry
      (local.set $v (i64.const 0))
      (if (i32.and (i32.eqz (call $read)) (i32.eq (i32.load (i32.const 68)) (i32.const 8)))
        (then (local.set $v (i64.load (i32.load (i32.const 64))))))
      (i64.store (i32.const 80) (i64.add (local.get $v) (i64.const 1)))
      (br_if $retry (i32.eq (i32.const 8)          ;; CAS_MISMATCH: another worker won, read again
        (call $set (i32.const 16) (i32.const 4) (i32.const 80) (i32.const 8) (i32.load (i32.const 72))))))
    (i32.const 0)))
'''


def config(up_port: int, tag: str, *, cas_wasm: Path | None = None, burst: int = 1000) -> str:
    filters = [
        {"name": "hdr", "wasm": str(DIST / "headers.wasm"), "config": {"response": {"set": {"x-tag": tag}}}},
        {"name": "rl", "wasm": str(DIST / "ratelimit.wasm"),
         "config": {"limits": [{"name": "g", "key": "global", "rate": 1, "period_s": 3600, "burst": burst}]}},
    ]
    routes = [{"name": "rl", "match": {"prefix": "/rl"}, "cluster": "backend", "filters": ["rl"]},
              {"name": "all", "match": {"prefix": "/"}, "cluster": "backend", "filters": ["hdr"]}]
    if cas_wasm is not None:
        filters.append({"name": "cas", "wasm": str(cas_wasm)})
        routes[1]["filters"] = ["cas", "hdr"]
    return json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "limits": {"drain_timeout_s": 5},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": routes, "filters": filters}, indent=1)


@dataclass
class Workers:
    proc: asyncio.subprocess.Process
    base: str = ""
    admin: str = ""
    pids: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    async def wait_line(self, pattern: str, timeout: float = 15.0) -> re.Match:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {self.lines}")


@asynccontextmanager
async def two_workers(cfg: Path, workers: int = 2) -> AsyncIterator[Workers]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg), "--workers", str(workers), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=open(os.environ.get("WG_STDERR", os.devnull), "w"))
    w = Workers(proc)

    async def pump() -> None:
        while line := await proc.stdout.readline():
            w.lines.append(line.decode())
    reader = asyncio.ensure_future(pump())
    try:
        w.base = (await w.wait_line(r"listener main on (http://\S+)", 30)).group(1)
        w.admin = (await w.wait_line(r"admin on (http://\S+)")).group(1)
        if workers == 2:
            w.pids = [int(p) for p in (await w.wait_line(r"2 workers: (\d+) (\d+)")).groups()]
        yield w
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        reader.cancel()


def fresh() -> aiohttp.ClientSession:
    # One connection per request, so SO_REUSEPORT spreads requests over both workers.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))


async def tags(url: str, n: int = 12) -> list[tuple[int, str | None]]:
    async with fresh() as s:
        async def one():
            async with s.get(url) as r:
                await r.read()
                return r.status, r.headers.get("x-tag")
        return await asyncio.gather(*[one() for _ in range(n)])


async def post_reload(admin: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(admin + "/reload") as r:
        return r.status, await r.text()


async def metrics(admin: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as r:
        return await r.text()


def value(text: str, line_start: str) -> float:
    m = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def until_metric(admin: str, line_start: str, want: float, timeout: float = 5.0,
                       also: dict[str, float] | None = None) -> str:
    """Other workers publish their counts every second: poll until the sums are there.

    ``also``: more {line_start: value} pairs to wait for."""
    wanted = {line_start: want, **(also or {})}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = await metrics(admin)
        if all(value(text, k) == v for k, v in wanted.items()) or loop.time() >= deadline:
            return text
        await asyncio.sleep(0.2)


async def test_reloads_under_load_fail_no_request(tmp_path):
    async with echo_upstream() as up:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(config(up.port, "v0"))
        async with two_workers(cfg) as w:
            url = w.base + "/load"
            stop = asyncio.Event()
            statuses: list[int] = []
            failures: list[str] = []

            async def client(k: int) -> None:
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=k % 2 == 0, limit=0)) as s:
                    while not stop.is_set():
                        try:
                            async with s.get(url) as r:
                                await r.read()
                                statuses.append(r.status)
                        except aiohttp.ClientError as e:
                            failures.append(repr(e))

            load = [asyncio.ensure_future(client(k)) for k in range(6)]
            current = "v0"
            broken = [
                ("listeners: [\n  - {name: main\n", "invalid YAML"),
                (config(up.port, "x").replace('"response"', '"respons"'), "proxy_on_configure: returned false"),
                (config(up.port, "x").replace("headers.wasm", "missing.wasm"), "missing.wasm"),
            ]
            try:
                for i in range(1, 9):
                    if i % 2 == 0:
                        text, reason = broken[(i // 2 - 1) % len(broken)]
                        cfg.write_text(text)
                        status, body = await post_reload(w.admin)
                        assert status == 422 and reason in body, body
                        assert await tags(url) == [(200, current)] * 12     # the old config, everywhere
                        continue
                    current = f"v{i}"
                    cfg.write_text(config(up.port, current))
                    if i % 4 == 1:
                        status, body = await post_reload(w.admin)
                        assert status == 200 and "workers: all 2 on config" in body, body
                    else:
                        os.kill(w.proc.pid, signal.SIGHUP)       # the supervisor forwards it
                        for _ in range(100):
                            if set(await tags(url, 6)) == {(200, current)}:
                                break
                            await asyncio.sleep(0.05)
                    assert await tags(url) == [(200, current)] * 12        # the new config, everywhere
            finally:
                stop.set()
                await asyncio.gather(*load)
            assert failures == [], failures[:5]
            assert len(statuses) > 100 and set(statuses) == {200}, (len(statuses), set(statuses))
            text = await until_metric(w.admin, 'wasmgate_reloads_total{result="failed"}', 4)
            assert value(text, 'wasmgate_reloads_total{result="failed"}') == 4   # one worker each
            assert re.search(r'^wasmgate_config_workers\{fingerprint="\w+"\} 2$', text, re.M), text


async def test_cas_counter_rate_limit_and_metrics_are_gateway_wide(tmp_path):
    from abi.api import open_shared_store
    wat = tmp_path / "cas.wat"
    wat.write_text(CAS_COUNTER_WAT)
    n, burst = 60, 10
    async with echo_upstream() as up:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(config(up.port, "a", cas_wasm=wat, burst=burst))
        async with two_workers(cfg) as w:
            assert await tags(w.base + "/c", n) == [(200, "a")] * n
            async with fresh() as s:
                async def rl():
                    async with s.get(w.base + "/rl") as r:
                        return r.status
                # The bucket is created by one request first: concurrent *creation* of a key is racy
                # in proxy-wasm (a get that finds nothing has no cas; set with cas 0 is unconditional).
                first = [await rl()] + list(await asyncio.gather(*[rl() for _ in range(5)]))
                cfg.write_text(config(up.port, "b", cas_wasm=wat, burst=burst))   # hdr changes only
                status, body = await post_reload(w.admin)
                assert status == 200 and "filters kept: cas, rl" in body, body
                second = await asyncio.gather(*[rl() for _ in range(20)])
            # The bucket survived the reload on both workers: exactly the burst was admitted.
            assert (first + second).count(200) == burst, (first, second)
            assert (first + second).count(429) == 26 - burst
            assert await tags(w.base + "/c", 4) == [(200, "b")] * 4

            store = open_shared_store(f"wasmgate-{w.proc.pid}")
            try:
                raw, _cas = store.get(b"hits")
            finally:
                store.close()
            assert struct.unpack("<Q", raw)[0] == n + 4          # one CAS increment per request
            text = await until_metric(w.admin, 'wasmgate_requests_total{route="all",status="200"}', n + 4,
                                      also={'wasmgate_requests_total{route="rl",status="429"}': 26 - burst,
                                            'wasmgate_requests_total{route="rl",status="200"}': burst})
            assert value(text, 'wasmgate_requests_total{route="all",status="200"}') == n + 4
            assert value(text, 'wasmgate_requests_total{route="rl",status="429"}') == 26 - burst
            assert value(text, 'wasmgate_upstream_latency_seconds_count{cluster="backend"}') == n + 4 + burst
            ops = open_shared_store(f"wasmgate-{w.proc.pid}-ops")
            try:
                pages = [Counts.from_page(read_page(Path(ops.path) / f"counters-{i}")) for i in range(2)]
            finally:
                ops.close()
            served = [sum(c for (r, _s), c in page.requests.items() if r == "all") for page in pages]
            assert sum(served) == n + 4 and min(served) > 0, served     # both workers served: a real sum


async def test_killed_worker_is_restarted_on_the_applied_config(tmp_path):
    async with echo_upstream() as up:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(config(up.port, "a"))
        async with two_workers(cfg) as w:
            cfg.write_text(config(up.port, "b"))
            status, body = await post_reload(w.admin)
            assert status == 200, body
            assert await tags(w.base + "/", 10) == [(200, "b")] * 10
            before = value(await until_metric(w.admin, 'wasmgate_requests_total{route="all",status="200"}', 10),
                           'wasmgate_requests_total{route="all",status="200"}')
            assert before == 10
            await asyncio.sleep(1.2)         # both workers have published their counts
            cfg.write_text("listeners: [\n")  # broken on disk, never reloaded
            os.kill(w.pids[0], signal.SIGKILL)
            # Once the supervisor has reaped it, its listening socket is gone: the sibling serves all.
            m = await w.wait_line(rf"worker {w.pids[0]} exited with -9; restarted as (\d+)")
            new_pid = int(m.group(1))
            assert await tags(w.base + "/", 10) == [(200, "b")] * 10
            for _ in range(300):             # until the new worker is up (it publishes once it listens)
                if _published_pids(w.proc.pid) >= {new_pid, w.pids[1]}:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the restarted worker never came up")
            assert await tags(w.base + "/", 20) == [(200, "b")] * 20        # on the applied config
            text = await until_metric(w.admin, 'wasmgate_requests_total{route="all",status="200"}', 40)
            assert value(text, "wasmgate_worker_restarts_total") == 1
            # Monotonic: the dead worker's published counts were inherited, none counted twice.
            assert value(text, 'wasmgate_requests_total{route="all",status="200"}') == 40
            # The new worker reports the same config as its sibling, though the file is broken.
            assert re.search(r'^wasmgate_config_workers\{fingerprint="\w+"\} 2$', text, re.M), text


def _published_pids(supervisor: int) -> set[int]:
    from abi.api import open_shared_store
    ops = open_shared_store(f"wasmgate-{supervisor}-ops")
    try:
        return {msgpack.unpackb(got[0])["pid"] for got in (ops.get(b"w/%d" % i) for i in range(2)) if got}
    finally:
        ops.close()

