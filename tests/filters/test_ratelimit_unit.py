"""ratelimit filter, unit level through the real wasm (wasmgate's pytest plugin, no sockets):
per-header buckets (long values hashed), a missing key skipping the limit or sharing one bucket,
refill on the filter's clock (moved by the test, no sleeping), headers off, and several limits
behind auth (identity, then global; a rejected request spends no token). End to end over HTTP
(exact admission under concurrency, client-address buckets, namespaces across filter entries):
test_ratelimit.py."""
from __future__ import annotations

import json

from tests.filters.conftest import DIST

WASM = DIST / "ratelimit.wasm"
SLOW = 3600  # period_s for buckets that must not refill during a test


def rl_headers(h):
    return int(h["ratelimit-limit"]), int(h["ratelimit-remaining"]), int(h["ratelimit-reset"])


def send(f, headers=None):
    """(status, headers, body) as the client gets them."""
    r = f.request("GET", "/x", headers=headers)
    if r.local_reply is not None:
        return r.local_reply.status, r.local_reply.headers, r.local_reply.body
    resp = r.respond(200)
    return resp.status, resp.headers, resp.body


def limit(**kw):
    return {"limits": [{"name": "per-user", "key": "header:x-user", "rate": 1, "period_s": SLOW, "burst": 2, **kw}]}


def test_header_keyed_buckets_are_independent(wasm_filter):
    f = wasm_filter(WASM, config=limit())
    a = [send(f, {"x-user": "a"}) for _ in range(3)]
    assert [s for s, _, _ in a] == [200, 200, 429]
    assert [rl_headers(h)[1] for _, h, _ in a] == [1, 0, 0]
    assert json.loads(a[2][2]) == {"error": "rate_limited", "limit": "per-user", "retry_after_s": SLOW}
    assert int(a[2][1]["retry-after"]) == SLOW and a[2][1]["content-type"].startswith("application/json")
    s, h, _ = send(f, {"x-user": "b"})
    assert s == 200 and rl_headers(h)[1] == 1


def test_long_key_values_get_their_own_buckets(wasm_filter):
    f = wasm_filter(WASM, config=limit())
    long_a, long_b = "a" * 3000, "a" * 2999 + "b"     # hashed keys: still one bucket each
    assert [send(f, {"x-user": long_a})[0] for _ in range(3)] == [200, 200, 429]
    assert [send(f, {"x-user": long_b})[0] for _ in range(3)] == [200, 200, 429]


def test_missing_key_skips_the_limit_or_shares_a_bucket(wasm_filter):
    skip = wasm_filter(WASM, config=limit())
    for _ in range(4):
        s, h, _ = send(skip)
        assert s == 200 and "ratelimit-limit" not in h     # no limit applied, nothing to report
    shared = wasm_filter(WASM, config=limit(on_missing="shared"))
    assert [send(shared)[0] for _ in range(3)] == [200, 200, 429]
    assert send(shared, {"x-user": "c"})[0] == 200


def test_refill_on_the_filters_clock(wasm_filter):
    f = wasm_filter(WASM, config={"limits": [{"name": "fast", "key": "global", "rate": 10, "burst": 1}]})
    assert send(f)[0] == 200
    s, h, _ = send(f)
    assert s == 429 and int(h["retry-after"]) == 1
    f.advance(0.05)                                           # half a token
    assert send(f)[0] == 429
    f.advance(0.06)                                           # one token back
    s, h, _ = send(f)
    assert s == 200 and rl_headers(h)[0] == 1


def test_headers_can_be_turned_off(wasm_filter):
    f = wasm_filter(WASM, config={"headers": False, "limits": [
        {"name": "g", "key": "global", "rate": 1, "period_s": SLOW, "burst": 1}]})
    s, h, _ = send(f)
    assert s == 200 and "ratelimit-limit" not in h
    s, h, _ = send(f)
    assert s == 429 and "ratelimit-remaining" not in h and int(h["retry-after"]) == SLOW


def test_several_limits_per_key_and_global(wasm_chain):
    f = wasm_chain([(DIST / "auth.wasm", {"api_key": {"keys": [{"key": "ka", "identity": "alice"},
                                                               {"key": "kb", "identity": "bob"}]}}),
                    (WASM, {"limits": [{"name": "per-key", "key": "identity", "rate": 1, "period_s": SLOW, "burst": 2},
                                       {"name": "global", "key": "global", "rate": 1, "period_s": SLOW, "burst": 3}]})])
    alice = [send(f, {"x-api-key": "ka"}) for _ in range(3)]
    assert [s for s, _, _ in alice] == [200, 200, 429]
    assert json.loads(alice[2][2])["limit"] == "per-key"
    # alice's rejected request did not spend a global token: bob still gets the third one
    s, h, _ = send(f, {"x-api-key": "kb"})
    assert s == 200 and rl_headers(h) == (3, 0, 3 * SLOW)    # the most constrained bucket is reported
    s, _, body = send(f, {"x-api-key": "kb"})
    assert s == 429 and json.loads(body)["limit"] == "global"
    assert send(f)[0] == 401                                  # auth answers before the rate limiter
