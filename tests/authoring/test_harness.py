"""The pytest plugin (wasmgate.testing) and the harness under it, on real filters: requests
and responses through the committed filters, a callout answered by a Python callable, ticks,
the filters' clock, metrics, traps and load errors."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from abi.api import FilterLoadError
from wasmgate.harness import CallFailed, HarnessError
from tests.authoring.conftest import DIST

HEADERS_CONFIG = {"request": {"set": {"x-path": "${request.path}"}, "remove": ["x-drop"]},
                  "response": {"add": {"x-seen": "${request.header.x-in}"}}}


def test_request_and_response_through_a_filter(wasm_filter):
    f = wasm_filter(DIST / "headers.wasm", config=HEADERS_CONFIG)
    r = f.request("POST", "/p?q=1", headers={"x-in": "v", "x-drop": "1"}, body=[b"ab", b"cd"])
    assert r.local_reply is None and r.forwarded
    up = r.upstream_request
    assert (up.method, up.path, up.authority) == ("POST", "/p?q=1", "example.com")
    assert up.headers == [("x-in", "v"), ("content-length", "4"), ("x-path", "/p?q=1")]
    assert up.body == b"abcd"
    resp = r.respond(201, headers={"x-up": "1"}, body=b"hello")
    assert (resp.status, resp.body, resp.local_reply) == (201, b"hello", None)
    assert resp.headers["x-seen"] == "v" and resp.headers["x-up"] == "1"
    assert resp.headers.get_all("content-length") == ["5"]
    names = [c.name for c in f.host_calls]
    assert "proxy_replace_header_map_value" in names and "proxy_remove_header_map_value" in names
    assert all(c.status == "OK" for c in f.host_calls if c.name == "proxy_get_property")
    assert {t.callback for t in f.timings} >= {"proxy_on_request_headers", "proxy_on_response_headers"}
    with pytest.raises(HarnessError, match="already called"):
        r.respond(200)


def test_local_reply(wasm_filter):
    f = wasm_filter(DIST / "auth.wasm", config={"strip_credentials": True,
                                             "api_key": {"keys": [{"key": "k1", "identity": "alice"}]}})
    denied = f.request("GET", "/", headers={"x-api-key": "nope"})
    assert denied.upstream_request is None and denied.local_reply.status == 401
    with pytest.raises(HarnessError, match="local reply"):
        denied.respond(200)
    ok = f.request("GET", "/", headers={"x-api-key": "k1"})
    assert ok.upstream_request.headers["x-auth-identity"] == "alice"
    assert "x-api-key" not in ok.upstream_request.headers


def test_callout_paused_until_the_python_callable_answers(wasm_filter, callout_wasm):
    """The filter pauses its request on http_call; the harness awaits the handler (here an
    async one that yields to the loop first) and delivers its answer; the request resumes."""
    async def authz(call):
        await asyncio.sleep(0)
        assert (call.cluster, call.method, call.path) == ("authz", "GET", "/check")
        return (200, {"x-why": "ok"}, b"alice") if call.headers.get("authorization") == "good" else (401, {}, b"")

    f = wasm_filter(callout_wasm, config={"cluster": "authz", "path": "/check"}, on_http_call=authz,
                    clusters=["authz"])
    allowed = f.request("GET", "/a", headers={"authorization": "good"})
    assert allowed.upstream_request.headers["x-authz"] == "alice"
    denied = f.request("GET", "/a", headers={"authorization": "bad"})
    assert denied.local_reply.status == 403 and denied.local_reply.body == b"denied by authz (401)\n"
    assert [c.headers.get("authorization") for c in f.http_calls] == ["good", "bad"]

    def down(call):
        raise CallFailed("connection refused")
    f.on_http_call = down
    assert f.request("GET", "/a").local_reply.status == 503
    assert any("http call to authz failed: connection refused" in log.message for log in f.logs)


def test_unknown_cluster_and_missing_handler(wasm_filter, callout_wasm):
    f = wasm_filter(callout_wasm, config={"cluster": "authz"}, clusters=["other"])
    # An unknown cluster is refused at dispatch (BadArgument), as in the gateway.
    f.request("GET", "/")
    assert ("proxy_http_call", "BadArgument") in [(c.name, c.status) for c in f.host_calls]
    g = wasm_filter(callout_wasm, config={"cluster": "authz"})
    with pytest.raises(HarnessError, match="no on_http_call handler"):
        g.request("GET", "/")


def test_ticks_only_when_asked(wasm_filter, tick_wasm):
    f = wasm_filter(tick_wasm)
    assert not any("proxy_on_tick" in log.message for log in f.logs)
    assert f.tick() is True
    assert f.tick() is True
    assert [log.message for log in f.logs if "proxy_on_tick" in log.message] == ['filter "tick": proxy_on_tick 1'] * 2


def test_clock_and_metrics(wasm_filter):
    f = wasm_filter(DIST / "ratelimit.wasm", config={"limits": [{"name": "g", "key": "global", "rate": 1, "burst": 2}]})
    assert [f.request("GET", "/").forwarded for _ in range(3)] == [True, True, False]
    f.advance(1.0)                        # one token back
    assert [f.request("GET", "/").forwarded for _ in range(2)] == [True, False]
    assert f.metrics["ratelimit.ratelimit.store_full_denied"] == 0
    # A counter the filter defines shows under the name it gave it.
    r = wasm_filter(DIST / "ratelimit.wasm", config={"namespace": "ns", "limits": [
        {"name": "u", "key": "header:x-user", "rate": 1}]})
    r.request("GET", "/", headers={"x-user": "a"})
    assert set(r.metrics) >= {"ratelimit.ns.store_full_denied", "ratelimit.ns.store_full_allowed"}
    assert r.metrics["ratelimit.ns.store_full_denied"] == 0


def test_trap_fails_closed_with_a_backtrace(wasm_filter, trap_wasm):
    f = wasm_filter(trap_wasm)
    r = f.request("GET", "/")
    assert r.local_reply.status == 503 and r.local_reply.details == "wasm_fail_stream"
    assert "wasm backtrace" in f.log_text and "check_request" in f.log_text


def test_a_request_paused_for_good_is_an_error(wasm_filter, pause_wasm):
    f = wasm_filter(pause_wasm, timeout_s=0.5)
    with pytest.raises(HarnessError, match="paused and never resumed"):
        f.request("GET", "/")


def test_load_error_names_the_filter(wasm_filter):
    with pytest.raises(FilterLoadError, match=r'filter "risk".*proxy_on_configure') as e:
        wasm_filter(DIST / "risk.wasm", config={"threshold": "not a number"})
    assert "threshold" in str(e.value)        # what the filter logged is part of the error


def test_chain_runs_in_order(wasm_chain):
    f = wasm_chain([(DIST / "auth.wasm", {"api_key": {"keys": [{"key": "k", "identity": "bob"}]}}),
                    (DIST / "headers.wasm", {"request": {"set": {"x-who": "${request.header.x-auth-identity}"}}})])
    assert f.names == ["auth", "headers"]
    assert f.request("GET", "/", headers={"x-api-key": "k"}).upstream_request.headers["x-who"] == "bob"
    assert f.request("GET", "/").local_reply.status == 401


def test_plugin_is_registered_for_any_project(tmp_path):
    """A project outside this repository gets the fixtures from the installed entry point."""
    (tmp_path / "test_x.py").write_text(textwrap.dedent(f"""
        def test_it(wasm_filter):
            f = wasm_filter({str(DIST / 'headers.wasm')!r}, config={{"request": {{"set": {{"x-a": "1"}}}}}})
            assert f.request("GET", "/").upstream_request.headers["x-a"] == "1"
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
