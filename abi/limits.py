"""Fixed bounds on what a filter can make the host allocate or hold.

A guest chooses the sizes it hands to host functions, and it may name the same guest bytes
many times (one fd_write with 8,000 iovecs all pointing at one 64 KiB block claims 512 MB).
The host therefore never sizes an allocation from a guest's claim: it reads at most these
bounds, whatever the guest asks. The configurable bounds (body buffering, callout bytes) are
in ``api.FilterLimits``.
"""
from __future__ import annotations

from .pairs import MAX_BYTES as PAIRS_MAX_BYTES

MAX_LOG_BYTES = 16 * 1024        # one guest log line (proxy_log, fd_write) is cut beyond this
IOVEC_BATCH = 4096               # iovecs read from guest memory at a time (32 KiB of the list)
MAX_PENDING_CALLS = 1000         # callouts in flight per filter instance
MAX_PENDING_REDIS_CALLS = 1000   # Redis calls in flight per filter instance (abi/redis_call.py)
# What filters may add to one header map (request/response headers or trailers), net, counted
# as serialized bytes (§4.1): as much as one set_header_map_pairs may carry (cpp-host
# PROXY_WASM_HOST_PAIRS_MAX_BYTES). An edit past it is refused and fails the request by the
# filter's failure policy.
MAX_HEADER_MAP_BYTES = PAIRS_MAX_BYTES
# Properties stored with proxy_set_property per request (or per root context), path + value
# bytes. A store past it is refused the same way.
MAX_PROPERTY_BYTES = 1 << 20
