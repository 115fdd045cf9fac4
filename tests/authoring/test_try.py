"""`wasmgate try`: the exact text for an allowed request through a chain, a rejected one, an
http_call answered from the command line and a trap (with its wasm backtrace); --json parsed;
usage and load errors as one clear line and a non-zero status."""
from __future__ import annotations

import json
import re

import pytest

from gateway.cli import main
from tests.authoring.conftest import DIST

AUTH = json.dumps({"api_key": {"keys": [{"key": "k1", "identity": "alice"}]}})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["try", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, re.sub(r"\d+ µs", "N µs", out), err


def test_allow_through_a_chain(capsys):
    rc, out, err = run(capsys, "--chain", f"{DIST / 'auth.wasm'},{DIST / 'headers.wasm'}",
                       "--config", AUTH, "--config", '{"response":{"set":{"x-who":"${request.header.x-auth-identity}"}}}',
                       "--request", "POST /orders", "-H", "x-api-key: k1", "--data", "ab", "--data", "cd",
                       "--response", "201", "-H", "content-type: text/plain", "--data", "made")
    assert (rc, err) == (0, "")
    assert out.split("callbacks at load")[0] == """\
filters: auth -> headers
request: POST /orders
upstream request: POST /orders
  :authority: example.com
  x-api-key: k1
  content-length: 4
  x-auth-identity: alice
  body (4 bytes):
    abcd
client response: 201
  content-type: text/plain
  content-length: 4
  x-who: alice
  body (4 bytes):
    made
logs:
  (none)
"""
    assert out.split("callbacks of the request (µs, host calls):\n")[1].split("callbacks at close")[0] == """\
  auth proxy_on_context_create N µs
  auth proxy_on_request_headers N µs
    proxy_get_header_map_pairs -> OK
    proxy_replace_header_map_value -> OK
  headers proxy_on_context_create N µs
  headers proxy_on_request_headers N µs
    proxy_get_header_map_value -> OK
  headers proxy_on_response_headers N µs
    proxy_replace_header_map_value -> OK
  auth proxy_on_response_headers N µs
  auth proxy_on_delete N µs
  headers proxy_on_delete N µs
"""


def test_reject(capsys):
    rc, out, err = run(capsys, DIST / "auth.wasm", "--config", AUTH, "-H", "x-api-key: wrong")
    assert (rc, err) == (0, "")
    assert out == """\
filters: auth
request: GET /
local reply (the upstream is not called): 401
  content-type: application/json
  cache-control: no-store
  www-authenticate: ApiKey realm="wasmgate", header="x-api-key"
  body (52 bytes):
    {"error":"unauthorized","message":"invalid API key"}
logs:
  (none)
callbacks at load (µs, host calls):
  auth _initialize N µs
  auth proxy_on_context_create N µs
  auth proxy_on_vm_start N µs
  auth proxy_on_configure N µs
    proxy_get_buffer_bytes -> OK
callbacks of the request (µs, host calls):
  auth proxy_on_context_create N µs
  auth proxy_on_request_headers N µs
    proxy_get_header_map_pairs -> OK
    proxy_send_local_response -> OK
  auth proxy_on_response_headers N µs
  auth proxy_on_delete N µs
callbacks at close (µs, host calls):
  auth proxy_on_delete N µs
"""
    rc, out, _ = run(capsys, DIST / "auth.wasm", "--config", AUTH, "-H", "x-api-key: wrong", "--json")
    doc = json.loads(out)
    assert doc["local_reply"]["status"] == 401 and doc["upstream_request"] is None and doc["response"] is None
    assert [c["callback"] for c in doc["callbacks"]["request"]][:2] == ["proxy_on_context_create",
                                                                        "proxy_on_request_headers"]
    assert {"name": "proxy_send_local_response", "status": "OK"} in doc["callbacks"]["request"][1]["host_calls"]


def test_callout_answered_from_the_command_line(capsys, callout_wasm):
    rc, out, err = run(capsys, callout_wasm, "--config", '{"cluster":"authz","path":"/check"}',
                       "-H", "authorization: Bearer t", "--call-response", "authz=200:alice")
    assert (rc, err) == (0, "")
    assert out.split("callbacks at load")[0] == """\
filters: example_callout
request: GET /
upstream request: GET /
  :authority: example.com
  authorization: Bearer t
  x-authz: alice
client response: 200 (upstream: 200, no body; give one with --response)
http calls:
  authz: GET /check -> 200, 5 bytes
logs:
  info: filter "example_callout": callout: authz answered 200 (5 bytes)
"""
    assert """\
  example_callout proxy_on_request_headers N µs
    proxy_get_header_map_value -> OK ×2
    proxy_http_call -> OK
  example_callout proxy_on_http_call_response N µs
    proxy_set_effective_context -> OK
""" in out
    # A cluster nobody answers: the call fails as a refused connection; the filter answers 503.
    rc, out, _ = run(capsys, callout_wasm, "--config", '{"cluster":"authz"}', "--json")
    doc = json.loads(out)
    assert doc["local_reply"]["status"] == 503
    assert doc["http_calls"][0]["outcome"] == "failed: no --call-response for cluster authz"
    assert {"level": "info", "message": 'filter "example_callout": http call to authz failed: '
            'no --call-response for cluster authz'} in doc["logs"]


def test_trap_shows_the_wasm_backtrace(capsys, trap_wasm):
    rc, out, err = run(capsys, trap_wasm)
    assert (rc, err) == (0, "")
    assert out.split("  info: filter \"trap\": proxy_on_context_create 3 0")[0] == """\
filters: trap
request: GET /
local reply (the upstream is not called): 503 (wasm_fail_stream)
logs:
  info: filter "trap": proxy_on_context_create 1 0
  info: filter "trap": proxy_on_vm_start 1 0
  info: filter "trap": proxy_on_configure 1 0
  info: filter "trap": proxy_on_context_create 2 1
  error: filter "trap" (trap.wasm): trap in proxy_on_request_headers: wasm trap: wasm `unreachable` instruction executed
    wasm backtrace:
      trap.wasm!check_request
      trap.wasm!proxy_on_request_headers
"""
    doc = json.loads(run(capsys, trap_wasm, "--json")[1])
    assert doc["local_reply"]["details"] == "wasm_fail_stream"
    assert any("trap.wasm!check_request" in log["message"] for log in doc["logs"] if log["level"] == "error")


@pytest.mark.parametrize("argv, message", [
    (["--response"], "--response needs a status code first"),
    (["x.wasm", "--response", "200", "--config", "{}"], "after --response only -H and --data are allowed"),
    (["x.wasm", "-H", "no-colon"], "-H 'no-colon': expected 'name: value'"),
    (["x.wasm", "--call-response", "authz"], "expected CLUSTER=STATUS[:BODY]"),
    (["x.wasm", "--request", "GET"], "expected 'METHOD /path'"),
    ([], "give one FILTER.wasm or --chain"),
])
def test_usage_errors(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and message in err and "Traceback" not in err


def test_load_error_is_one_clear_message(capsys, tmp_path):
    rc, out, err = run(capsys, DIST / "risk.wasm", "--config", '{"threshold": "x"}')
    assert rc == 1 and out == ""
    assert err.startswith('wasmgate try: filter "risk": ') and "threshold: expected a number" in err
    rc, _, err = run(capsys, tmp_path / "missing.wasm")
    assert rc == 1 and "cannot read" in err and "missing.wasm" in err
