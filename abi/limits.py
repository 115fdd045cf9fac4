"""Fixed bounds on what a filter can make the host allocate or hold.

A guest chooses the sizes it hands to host functions, and it may name the same guest bytes
many times (one fd_write with 8,000 iovecs all pointing at one 64 KiB block claims 512 MB).
The host therefore never sizes an allocation from a guest's claim: it reads at most these
bounds, whatever the guest asks. The configurable bounds (body buffering, callout bytes) are
in ``api.FilterLimits``.
"""
from __future__ import annotations

MAX_LOG_BYTES = 16 * 1024        # one guest log line (proxy_log, fd_write) is cut beyond this
IOVEC_BATCH = 4096               # iovecs read from guest memory at a time (32 KiB of the list)
MAX_PENDING_CALLS = 1000         # callouts in flight per filter instance
# A header map (request/response headers or trailers) may not grow past this, counted as its
# serialized size (§4.1): the most a filter could hand back with one set_header_map_pairs
# (cpp-host PROXY_WASM_HOST_PAIRS_MAX_BYTES). Adding beyond it traps the filter.
MAX_HEADER_MAP_BYTES = 1 << 20
# Properties a filter stores with proxy_set_property, per request (or per root context),
# counted as path + value bytes. Storing beyond it traps the filter.
MAX_PROPERTY_BYTES = 1 << 20
