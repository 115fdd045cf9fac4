"""What a client may not decide: the Host it names, its request id, headers only the gateway
sets — and the request head the upstream gets instead (hop-by-hop removed, X-Forwarded-*).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .http1 import HOP_BY_HOP, HttpError
from .random_ids import random_hex

if TYPE_CHECKING:
    from .tracing import TraceHeaders

Headers = list[tuple[str, str]]

# RFC 3986 host (IP-literal, IPv4 or reg-name without percent-encodings) and an optional port,
# as nginx validates Host: no spaces, "/", "\", "@" (userinfo) or "..".
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::[0-9]{0,5})?")
# A client's x-request-id is kept only when it cannot smuggle anything into logs or headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def check_authority(value: str) -> None:
    """Raise HttpError(400) unless ``value`` is a valid ``host[:port]``."""
    if not _AUTHORITY.fullmatch(value) or ".." in value:
        raise HttpError(400, f"invalid host {value[:80]!r}")


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    """A request id for a request without a usable one: 128 random bits as 32 hex digits."""
    return random_hex(16)


# Names upstream_headers does more with than copy (hop-by-hop, Host, Expect, the X-Forwarded-*
# it joins, x-request-id, trace headers): any other header costs one set lookup (and one in
# ``internal``), not the chain of comparisons below.
_NOT_COPIED = HOP_BY_HOP | {"host", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                            "x-request-id", "x-wasmgate-trace", "traceparent", "tracestate"}


def upstream_headers(headers: Headers, conn_tokens: set[str] | None, client_ip: str, authority: str,
                     rid: str, scheme: str, internal: frozenset[str], trace: "TraceHeaders | None" = None) -> Headers:
    """Request headers for the upstream (and the filters): hop-by-hop and ``internal`` headers
    gone, X-Forwarded-* appended, exactly one x-request-id (``rid``, validated by the caller).
    x-wasmgate-trace never goes on; with ``trace`` (tracing.TraceHeaders) it and the W3C
    traceparent/tracestate are moved there (gateway/tracing.py decides what goes upstream)."""
    hop, special = (HOP_BY_HOP | conn_tokens, _NOT_COPIED | conn_tokens) if conn_tokens else (HOP_BY_HOP, _NOT_COPIED)
    out: Headers = []
    xff = xfp = xfh = None
    for name, value in headers:
        if name not in special and name not in internal:
            out.append((name, value))
            continue
        if name in hop or name == "host" or name == "expect":
            continue
        if name[0] == "x":
            if name == "x-forwarded-for":
                xff = value if xff is None else f"{xff}, {value}"
                continue
            if name == "x-forwarded-proto":
                xfp = value if xfp is None else f"{xfp}, {value}"
                continue
            if name == "x-forwarded-host":
                xfh = value if xfh is None else f"{xfh}, {value}"
                continue
            if name == "x-request-id":
                continue
            if name == "x-wasmgate-trace":
                if trace is not None:
                    trace.debug = value.strip(" \t") == "1"
                continue
        elif trace is not None and name[0] == "t":
            if name == "traceparent":
                trace.traceparent.append(value)
                continue
            if name == "tracestate":
                trace.tracestate.append(value)
                continue
        if name in internal:
            continue
        out.append((name, value))
    out.append(("x-forwarded-for", client_ip if xff is None else f"{xff}, {client_ip}"))
    out.append(("x-forwarded-proto", scheme if xfp is None else f"{xfp}, {scheme}"))
    out.append(("x-forwarded-host", authority if xfh is None else f"{xfh}, {authority}"))
    out.append(("x-request-id", rid))
    return out
