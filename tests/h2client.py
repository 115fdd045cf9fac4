"""A small real HTTP/2 client for tests (python-hyper's h2 over an asyncio connection).

httpx drives ordinary requests; this one is for what a client library hides: stream ids,
windows, RST_STREAM, GOAWAY, trailers, and bytes no library would send (``send_raw``)::

    async with RawH2.connect(port) as c:
        sid = c.request("GET", "/x", authority="h")
        await c.wait(lambda: c.streams[sid].ended)
        assert c.streams[sid].status == 200
"""
from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class GoAway:
    error_code: int
    last_stream_id: int


@dataclass
class StreamState:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] | None = None
    ended: bool = False
    reset: int | None = None           # error code of a RST_STREAM from the server

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class RawH2:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ack_data: bool):
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
        self.streams: dict[int, StreamState] = {}
        self.goaway: GoAway | None = None
        self.remote_settings: dict[int, int] = {}
        self.closed = False             # the server closed the TCP connection
        self.ack_data = ack_data        # hand the window back as data arrives
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int, *, ack_data: bool = True, settings: dict | None = None,
                      preface: bool = True) -> AsyncIterator["RawH2"]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # As curl and browsers: without it Nagle holds each write behind the last one's ACK.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = cls(reader, writer, ack_data)
        if preface:
            if settings:
                c.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings)
            c.h2.initiate_connection()
            c.flush()
        c._task = asyncio.ensure_future(c._read())
        try:
            yield c
        finally:
            c._task.cancel()
            writer.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, method: str, path: str, *, authority: str = "gw.test", headers: list | None = None,
                body: bytes | None = None, end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        head = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]
        self.streams[sid] = StreamState()
        self.h2.send_headers(sid, head + list(headers or []), end_stream=end and not body)
        if body:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def send_body(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow now; returns how much went."""
        sent = 0
        while sent < len(data):
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(data) - sent)
            if n <= 0:
                break
            self.h2.send_data(sid, bytes(data[sent:sent + n]), end_stream=end and sent + n == len(data))
            sent += n
        self.flush()
        return sent

    async def send_all(self, sid: int, data: bytes, end: bool = True, timeout: float = 30) -> None:
        data = memoryview(data)         # no copy of the rest per window update
        sent = 0
        while sent < len(data):
            sent += self.send_body(sid, data[sent:], end=end)
            if sent < len(data):
                await self.wait(lambda: self.h2.local_flow_control_window(sid) > 0, timeout)
        if not data and end:
            self.h2.end_stream(sid)
            self.flush()

    async def wait(self, cond: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self._changed.clear()
                await self._changed.wait()

    async def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                buf += data
                data, buf = self._without_graceful_goaway(buf)
                for ev in self.h2.receive_data(data):
                    self._on(ev)
                self.flush()
                self._changed.set()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        self.closed = True
        self._changed.set()

    def _without_graceful_goaway(self, buf: bytes) -> tuple[bytes, bytes]:
        """Whole frames of ``buf`` (and the rest), a GOAWAY(NO_ERROR) taken out and recorded:
        h2 (as a client) refuses every frame after a GOAWAY, while a server still answers the
        streams up to its last_stream_id — which is what the drain test needs to see."""
        out, i = [], 0
        while len(buf) - i >= 9:
            n = int.from_bytes(buf[i:i + 3], "big")
            if len(buf) - i < 9 + n:
                break
            frame = buf[i:i + 9 + n]
            if frame[3] == 0x7 and int.from_bytes(frame[13:17], "big") == 0:
                self.goaway = GoAway(0, int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF)
            else:
                out.append(frame)
            i += 9 + n
        return b"".join(out), buf[i:]

    def _on(self, ev) -> None:
        st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, h2.events.ResponseReceived):
            st.headers = [(n, v) for n, v in ev.headers if not n.startswith(":")]
            st.status = int(dict(ev.headers)[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            st.data += ev.data
            if self.ack_data:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            st.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            st.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            if st is not None:
                st.reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = GoAway(ev.error_code, ev.last_stream_id)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.remote_settings.update({k: v.new_value for k, v in ev.changed_settings.items()})
