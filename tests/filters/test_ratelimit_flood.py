"""Issue 16 part 2: a client cannot switch rate limiting off by sending fresh key values.

Over the real gateway (`wasmgate run`): 100,000 distinct `x-user` values against
`shared_data.max_bytes: 1048576` in one process (LocalStore), then a legitimate client's limit
still holds exactly and the store's accounted bytes stay within the budget. With `--workers 2`
(the LMDB store) the same with 25,000 values against 256 KiB — the same ~11x overflow of the
budget at a quarter of the requests, since every request costs the gateway ~0.2 ms of CPU and
the suite must stay fast. The flood runs over keep-alive connections, pipelined.

And when the store is full of entries nothing may drop (another filter's plain shared data),
`on_store_full` decides: `deny` (429, reason store_full) or `allow`, each counted in /metrics.
"""
from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

from tests.filters.conftest import DIST
from tests.ops.test_workers_ops import metrics, two_workers, value

BURST = 5
CONNECTIONS = 8
WINDOW = 64                          # requests in flight per connection (pipelined)


class _FastUpstream(asyncio.Protocol):
    """Keep-alive upstream answering each (body-less) request with an empty 200 at once: one
    answer per request head received, as a bare protocol, so it costs the test next to nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        heads = data.count(b"\r\n\r\n")
        self.tail = data[data.rfind(b"\r\n\r\n") + 4:] if heads else data
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" * heads)


@asynccontextmanager
async def fast_upstream() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(_FastUpstream, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


async def flood(port: int, users: list[str]) -> list[int]:
    """One GET / per entry of `users` (as x-user) over one keep-alive connection, pipelined
    WINDOW deep; the statuses in order. Counts status lines rather than parsing each response
    (the gateway's bodies here are empty or JSON, never containing one), to stay cheap."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: list[int] = []
    buf = b""
    try:
        sent = 0
        while len(statuses) < len(users):
            while sent < len(users) and sent - len(statuses) < WINDOW:
                batch = users[sent:sent + WINDOW // 2]
                writer.write(b"".join(b"GET / HTTP/1.1\r\nhost: t\r\nx-user: %s\r\n\r\n" % u.encode()
                                      for u in batch))
                sent += len(batch)
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionError(f"gateway closed after {len(statuses)} responses")
            buf += chunk
            matches = list(_STATUS_LINE.finditer(buf))
            statuses += [int(m.group(1)) for m in matches]
            if matches:
                buf = buf[matches[-1].end():]
            buf = buf[-12:]               # may hold the start of a status line cut by the read
    finally:
        writer.close()
    return statuses


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return status, body


async def pipelined(port: int, users: list[str], path: str = "/") -> list[tuple[int, bytes]]:
    """GET `path` once per entry of `users` (as x-user) over one keep-alive connection, all
    written at once; (status, body) of each response, in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(b"GET %s HTTP/1.1\r\nhost: t\r\nx-user: %s\r\n\r\n"
                              % (path.encode(), u.encode()) for u in users))
        return [await _read_response(reader) for _ in users]
    finally:
        writer.close()


def _config(up_port: int, filters: list[dict], routes: list[dict], max_bytes: int) -> str:
    return json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "shared_data": {"max_bytes": max_bytes},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": routes, "filters": filters}, indent=1)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


@pytest.mark.parametrize("workers, flood_size, budget", [(1, 100_000, 1 << 20), (2, 25_000, 1 << 18)])
async def test_flood_of_fresh_header_values_cannot_lift_the_limit(tmp_path, workers, flood_size, budget):
    async with fast_upstream() as up_port:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(_config(up_port, [{"name": "rl", "wasm": str(DIST / "ratelimit.wasm"), "config": {
            "limits": [{"name": "u", "key": "header:x-user", "rate": 1, "period_s": 3600, "burst": BURST}]}}],
            [{"name": "all", "cluster": "backend", "filters": ["rl"]}], budget))
        async with two_workers(cfg, workers=workers) as w:
            port = _port(w.base)
            # alice uses up her burst before the flood
            assert [s for s, _ in await pipelined(port, ["alice"] * (BURST + 1))] == [200] * BURST + [429]
            # the flood: one request per fresh value — each gets its own bucket, one token taken
            per = flood_size // CONNECTIONS
            results = await asyncio.wait_for(asyncio.gather(*[
                flood(port, [f"attacker-{c}-{i}" for i in range(per)]) for c in range(CONNECTIONS)]), 240)
            statuses = [s for r in results for s in r]
            assert len(statuses) == flood_size and set(statuses) == {200}
            # afterwards: alice is still limited, and a new client gets exactly her burst
            assert [s for s, _ in await pipelined(port, ["alice"])] == [429]
            assert [s for s, _ in await pipelined(port, ["bob"] * (BURST + 2))] == [200] * BURST + [429] * 2
            text = await metrics(w.admin)
    used = value(text, "wasmgate_shared_data_bytes")
    assert value(text, "wasmgate_shared_data_max_bytes") == budget
    assert 0.9 * budget < used <= budget, used               # full, and never over the budget
    # a bucket costs ~110 bytes (about 9,500 fit in 1 MiB): the store made room for the rest by
    # dropping the buckets closest to full (each 1 token short), never alice's (5 short)
    assert value(text, 'wasmgate_shared_data_evictions_total{reason="room"}') > flood_size - budget / 100
    assert value(text, "wasmcustom_ratelimit_rl_store_full_denied") == 0
    assert value(text, "wasmcustom_ratelimit_rl_store_full_allowed") == 0


# A filter of another author: on each request it stores a plain 16-byte value under the
# x-user header's value — shared data that never expires and that nothing may drop.
FILLER_WAT = r'''(module
  (import "env" "proxy_get_header_map_value" (func $hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-user")
  (data (i32.const 16) "0123456789abcdef")
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 1024))
    (if (i32.eqz (call $hdr (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 64) (i32.const 68)))
      (then (drop (call $set (i32.load (i32.const 64)) (i32.load (i32.const 68))
                             (i32.const 16) (i32.const 16) (i32.const 0)))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))
'''


async def test_on_store_full_deny_and_allow_when_nothing_can_be_dropped(tmp_path: Path):
    filler = tmp_path / "filler.wat"
    filler.write_text(FILLER_WAT)
    limit = {"name": "u", "key": "header:x-user", "rate": 1, "period_s": 3600, "burst": 2}
    filters = [{"name": "filler", "wasm": str(filler)},
               {"name": "rld", "wasm": str(DIST / "ratelimit.wasm"), "config": {"limits": [limit]}},
               {"name": "rla", "wasm": str(DIST / "ratelimit.wasm"),
                "config": {"limits": [{**limit, "on_store_full": "allow"}]}}]
    routes = [{"name": n, "match": {"prefix": f"/{n}"}, "cluster": "backend", "filters": [n]}
              for n in ("filler", "rld", "rla")]
    async with fast_upstream() as up_port:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(_config(up_port, filters, routes, 64 * 1024))
        async with two_workers(cfg, workers=1) as w:
            port = _port(w.base)
            # before the store fills: ordinary buckets
            assert [s for s, _ in await pipelined(port, ["early"] * 3, "/rld")] == [200, 200, 429]
            # fill it with plain entries (each costs less than a bucket, so no bucket fits after)
            await pipelined(port, [f"f{i:05d}" for i in range(1000)], "/filler")
            text = await metrics(w.admin)
            assert value(text, "wasmgate_shared_data_bytes") > 64 * 1024 - 86
            # the only expiring entry ("early") was dropped for room; nothing else can be
            assert value(text, "wasmgate_shared_data_evictable_bytes") == 0
            denied = await pipelined(port, ["new1", "new2"], "/rld")
            assert [s for s, _ in denied] == [429, 429]
            assert json.loads(denied[0][1]) == {"error": "rate_limited", "limit": "u",
                                                "reason": "store_full", "retry_after_s": 1}
            assert [s for s, _ in await pipelined(port, ["new3"] * 3, "/rla")] == [200, 200, 200]
            text = await metrics(w.admin)
    assert value(text, "wasmcustom_ratelimit_rld_store_full_denied") == 2
    assert value(text, "wasmcustom_ratelimit_rla_store_full_allowed") == 3
    assert value(text, "wasmcustom_ratelimit_rld_store_full_allowed") == 0
