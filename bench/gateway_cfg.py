"""wasmgate configs for the benchmark, generated per docs/ARCHITECTURE.md's schema.

The filter options follow each filter's Config::parse (filters/<name>/src/lib.rs): the bench sends one API key, and the rate limit is
set far above anything a 2-core box can push, so nothing is ever rejected (checked at warm-up).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from bench.tools import ROOT

DIST = ROOT / "filters" / "dist"
CHAIN = ["auth", "ratelimit", "headers"]

API_KEY_HEADER = "x-api-key"
API_KEY = "bench-key-7f3a9c2e"
AUTH_HEADERS = {API_KEY_HEADER: API_KEY}

# wasm file stem -> config (options per filters/<name>/src/lib.rs, Config::parse)
FILTER_CONFIGS: dict[str, dict] = {
    "auth": {"api_key": {"header": API_KEY_HEADER,
                         "keys": [{"key": API_KEY, "identity": "bench-client"}]}},
    # one token bucket per client address, far above what this box can push
    "ratelimit": {"limits": [{"name": "per_client", "key": "client",
                              "rate": 100_000_000, "burst": 100_000_000}]},
    "headers": {"request": {"set": {"x-request-id": "${request.id}"}},
                "response": {"set": {"x-served-by": "wasmgate"}}},
}
# gateway_chain_redis: the same limit, its buckets in Redis (cluster REDIS_CLUSTER).
REDIS_CLUSTER = "ratelimit_store"
FILTER_CONFIGS["ratelimit_redis"] = {**FILTER_CONFIGS["ratelimit"], "backend": "redis",
                                     "redis_cluster": REDIS_CLUSTER}


# Response headers that prove each filter ran: ratelimit's RateLimit-* and headers' x-served-by
# (auth is proven by the 401 a request without the key gets).
CHAIN_EVIDENCE = ["ratelimit-limit", "x-served-by"]


def missing_wasm(stems=CHAIN) -> list[str]:
    return [str(DIST / f"{s}.wasm") for s in stems if not (DIST / f"{s}.wasm").is_file()]


def _filter_entry(name: str, stem: str) -> dict:
    return {
        "name": name,
        "wasm": str(DIST / f"{stem}.wasm"),
        "config": FILTER_CONFIGS.get(name) or FILTER_CONFIGS[stem],
        "failure_policy": "fail_closed",
    }


def gateway_config(*, port: int, admin_port: int, upstream_port: int,
                   filters: list[tuple[str, str]] | None = None, redis_port: int | None = None,
                   tls: tuple[str, str] | None = None) -> dict:
    """filters: [(entry name, wasm stem)] — all of them on the one route, in that order; an entry
    whose name has its own FILTER_CONFIGS (ratelimit_redis) uses that. ``redis_port``: the
    `type: redis` cluster REDIS_CLUSTER. tls: (cert, key) makes the listener a TLS one (defaults
    otherwise: TLS >= 1.2, ALPN http/1.1)."""
    filters = filters or []
    route: dict = {"name": "bench", "cluster": "upstream"}
    if filters:
        route["filters"] = [n for n, _ in filters]
    routes = [route]
    if redis_port:
        # The same chain with backend: local on /local: gateway_chain_redis pairs the two.
        routes.insert(0, {"name": "local", "match": {"prefix": "/local"}, "cluster": "upstream",
                          "filters": [n for n, _ in CHAIN_FILTERS]})
        filters = filters + [f for f in CHAIN_FILTERS if f not in filters]
    cfg = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": port}],
        "admin": {"address": "127.0.0.1", "port": admin_port},
        "limits": {"drain_timeout_s": 1},
        "access_log": None,     # like the peers: baseline and nginx log nothing either
        "clusters": [{"name": "upstream", "endpoints": [f"127.0.0.1:{upstream_port}"],
                      "max_connections": 256}],
        "routes": routes,
    }
    if redis_port:
        cfg["clusters"].append({"name": REDIS_CLUSTER, "type": "redis",
                                "endpoints": [f"127.0.0.1:{redis_port}"]})
    if filters:
        cfg["filters"] = [_filter_entry(n, s) for n, s in filters]
    if tls:
        cfg["listeners"][0]["tls"] = {"cert": tls[0], "key": tls[1]}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


CHAIN_FILTERS = [(n, n) for n in CHAIN]
CHAIN_REDIS_FILTERS = [(n if n != "ratelimit" else "ratelimit_redis", n) for n in CHAIN]
# Cold start: 5 filter entries over the built modules (two reused), all on the route.
COLD_FILTERS = CHAIN_FILTERS + [("auth_2", "auth"), ("headers_2", "headers")]
