"""Open-loop, fixed-rate HTTP/1.1 load with latency recording (wrk2 isn't in Debian).

Requests are issued on a fixed schedule (rate r/s) over a pool of keep-alive connections,
whether or not earlier ones have been answered. A request's latency runs from the moment the
client issues it (the scheduler tick at or just after its slot) to the last byte of its
response; a request that finds every connection busy waits in the client queue, and that wait
counts (server slowness). The client's own timer slop (slot → tick, ~≤1 ms, asyncio timer
granularity) is NOT counted but reported as `lag_p99_ms` so you can see the client kept up.

    python -m bench.paced --url http://127.0.0.1:8080/ --rate 2000 --duration 10 [-H 'k: v']
prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import urllib.parse

from bench.procs import wait_seconds

_now = time.perf_counter


class _Conn(asyncio.Protocol):
    def __init__(self, client: "PacedClient"):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.t0 = 0.0
        self.rec = False          # issued inside the recorded window
        self.busy = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        self.client.on_lost(self)

    def send(self, t0: float, rec: bool) -> None:
        self.t0 = t0
        self.rec = rec
        self.busy = True
        self.transport.write(self.client.request_bytes)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.busy:
            done = self._parse()
            if done is None:
                return
            status, close = done
            self.busy = False
            self.client.on_response(self, status, _now() - self.t0, close, self.rec)

    def _parse(self):
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in head[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            v = v.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v:
                chunked = True
            elif k == "connection" and v == "close":
                close = True
        pos = end + 4
        if not chunked:
            if len(buf) < pos + length:
                return None
            del buf[:pos + length]
            return status, close
        while True:  # chunked body
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return None
            size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
            pos = nl + 2
            if size == 0:
                tend = buf.find(b"\r\n\r\n", pos - 2)   # trailers (usually none) + CRLF
                if tend < 0:
                    return None
                del buf[:tend + 4]
                return status, close
            if len(buf) < pos + size + 2:
                return None
            pos += size + 2


class PacedClient:
    def __init__(self, url: str, rate: float, connections: int, headers: dict[str, str]):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {u.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.request_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.rate = rate
        self.n_conns = connections
        self.idle: list[_Conn] = []
        self.pending: collections.deque[tuple[float, bool]] = collections.deque()
        self.latencies: list[float] = []
        self.issued_at: list[float] = []      # with --record: each recorded request's issue time
        self.lags: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors = 0
        self.outstanding = 0
        self.recording = False
        self.reconnects = 0

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.on_free(conn)

    def on_free(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if self.pending:
            conn.send(*self.pending.popleft())
        else:
            self.idle.append(conn)

    def on_response(self, conn: _Conn, status: int, latency: float, close: bool,
                    rec: bool) -> None:
        self.outstanding -= 1
        if rec:
            self.latencies.append(latency)
            self.issued_at.append(conn.t0)
            self.statuses[status] += 1
        if close:
            conn.transport.close()
        else:
            self.on_free(conn)

    def on_lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            conn.busy = False
            self.outstanding -= 1
            if conn.rec:
                self.errors += 1
        self.reconnects += 1
        asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        try:
            await self._open()
        except OSError:
            self.errors += 1

    def _issue(self, t0: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(t0, self.recording)
        else:
            self.pending.append((t0, self.recording))

    async def run(self, duration: float, warmup: float) -> dict:
        await asyncio.gather(*(self._open() for _ in range(self.n_conns)))
        self.reconnects = 0
        start = _now()
        rec_start = start + warmup
        end = rec_start + duration
        interval = 1.0 / self.rate
        slot = 0
        issued_rec = 0
        waited = wait_seconds()     # taken again when recording starts
        while True:
            now = _now()
            if now >= end:
                break
            if not self.recording and now >= rec_start:
                self.recording = True
                waited = wait_seconds()
            while start + slot * interval <= now:
                if self.recording:
                    self.lags.append(now - (start + slot * interval))
                    issued_rec += 1
                self._issue(now)
                slot += 1
            await asyncio.sleep(max(0.0, start + slot * interval - _now()))
        waited = wait_seconds() - waited
        drain_deadline = _now() + 5.0
        while self.outstanding > 0 and _now() < drain_deadline:
            await asyncio.sleep(0.01)
        lat = sorted(self.latencies)
        lags = sorted(self.lags)

        def pct(xs, p):
            return xs[min(len(xs) - 1, int(len(xs) * p / 100))] * 1000 if xs else None

        return {
            "target_rps": self.rate, "duration_s": duration, "connections": self.n_conns,
            "issued": issued_rec, "completed": len(lat),
            "achieved_rps": len(lat) / duration,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors, "unanswered": self.outstanding,
            "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
            "p999_ms": pct(lat, 99.9), "max_ms": lat[-1] * 1000 if lat else None,
            "lag_p99_ms": pct(lags, 99),
            # time this client was runnable but not running (its core busy with other work): each
            # such stall delays the responses it timestamps, so it shows up as latency
            "client_wait_ms_per_s": waited / duration * 1000,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--record", metavar="FILE",
                    help="also write every recorded request as [issued at (time.perf_counter, "
                         "CLOCK_MONOTONIC), latency] in s to FILE (JSON), for bench/tail_probe.py")
    args = ap.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    client = PacedClient(args.url, args.rate, args.connections, headers)
    result = asyncio.run(client.run(args.duration, args.warmup))
    if args.record:
        with open(args.record, "w") as f:
            json.dump(list(zip(client.issued_at, client.latencies)), f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
