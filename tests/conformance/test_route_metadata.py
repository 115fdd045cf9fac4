"""Route / cluster / node metadata and re-routing after a filter edits request headers (issue 12,
items 3 and 4), end to end: real gateway, two recording upstreams, route_policy.wat.

The filter reads metadata at Envoy's property paths, gates on the route's
``policy.require-header``, and copies x-set-authority / x-set-path into :authority / :path;
the gateway must then send the request where its headers now point.
"""
from __future__ import annotations

import aiohttp
import yaml

from tests.conformance import watlib
from tests.conformance.probe import recording_upstream
from tests.helpers import run_gateway


def _config(wasm, stable_port: int, canary_port: int) -> str:
    def route(name, match, cluster, **md):
        return {"name": name, "match": match, "cluster": cluster, "filters": ["policy"],
                "metadata": {"policy": md}}
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "node": {"id": "gw-test", "cluster": "edge", "metadata": {"region": "eu-west"}},
        "clusters": [
            {"name": "stable", "endpoints": [f"127.0.0.1:{stable_port}"], "metadata": {"lb": {"zone": "a"}}},
            {"name": "canary", "endpoints": [f"127.0.0.1:{canary_port}"], "metadata": {"lb": {"zone": "b"}}},
        ],
        "routes": [
            route("canary-host", {"host": "canary.example"}, "canary", tag="canary"),
            {**route("v2", {"prefix": "/v2/"}, "canary", tag="v2"), "rewrite": {"prefix": "/api/v2/"}},
            route("gated", {"prefix": "/gated"}, "stable", tag="gated", **{"require-header": "x-tenant"}),
            route("public", {"prefix": "/public"}, "stable", tag="public"),
            route("admin", {"prefix": "/admin"}, "canary", tag="admin"),
            route("v1", {"prefix": "/v1/"}, "stable", tag="v1"),
        ],
        "filters": [{"name": "policy", "wasm": str(wasm)}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


class _Env:
    def __init__(self, gw, session, stable, canary):
        self.gw, self.session, self.stable, self.canary = gw, session, stable, canary

    async def get(self, path: str, **headers: str):
        async with self.session.get(self.gw.url(path), headers=headers) as r:
            return r.status, r.headers, await r.read()


async def _run(tmp_path, body):
    wasm = watlib.build("route_policy.wat", tmp_path)
    async with recording_upstream() as stable, recording_upstream() as canary:
        async with run_gateway(_config(wasm, stable.port, canary.port), tmp_path) as gw:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                await body(_Env(gw, session, stable, canary))


async def test_filter_reads_route_cluster_and_node_metadata(tmp_path):
    async def body(env):
        status, headers, _ = await env.get("/v1/items")
        assert status == 200
        seen = env.stable.requests[-1]
        assert (seen.first("x-md-tag"), seen.first("x-md-zone")) == ("v1", "a")
        assert (seen.first("x-node-id"), seen.first("x-node-region")) == ("gw-test", "eu-west")
        assert (headers["x-resp-route"], headers["x-resp-tag"]) == ("v1", "v1")
        assert env.canary.requests == []
    await _run(tmp_path, body)


async def test_filter_gates_on_route_metadata(tmp_path):
    async def body(env):
        status, headers, data = await env.get("/gated/report")
        assert (status, data) == (403, b"policy: header required")
        assert env.stable.requests == []                       # refused before the upstream
        status, _, _ = await env.get("/gated/report", **{"x-tenant": "acme"})
        assert status == 200
        assert [r.path for r in env.stable.requests] == ["/gated/report"]
        # Routes without the key are not gated.
        status, _, _ = await env.get("/public/page")
        assert status == 200
    await _run(tmp_path, body)


async def test_rewritten_authority_goes_to_the_canary_cluster(tmp_path):
    async def body(env):
        status, headers, _ = await env.get("/v1/items?x=1", **{"x-set-authority": "canary.example"})
        assert status == 200
        assert env.stable.requests == []
        seen = env.canary.requests[-1]
        assert seen.path == "/v1/items?x=1"
        assert seen.first("host") == "canary.example"
        # The new route's metadata from then on (the request phase read the old one).
        assert seen.first("x-md-tag") == "v1"
        assert (headers["x-resp-route"], headers["x-resp-tag"]) == ("canary-host", "canary")
    await _run(tmp_path, body)


async def test_rewritten_path_takes_the_new_routes_cluster_and_rewrite(tmp_path):
    async def body(env):
        status, headers, _ = await env.get("/v1/items", **{"x-set-path": "/v2/items?page=2"})
        assert status == 200
        assert env.stable.requests == []
        assert [r.path for r in env.canary.requests] == ["/api/v2/items?page=2"]   # v2's rewrite
        assert headers["x-resp-route"] == "v2"
    await _run(tmp_path, body)


async def test_rewrite_to_a_path_without_route_is_404(tmp_path):
    async def body(env):
        status, headers, data = await env.get("/v1/items", **{"x-set-path": "/nowhere"})
        assert status == 404
        assert b"no route" in data
        assert headers["x-resp-route"] == ""                  # through the filter, which sees no route
        assert env.stable.requests == [] and env.canary.requests == []
        status, _, _ = await env.get("/v1/items")             # the connection and gateway go on
        assert status == 200
    await _run(tmp_path, body)


async def test_rewritten_path_must_be_normal(tmp_path):
    async def body(env):
        # Routed as /public/.. it would reach the admin route's cluster under another route's
        # name; normalised it would silently become /admin. Neither: refused.
        for bad in ("/public/../admin", "/public/%2e%2e/admin", "//admin", "/public/%2Fadmin", "admin"):
            status, _, data = await env.get("/v1/items", **{"x-set-path": bad})
            assert status == 400, bad
            assert b"not in normal form" in data
        assert env.stable.requests == [] and env.canary.requests == []
        # A normal path set by the filter is fine, also with a query string.
        status, headers, _ = await env.get("/v1/items", **{"x-set-path": "/admin/users?all=1"})
        assert (status, headers["x-resp-route"]) == (200, "admin")
        assert [r.path for r in env.canary.requests] == ["/admin/users?all=1"]
    await _run(tmp_path, body)


async def test_reload_serves_new_metadata_and_node_keeps_filter_and_pool(tmp_path):
    wasm = watlib.build("route_policy.wat", tmp_path)
    async with recording_upstream() as stable, recording_upstream() as canary:
        text = _config(wasm, stable.port, canary.port)
        async with run_gateway(text, tmp_path) as gw:
            g = gw.gateway
            policy = g.generation.filter_host.filters["policy"]
            pool = g.generation.upstreams.pools["stable"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
                async with s.get(gw.url("/v1/a")) as r:
                    assert r.status == 200
                gw.config_path.write_text(text.replace("zone: a", "zone: c").replace("gw-test", "gw-next"))
                async with s.post(gw.admin_url + "/reload") as r:
                    assert r.status == 200, await r.text()
                async with s.get(gw.url("/v1/b")) as r:
                    assert r.status == 200
            seen = stable.requests[-1]
            assert (seen.first("x-md-zone"), seen.first("x-node-id")) == ("c", "gw-next")
            assert g.generation.filter_host.filters["policy"] is policy      # same instance, new facts
            assert g.generation.upstreams.pools["stable"] is pool            # metadata costs no connections


async def test_clear_route_cache_rematches(tmp_path):
    async def body(env):
        router = env.gw.gateway.generation.router
        matched = []
        real_match = router.match
        router.match = lambda *a: matched.append(a[2]) or real_match(*a)
        status, headers, _ = await env.get("/v1/a")
        assert (status, matched) == (200, ["/v1/a"])             # untouched: matched once
        matched.clear()
        status, headers, _ = await env.get("/v1/b", **{"x-clear-route-cache": "1"})
        assert (status, matched) == (200, ["/v1/b", "/v1/b"])    # matched again: same route
        assert headers["x-resp-route"] == "v1"
    await _run(tmp_path, body)
