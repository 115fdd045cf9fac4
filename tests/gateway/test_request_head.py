"""upstream_headers: the headers-only-copied fast path gives exactly what the per-header loop gives."""
from __future__ import annotations

import random

from gateway.request_head import upstream_headers
from gateway.tracing import TraceHeaders

# Names the loop treats specially, and plain ones; values differ so a reordering would show.
NAMES = ["host", "accept", "user-agent", "cookie", "x-api-key", "x-forwarded-for", "x-forwarded-proto",
         "x-forwarded-host", "x-request-id", "x-wasmgate-trace", "traceparent", "tracestate", "connection",
         "keep-alive", "te", "expect", "x-auth-identity", "x-custom"]
INTERNAL = frozenset({"x-auth-identity"})


def run(headers, conn_tokens, trace: bool):
    got = TraceHeaders() if trace else None
    out = upstream_headers(list(headers), conn_tokens, "10.0.0.7", "example.com", "rid-1", "https", INTERNAL, got)
    return out, (got.traceparent, got.tracestate, got.debug) if got else None


def test_common_request_copies_headers_less_host_and_appends_forwarding():
    out, seen = run([("host", "example.com"), ("accept", "*/*"), ("user-agent", "u"), ("accept", "b")], None, True)
    assert out == [("accept", "*/*"), ("user-agent", "u"), ("accept", "b"), ("x-forwarded-for", "10.0.0.7"),
                   ("x-forwarded-proto", "https"), ("x-forwarded-host", "example.com"), ("x-request-id", "rid-1")]
    assert seen == ([], [], False)


def test_fast_path_matches_the_loop():
    """A Connection token the request does not use forces the loop: both readings must agree on
    500 generated requests, with and without tracing, plain names and special ones mixed."""
    rng = random.Random(15)
    fast_cases = 0
    for i in range(500):
        names = rng.choices(NAMES[:5] + ["x-custom"], k=rng.randint(0, 8)) if i % 2 else \
            rng.choices(NAMES, k=rng.randint(0, 8))
        headers = [(n, f"v{j}") for j, n in enumerate(names)]
        for trace in (False, True):
            assert run(headers, None, trace) == run(headers, {"x-not-sent"}, trace), headers
        fast_cases += all(n in ("accept", "user-agent", "cookie", "x-api-key", "x-custom") for n in names
                          if n != "host") and names.count("host") < 2
    assert fast_cases > 100          # the comparison did exercise the fast path
