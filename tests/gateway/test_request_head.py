"""upstream_headers against its specification, on generated requests: plain headers go on in
order (each costs one set lookup now), the special ones are dropped, joined or moved as before."""
from __future__ import annotations

import random

from gateway.http1 import HOP_BY_HOP
from gateway.request_head import upstream_headers
from gateway.tracing import TraceHeaders

NAMES = ["host", "accept", "user-agent", "cookie", "x-api-key", "x-forwarded-for", "x-forwarded-proto",
         "x-forwarded-host", "x-request-id", "x-wasmgate-trace", "traceparent", "tracestate", "connection",
         "keep-alive", "te", "expect", "x-auth-identity", "x-custom", "x-conn-named"]
INTERNAL = frozenset({"x-auth-identity"})
DROPPED = HOP_BY_HOP | {"host", "expect", "x-request-id", "x-wasmgate-trace"} | INTERNAL
JOINED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def expected(headers, conn_tokens, trace: bool):
    """The specification, written as filters over the whole list rather than one loop."""
    moved = ("traceparent", "tracestate") if trace else ()
    dropped = DROPPED | (conn_tokens or set())
    kept = [(n, v) for n, v in headers if n not in dropped and n not in JOINED and n not in moved]
    own = {"x-forwarded-for": "10.0.0.7", "x-forwarded-proto": "https", "x-forwarded-host": "example.com"}
    kept += [(name, ", ".join([v for n, v in headers if n == name] + [own[name]])) for name in JOINED]
    kept.append(("x-request-id", "rid-1"))
    debug = [v.strip(" \t") == "1" for n, v in headers if n == "x-wasmgate-trace"]
    seen = ([v for n, v in headers if n == "traceparent"], [v for n, v in headers if n == "tracestate"],
            bool(debug) and debug[-1]) if trace else None
    return kept, seen


def run(headers, conn_tokens, trace: bool):
    got = TraceHeaders() if trace else None
    out = upstream_headers(list(headers), conn_tokens, "10.0.0.7", "example.com", "rid-1", "https", INTERNAL, got)
    return out, (got.traceparent, got.tracestate, got.debug) if got else None


def test_common_request_copies_headers_less_host_and_appends_forwarding():
    out, seen = run([("host", "example.com"), ("accept", "*/*"), ("user-agent", "u"), ("accept", "b")], None, True)
    assert out == [("accept", "*/*"), ("user-agent", "u"), ("accept", "b"), ("x-forwarded-for", "10.0.0.7"),
                   ("x-forwarded-proto", "https"), ("x-forwarded-host", "example.com"), ("x-request-id", "rid-1")]
    assert seen == ([], [], False)


def test_generated_requests_match_the_specification():
    rng = random.Random(15)
    for i in range(600):
        names = rng.choices(NAMES, k=rng.randint(0, 10))
        headers = [(n, rng.choice(["1", " 1\t", "v%d" % j, "0"])) for j, n in enumerate(names)]
        tokens = rng.choice([None, set(), {"x-conn-named"}, {"x-custom", "cookie"}])
        for trace in (False, True):
            assert run(headers, tokens, trace) == expected(headers, tokens, trace), (headers, tokens, trace)
