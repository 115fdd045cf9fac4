"""Helpers shared by the ABI tests (imported as a plain module: tests/ is not a package)."""
from __future__ import annotations

from abi.api import StreamInfo


def info(**kw) -> StreamInfo:
    base = dict(request_id="req-1", route_name="r1", cluster_name="backend",
                client_addr=("127.0.0.1", 40000), local_addr=("127.0.0.1", 8080),
                connection_id=7, start_time_ns=1_700_000_000_000_000_000)
    base.update(kw)
    return StreamInfo(**base)


REQ = [(":method", "GET"), (":path", "/hello?x=1"), (":authority", "example.com"),
       (":scheme", "http"), ("user-agent", "t"), ("x-a", "1")]


async def body_iter(*chunks: bytes):
    for c in chunks:
        yield c


async def collect(body) -> bytes:
    if body is None:
        return b""
    out = b""
    async for c in body:
        out += c
    return out



class TrailerBody:
    """A body iterator carrying HTTP/1.1 chunked trailers, as the gateway hands them over:
    ``trailers`` is read once the iterator is exhausted."""

    def __init__(self, chunks: list[bytes], trailers: list[tuple[str, str]]):
        self._chunks = list(chunks)
        self._final = trailers
        self.trailers = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            self.trailers = self._final
            raise StopAsyncIteration
        return self._chunks.pop(0)


async def rebuilt(f, within_s: float = 10.0) -> None:
    """Wait until filter ``f`` has a live instance again: instances are rebuilt off the event
    loop after a failure, so the request right after a trap may still find none."""
    import asyncio
    import time
    deadline = time.monotonic() + within_s
    while f.instance is None:
        assert time.monotonic() < deadline, f"filter {f.name!r} not rebuilt within {within_s} s"
        if f.building is not None:
            await asyncio.wait_for(asyncio.shield(f.building), deadline - time.monotonic())
        else:
            await asyncio.sleep(0.001)     # the rebuild is due (backoff timer): let it start


def on_threads(fn, n: int) -> None:
    """Run ``fn`` on ``n`` threads at once, switching between them as often as the interpreter
    can (so an unlocked read-modify-write would race), and wait for all."""
    import sys
    import threading
    threads = [threading.Thread(target=fn) for _ in range(n)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)


# -- the differential store tests (one store path against another, operation by operation) --
CREATE_IF_ABSENT = 0xFFFFFFFF
STORE_OPS = ["get", "set", "set_ttl", "cas_ttl", "stale_cas", "create", "expire"]


def store_op(s, op: str, key: bytes, val: bytes, n: int, stale_cas: int):
    """What store ``s`` answers to one of STORE_OPS on ``key``: a get, a plain set, an expiring
    set (ttl 1 + n), a CAS write of the current entry (create-if-absent when there is none), a
    write with an older cas ``stale_cas`` (ttl n, so 0 deletes), a create-if-absent, and an
    expire-at-once delete of the current entry. Every op reads the key first, as a filter's
    read-modify-write does."""
    cur = s.get(key)
    if op == "get":
        return cur
    if op == "set":
        return s.set(key, val, 0)
    if op == "set_ttl":
        return s.set(key, val, 0, 1 + n)
    if op == "cas_ttl":
        return s.set(key, val, cur[1] if cur else CREATE_IF_ABSENT, 1 + n % 40)
    if op == "stale_cas":
        return s.set(key, val, stale_cas, n)
    if op == "create":
        return s.set(key, val, CREATE_IF_ABSENT, 1 + n)
    assert op == "expire", op
    return s.set(key, b"", cur[1] if cur else 0, 0)
