"""shared_data.max_bytes is honoured by `wasmgate run` in one process too: a full store drops the
ratelimit's expiring buckets closest to full to make room, the gateway keeps serving, and the
buckets that still carry information stay intact."""
from __future__ import annotations

import json

import aiohttp

from tests.helpers import echo_upstream
from tests.ops.test_workers_ops import DIST, two_workers


async def _statuses(base: str, user: str, n: int) -> list[int]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(base + "/", headers={"x-user": user}) as r:
                await r.read()
                out.append(r.status)
    return out


async def test_full_store_is_a_clean_failure_in_one_process(tmp_path):
    async with echo_upstream() as up:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(json.dumps({
            "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
            "admin": {"address": "127.0.0.1", "port": 0},
            "access_log": {"path": None},
            "shared_data": {"max_bytes": 2000},
            "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up.port}"]}],
            "routes": [{"name": "all", "cluster": "backend", "filters": ["rl"]}],
            "filters": [{"name": "rl", "wasm": str(DIST / "ratelimit.wasm"), "config": {"limits": [
                {"name": "u", "key": "header:x-user", "rate": 1, "period_s": 3600, "burst": 2}]}}]}))
        async with two_workers(cfg, workers=1) as w:
            first = await _statuses(w.base, "user0", 3)            # exhausted: full again in 2 h
            for i in range(1, 120):          # one bucket per user, far more than 2000 bytes hold
                assert await _statuses(w.base, f"user{i}", 1) == [200]
            # The store made room by dropping the buckets closest to full (1 h away), so a new
            # user still gets a bucket and is limited exactly...
            assert await _statuses(w.base, "late", 3) == [200, 200, 429]
            # ...and the exhausted bucket stored before the store filled up still limits.
            assert first + await _statuses(w.base, "user0", 1) == [200, 200, 429, 429]
