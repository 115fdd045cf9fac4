"""First-match routing and rewrites: unit level on the Router, then end to end."""
import aiohttp

from gateway.config import parse_config
from gateway.routing import Router, rewrite_target, strip_port
from tests.helpers import echo_upstream, run_gateway

ROUTES = """
listeners: [{name: main, port: 0}]
clusters: [{name: c, endpoints: ["127.0.0.1:1"]}]
routes:
  - {name: exact, match: {path: /health}, cluster: c}
  - {name: host, match: {host: api.example.com, prefix: /v}, cluster: c, rewrite: {prefix: /internal}}
  - {name: post, match: {prefix: /items, methods: [POST, PUT]}, cluster: c}
  - {name: hdr, match: {prefix: /items, headers: {x-env: canary}}, cluster: c}
  - {name: items, match: {prefix: /items}, cluster: c, rewrite: {prefix: /, host: items.internal}}
  - {name: exact_rw, match: {path: /old}, cluster: c, rewrite: {prefix: /new}}
  - {name: fallback, cluster: c}
"""


def router():
    cfg = parse_config(ROUTES, "t.yaml", __import__("pathlib").Path("."))
    return cfg, Router(cfg.routes)


def name(r, method, host, path, headers=()):
    route = r.match(method, host, path, list(headers))
    return route.name if route else None


def test_first_match_order_and_conditions():
    _, r = router()
    assert name(r, "GET", "x", "/health") == "exact"
    assert name(r, "GET", "x", "/health/more") == "fallback"          # exact is exact
    assert name(r, "GET", "API.Example.com:8443", "/v1") == "host"      # case and port ignored
    assert name(r, "GET", "other.com", "/v1") == "fallback"
    assert name(r, "POST", "x", "/items/1") == "post"
    assert name(r, "GET", "x", "/items/1", [("x-env", "canary")]) == "hdr"
    assert name(r, "GET", "x", "/items/1", [("x-env", "prod")]) == "items"
    assert name(r, "POST", "x", "/items", [("x-env", "canary")]) == "post"   # first match wins


def test_rewrites():
    cfg, r = router()
    by = {rt.name: rt for rt in cfg.routes}
    assert rewrite_target(by["host"], "/v1/users?x=1") == "/internal1/users?x=1"
    assert rewrite_target(by["items"], "/items/42?a=b") == "/42?a=b"
    assert rewrite_target(by["items"], "/items") == "/"
    assert rewrite_target(by["exact_rw"], "/old?q") == "/new?q"
    assert rewrite_target(by["fallback"], "/same") == "/same"


def test_strip_port():
    assert strip_port("Example.com:80") == "example.com"
    assert strip_port("[::1]:8080") == "[::1]"
    assert strip_port("plain") == "plain"


async def test_rewrite_end_to_end(tmp_path):
    async with echo_upstream() as up:
        text = f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
access_log: {{path: null}}
clusters: [{{name: c, endpoints: ["127.0.0.1:{up.port}"]}}]
routes:
  - {{name: items, match: {{prefix: /api/}}, cluster: c, rewrite: {{prefix: /v2/, host: internal.svc}}}}
  - {{name: only_get, match: {{prefix: /ro, methods: [GET]}}, cluster: c}}
"""
        async with run_gateway(text, tmp_path) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url("/api/users?id=7"), headers={"Host": "public.example"}) as r:
                    assert r.status == 200
                async with s.post(gw.url("/ro")) as r:
                    assert r.status == 404
                async with s.get(gw.url("/ro")) as r:
                    assert r.status == 200
    first = up.requests[0]
    assert first.path == "/v2/users?id=7"
    assert first.header("host") == "internal.svc"
    assert first.header("x-forwarded-host") == "public.example"
    assert len(up.requests) == 2


def test_remove_dot_segments():
    from gateway.paths import remove_dot_segments as r
    assert r("/a/../b") == "/b" and r("/../../x") == "/x" and r("/a/./b/.") == "/a/b/"
    assert r("/a/b/..") == "/a/" and r("/a/.hidden/..b") == "/a/.hidden/..b"


async def test_dot_segments_cannot_dodge_a_route(tmp_path):
    async with echo_upstream() as up:
        text = f"""
listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
access_log: {{path: null}}
clusters: [{{name: c, endpoints: ["127.0.0.1:{up.port}"]}}]
routes:
  - {{name: private, match: {{prefix: /private}}, cluster: c, rewrite: {{prefix: /guarded}}}}
  - {{name: public, match: {{prefix: /public}}, cluster: c}}
"""
        async with run_gateway(text, tmp_path) as gw:
            from tests.helpers import raw_exchange
            raw = await raw_exchange(gw.port(), b"GET /public/../private/x?q=/../ HTTP/1.1\r\nHost: h\r\n"
                                     b"Connection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200")
    assert up.requests[0].path == "/guarded/x?q=/../"
