"""The facade of abi/: the only abi module gateway/ imports.

It sits on top of abi/: the seam types come from abi/seam.py (the bottom, importing nothing of
abi/) and are re-exported here unchanged; the entry points below reach down into the host.
No abi module imports this one, so it closes no circle.
"""
from __future__ import annotations

from .capabilities import ALL as CAPABILITIES    # config.py validates capability names with it
from .protowire import length_delimited, varint  # gateway/otlp_wire.py writes OTLP with them
from .seam import (
    Body, CallFailed, CallResponse, FilterHostProtocol, FilterLimits, FilterLoadError,
    FilterSpec, Forward, GrpcReply, GrpcStream, Headers, HostObserver, HostServices, HttpStream,
    LocalReply, LocalReplyInterrupt, LogInfo, MetricSample, NodeInfo, RedisOptions, StreamInfo,
    TlsFacts,
)

__all__ = [
    "CAPABILITIES", "Body", "CallFailed", "CallResponse", "FilterHostProtocol", "FilterLimits", "FilterLoadError",
    "FilterSpec", "Forward", "GrpcReply", "GrpcStream", "Headers", "HostObserver",
    "HostServices", "HttpStream", "LocalReply", "LocalReplyInterrupt", "LogInfo",
    "MetricSample", "NodeInfo", "RedisOptions", "StreamInfo", "TlsFacts",
    "load_filter_host", "create_local_store", "create_shared_store", "open_shared_store",
    "remove_shared_store", "length_delimited", "varint",
]


async def load_filter_host(specs: list[FilterSpec], services: HostServices,
                           previous: FilterHostProtocol | None = None) -> FilterHostProtocol:
    """Load, start and configure every filter; raise FilterLoadError naming the first failure.

    ``previous`` (config reload): unchanged filters (same spec, same wasm sha256) keep their
    instance; ``previous.close()`` then tears down only the others."""
    from .filter_host import FilterHost   # deferred: keeps gateway imports free of wasmtime
    return await FilterHost.load(specs, services, previous=previous)


# -- gateway-wide shared data (added for worker processes; backward compatible) -------------

def create_local_store(max_bytes: int):
    """A store for one process (no workers), sized by the config's shared_data.max_bytes."""
    from .shared_store import LocalStore
    return LocalStore(max_bytes=max_bytes)


def create_shared_store(name: str, max_bytes: int):
    """Create the store all worker processes share (supervisor, before starting workers)."""
    from .shared_store_shm import create     # deferred: lmdb only when workers share a store
    return create(name, max_bytes)


def open_shared_store(name: str):
    """Open it in a worker; pass it to the gateway so filters get it as services.shared_store."""
    from .shared_store_shm import open as open_store
    return open_store(name)


def remove_shared_store(name: str) -> None:
    from .shared_store_shm import remove
    remove(name)
