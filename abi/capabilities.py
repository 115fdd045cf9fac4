"""Per-filter capabilities: which host-function groups a filter may call, which properties it
may read (cpp-host's ``allowed_capabilities``, grouped as operators think of them).

Decided when the filter's host-function table is built (abi/filter.py ``_host_functions``),
never per call: an allowed function is linked as it always is, a denied one is linked to a
stub that answers as cpp-host's restricted-capability stubs do (``proxy_*``:
INTERNAL_FAILURE; WASI: 76, ENOTCAPABLE), counts, and logs once per filter and function.
A filter with every capability links exactly the table it had before this module existed.

The table is data: a new host function joins a group by adding its name here (e.g. the gRPC
calls of ``grpc_call`` when they are implemented).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from .enums import Status

if TYPE_CHECKING:
    from .context import FilterView      # a type only: this module stays light for abi/api.py

WASI_NOTCAPABLE = 76

# group → the imports (env.* or WASI, by function name) it grants.
GROUPS: dict[str, tuple[str, ...]] = {
    "http_call": ("proxy_http_call",),
    "grpc_call": ("proxy_grpc_call", "proxy_grpc_stream", "proxy_grpc_send", "proxy_grpc_cancel",
                  "proxy_grpc_close"),
    "redis_call": ("proxy_redis_init", "proxy_redis_call"),
    "shared_data": ("proxy_get_shared_data", "proxy_set_shared_data"),
    "shared_queue": ("proxy_register_shared_queue", "proxy_resolve_shared_queue",
                     "proxy_enqueue_shared_queue", "proxy_dequeue_shared_queue"),
    "metrics": ("proxy_define_metric", "proxy_increment_metric", "proxy_record_metric",
                "proxy_get_metric"),
    "properties_write": ("proxy_set_property",),
    "tick": ("proxy_set_tick_period_milliseconds",),
    "foreign_functions": ("proxy_call_foreign_function",),
    "log": ("proxy_log", "fd_write", "fd_pwrite"),
    "wasi_clock": ("clock_time_get", "clock_res_get"),
    "wasi_random": ("random_get",),
    "wasi_environ": ("environ_get", "environ_sizes_get"),
}
ALL: frozenset[str] = frozenset(GROUPS)
GROUP_OF: dict[str, str] = {name: group for group, names in GROUPS.items() for name in names}

# A foreign function that does another group's work needs that group too: abi/foreign.py's
# GROUPS, checked by the function itself.


def grants(granted: frozenset[str] | None, group: str) -> bool:
    return granted is None or group in granted


def denied(granted: frozenset[str] | None) -> dict[str, str]:
    """import name → the group it belongs to, for every import ``granted`` leaves out."""
    return {name: group for name, group in GROUP_OF.items() if not grants(granted, group)}


def denial_stub(f: FilterView, name: str, group: str, wasi: bool) -> Callable[..., int]:
    status = WASI_NOTCAPABLE if wasi else Status.INTERNAL_FAILURE

    def stub(*_args: int) -> int:
        f.capability_denied(name, group)
        return status
    stub.__name__ = f"denied_{name}"
    return stub


def readable(prefixes: Iterable[str]) -> Callable[[bytes], bool]:
    """A predicate on a property path (segments joined by NUL, as the SDKs send them, or by
    dots): true when it is one of ``prefixes`` or below one (``request`` admits
    ``request.headers.x``, not ``requests``)."""
    exact = tuple(p.encode() for p in prefixes)
    below = tuple(p + b"." for p in exact)

    def ok(path: bytes) -> bool:
        dotted = path.rstrip(b"\0").replace(b"\0", b".")
        return dotted in exact or dotted.startswith(below)
    return ok

