"""`type: redis` clusters of one config generation: what HostServices.redis_call reaches.

The clients (gateway/redis_client.py) are imported only when the config has a Redis cluster.
"""
from __future__ import annotations

import asyncio

from abi.api import CallFailed, MetricSample, RedisOptions

from .config import RedisCluster


class RedisClusters:
    """Every `type: redis` cluster of one config generation, by name."""

    def __init__(self, clusters: tuple[RedisCluster, ...] = ()):
        self.clients = {}
        if clusters:
            from .redis_client import RedisClusterClient
            self.clients = {c.name: RedisClusterClient(c) for c in clusters}

    def has(self, name: str) -> bool:
        return name in self.clients

    def call(self, name: str, query: bytes, options: RedisOptions) -> asyncio.Future:
        """The future of Redis's reply (bytes; CallFailed when none came)."""
        client = self.clients.get(name)
        if client is None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(CallFailed(f'no redis cluster named "{name}"'))
            return fut
        return client.call(query, options)

    def take_over(self, old: "RedisClusters") -> set[str]:
        """A reload: keep the clients (warm connections) of unchanged clusters; a changed one
        starts afresh but continues its call counters. Returns the names kept."""
        kept = set()
        for name, client in self.clients.items():
            prev = old.clients.get(name)
            if prev is None:
                continue
            if prev.cfg == client.cfg:
                self.clients[name] = prev
                kept.add(name)
            else:
                client.counts = prev.counts
        return kept

    def samples(self) -> list[MetricSample]:
        out = []
        for name, c in self.clients.items():
            for result, n in sorted(c.counts.items()):
                out.append(MetricSample("wasmgate_redis_calls_total", "counter", float(n),
                                        {"cluster": name, "result": result},
                                        "Redis calls by result (ok, error_reply, timeout, reset, "
                                        "unavailable, too_large)."))
            for i, ep in enumerate(c.cfg.endpoints):
                out.append(MetricSample("wasmgate_redis_endpoint_ejected", "gauge",
                                        1.0 if c.is_ejected(i) else 0.0,
                                        {"cluster": name, "endpoint": str(ep)},
                                        "1 while a Redis endpoint is skipped after a failed connect."))
        return out

    async def aclose(self, keep: set[str] = frozenset()) -> None:
        for name, client in self.clients.items():
            if name not in keep:
                await client.aclose()
