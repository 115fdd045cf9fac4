"""Two connections spliced byte for byte: a WebSocket (or any upgraded) connection after its 101.

The gateway does not read the new protocol: whatever one side sends, the other gets, until
either side closes (FIN or reset) or nothing moves either way for the idle timeout. Then both
connections are closed — gracefully (what was read is still delivered) when a side ended, aborted
on a timeout. Each direction reads only while the other side takes what it was given, so a
peer that stops reading holds at most one buffer of the other's data (and at most
``send_timeout_s`` of our patience).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .watchdog import Watchdog

_READ = 65536
_HIGH_WATER = 65536


@dataclass
class Spliced:
    """What went through a tunnel and why it ended."""
    client_to_upstream: int = 0
    upstream_to_client: int = 0
    reason: str = ""                # client_closed | upstream_closed | idle_timeout | send_timeout

    @property
    def graceful(self) -> bool:
        """A side ended it (rather than a timeout): what was read is still delivered."""
        return self.reason in ("client_closed", "upstream_closed")


async def splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter], client_pending: bytes,
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], idle_timeout_s: float,
                 send_timeout_s: float) -> Spliced:
    """Copy both ways until one side ends; ``client_pending``: bytes the client sent right after
    its request head (read already), delivered first. Leaves both writers closed or aborted."""
    loop = asyncio.get_running_loop()
    result = Spliced()
    idle = loop.create_future()

    def expired() -> None:
        if not idle.done():
            idle.set_result(None)

    watchdog = Watchdog(loop, idle_timeout_s, expired)
    watchdog.arm(idle_timeout_s)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes,
                   outbound: bool) -> str:
        transport = writer.transport
        data = first
        while True:
            if data:
                writer.write(data)
                if outbound:
                    result.client_to_upstream += len(data)
                else:
                    result.upstream_to_client += len(data)
                watchdog.arm(idle_timeout_s)
                if transport.get_write_buffer_size() > _HIGH_WATER:
                    try:
                        await asyncio.wait_for(writer.drain(), send_timeout_s)
                    except asyncio.TimeoutError:
                        return "send_timeout"
                    except ConnectionError:
                        return "upstream_closed" if outbound else "client_closed"
            try:
                data = await reader.read(_READ)
            except ConnectionError:
                data = b""
            if not data:
                return "client_closed" if outbound else "upstream_closed"

    up = asyncio.ensure_future(pump(client[0], upstream[1], client_pending, True))
    down = asyncio.ensure_future(pump(upstream[0], client[1], b"", False))
    try:
        done, _ = await asyncio.wait((up, down, idle), return_when=asyncio.FIRST_COMPLETED)
        if idle in done:
            result.reason = "idle_timeout"
        else:
            result.reason = (up if up in done else down).result()
    finally:
        watchdog.close()
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for _, writer in (client, upstream):
            if result.graceful:
                writer.transport.close()        # what the other side sent still goes out
            else:
                writer.transport.abort()
    return result
