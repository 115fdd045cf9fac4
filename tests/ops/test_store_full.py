"""shared_data.max_bytes is honoured by `wasmgate run` in one process too, and a full store is a
clean status for the filter: the gateway keeps serving and the data already stored stays intact."""
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
            first = await _statuses(w.base, "user0", 1)
            for i in range(1, 120):          # one bucket per user until the 2000-byte budget is spent
                assert await _statuses(w.base, f"user{i}", 1) == [200]
            # No room for a new bucket: the filter is told (and, by its design, admits unlimited)...
            assert await _statuses(w.base, "late", 3) == [200, 200, 200]
            # ...while a bucket stored before the store filled up still limits exactly.
            assert first + await _statuses(w.base, "user0", 2) == [200, 200, 429]
