"""Writes queued while one event-loop turn runs go out together when it ends.

A send() to a peer that sleeps in epoll pays for waking it, and on a VM that wake-up is an
inter-processor interrupt costing more than the write itself. Written the moment each is ready,
the responses and upstream requests of a busy gateway wake the client's and the upstream's side
once per request, each time after it went back to sleep while the gateway worked on the next
request; queued and written together at the end of the turn, they wake each peer once per turn.
Netty's FlushConsolidationHandler and Envoy's deferred write events do the same. A queued write
waits at most for the rest of the turn (the handlers already runnable), and then for nothing.

The contract: while a transport has bytes queued here, nothing else may write to it, half-close
or close it before ``settle(transport)``; the writers (client_h1, upstream) keep it. A transport
closed or aborted with bytes queued drops them, as its own buffer's would be on abort.
"""
from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger("wasmgate.write_batch")

# Larger writes gain nothing from waiting (their copy costs more than a wake-up) and would hold
# memory outside the transport's flow control. The same bound holds for what one transport
# gathers in a turn: with limits.max_requests_per_io_cycle raised, a client pipelining requests
# the gateway answers itself (401s, 404s) gets many answered in one turn, and its queue is
# written out each time it passes the bound.
MAX_QUEUED = 64 * 1024


class WriteBatch:
    """The writes queued in one event loop's current turn, by transport, in the order made."""
    __slots__ = ("_loop", "_queued", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queued: dict[asyncio.WriteTransport, bytes | bytearray] = {}

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Write ``data`` when this turn ends, after what is queued for ``transport`` already."""
        queued = self._queued
        prior = queued.get(transport)
        if prior is None:
            if len(data) > MAX_QUEUED:
                transport.write(data)
                return
            if not queued:
                self._loop.call_soon(self.flush)
            queued[transport] = data
            return
        # A second write to one transport in a turn: gather in a bytearray, so that n writes
        # copy O(total) bytes, not O(n * total) as `bytes + bytes` would.
        if type(prior) is bytes:
            prior = queued[transport] = bytearray(prior)
        prior += data
        if len(prior) > MAX_QUEUED:
            del queued[transport]       # handed over whole; never touched again
            if not transport.is_closing():
                transport.write(prior)

    def settle(self, transport: asyncio.WriteTransport) -> None:
        """Write what is queued for ``transport`` now: before any other use of it."""
        data = self._queued.pop(transport, None)
        if data is not None and not transport.is_closing():
            transport.write(data)

    def flush(self) -> None:
        queued = self._queued
        if not queued:
            return
        self._queued = {}
        for transport, data in queued.items():
            if transport.is_closing():
                continue
            try:
                transport.write(data)
            except Exception:       # one broken transport must not keep the others' bytes back
                log.exception("writing a queued %d-byte write failed", len(data))


_batches: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch]" = weakref.WeakKeyDictionary()


def batch_for(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    """The loop's batch (one per loop: a worker runs one, tests run one after another)."""
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = WriteBatch(loop)
    return batch
