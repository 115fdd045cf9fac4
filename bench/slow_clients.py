"""The slow-client attack, against wasmgate and against nginx with the same limits.

    python -m bench.slow_clients [--seconds 20] [--uploaders 300] [--readers 300]

An nginx upstream serves `/small` (a few bytes) and `/big` (4 MiB) on 127.0.0.1. Against each
proxy in turn, for ``--seconds``:

- slow uploaders send a request head with `Content-Length: 1000`, then one body byte every
  ``--trickle`` seconds; when the proxy answers or closes, they reconnect and start over;
- slow readers request `/big` and read 1 KiB every 10 s; when closed, they reconnect;
- a normal client (4 keep-alive connections) requests `/small` back to back.

Both proxies have one upstream cluster of 256 connections and the same time limits (client
header 10 s, client body idle 5 s, send 10 s, upstream read 60 s). Printed per proxy: the
normal client's requests, success rate, p50/p99 latency, before and during the attack, and how
the attackers' connections ended (answered, closed by the proxy, still open at the end).

Bounded: loopback only, every connection closed at the end, ≤ 2 × (seconds + 10) s in all.
``--gateway-dir`` runs the gateway from another checkout (e.g. an older commit) for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway_cfg import write_config
from bench.nginx import _config
from bench.procs import Proc, free_port, http_get, stop_all, wait_ready
from bench.tools import ROOT, ensure_tools

BIG = 4 << 20
LIMITS = {"request_header_timeout_s": 10, "request_body_idle_timeout_s": 5, "response_send_timeout_s": 10}

_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        keepalive_timeout 300s;
        location = /small {{ default_type text/plain; return 200 "small\\n"; }}
        location = /big {{ alias {big}; }}
        location / {{ return 200 "ok\\n"; }}
    }}
"""

_PROXY = """\
    client_header_timeout 10s;
    client_body_timeout 5s;
    send_timeout 10s;
    upstream up {{
        server 127.0.0.1:{upstream_port} max_conns=256;
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 60s;
        }}
    }}
"""


def start_nginx(nginx: str, prefix: Path, name: str, body: str, port: int) -> Proc:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_config(prefix, body).replace("worker_connections 4096", "worker_connections 8192"))
    proc = Proc(name, [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                log_path=prefix / "stdout.log")
    wait_ready(f"http://127.0.0.1:{port}/", proc, timeout=10)
    return proc


def gateway_closes(admin: int) -> dict[str, float]:
    """What the gateway counted: slow clients it answered 408 or cut off (GET /metrics)."""
    _, _, body = http_get(f"http://127.0.0.1:{admin}/metrics", timeout=5)
    out = {}
    for line in body.decode().splitlines():
        for kind in ("client_timeout", "client_send_timeout", "client_closed", "upstream_overloaded"):
            if line.startswith(f'wasmgate_errors_total{{kind="{kind}"}}'):
                out[kind] = float(line.split()[-1])
    return out


def start_gateway(scratch: Path, upstream_port: int, port: int, admin: int, gateway_dir: Path) -> Proc:
    cfg = {"listeners": [{"name": "main", "address": "127.0.0.1", "port": port}],
           "admin": {"address": "127.0.0.1", "port": admin},
           "limits": {"drain_timeout_s": 1, **LIMITS},
           "access_log": None,
           "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{upstream_port}"], "max_connections": 256,
                         "response_idle_timeout_ms": 60000}],
           "routes": [{"name": "all", "cluster": "up"}]}
    if gateway_dir != ROOT:        # an older checkout may not know the new keys
        cfg["limits"] = {"drain_timeout_s": 1}
        del cfg["clusters"][0]["response_idle_timeout_ms"]
    path = write_config(scratch / "gateway.yaml", cfg)
    python = gateway_dir / ".venv" / "bin" / "python"
    proc = Proc("gateway", [str(python if python.exists() else sys.executable), "-m", "gateway.cli", "run", "-c",
                            str(path)], cwd=gateway_dir, log_path=scratch / "gateway.log")
    wait_ready(f"http://127.0.0.1:{admin}/ready", proc, timeout=30)
    return proc


class Tally:
    def __init__(self) -> None:
        self.answered = 0       # the proxy sent a response (408, 200, …)
        self.closed = 0         # the proxy closed without (or in the middle of) a response
        self.open = 0


async def _connect(port: int, rcvbuf: int | None = None):
    """A new attacker connection, or None (after a pause) when the proxy refuses it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
    except OSError:
        await asyncio.sleep(0.5)
        return None
    if rcvbuf:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return reader, writer


async def slow_uploader(port: int, stop: asyncio.Event, trickle: float, tally: Tally) -> None:
    while not stop.is_set():
        if (conn := await _connect(port)) is None:
            continue
        reader, writer = conn
        tally.open += 1
        try:
            writer.write(b"POST /small HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000\r\n\r\n")
            got = b""
            while not stop.is_set():
                writer.write(b"x")
                try:
                    got = await asyncio.wait_for(reader.read(4096), trickle)
                    break       # an answer (or the close) came
                except asyncio.TimeoutError:
                    continue
            if not stop.is_set():
                if got.startswith(b"HTTP/"):
                    tally.answered += 1
                else:
                    tally.closed += 1
        except ConnectionError:
            tally.closed += 1
        finally:
            tally.open -= 1
            writer.close()


async def slow_reader(port: int, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        if (conn := await _connect(port, rcvbuf=4096)) is None:
            continue
        reader, writer = conn
        tally.open += 1
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n")
            total = 0
            while not stop.is_set():
                data = await reader.read(1024)
                if not data:
                    tally.closed += 1
                    break
                total += len(data)
                if total >= BIG:
                    tally.answered += 1
                    break
                try:
                    await asyncio.wait_for(stop.wait(), 10)
                except asyncio.TimeoutError:
                    pass
        except ConnectionError:
            tally.closed += 1
        finally:
            tally.open -= 1
            writer.close()


async def normal_client(port: int, stop: asyncio.Event, lat: list[float], fails: list[str]) -> None:
    reader = writer = None
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 5)
            if head.startswith(b"HTTP/1.1 200"):
                lat.append(time.perf_counter() - t0)
            else:
                fails.append(f"{head.split(b' ')[1].decode()} at {time.monotonic() - T0[0]:.1f}s")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, IndexError, ValueError) as e:
            fails.append(f"{type(e).__name__} at {time.monotonic() - T0[0]:.1f}s")
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


T0 = [0.0]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


async def measure(port: int, seconds: float, attack: bool, args) -> dict:
    stop = asyncio.Event()
    lat: list[float] = []
    fails: list[str] = []
    up, rd = Tally(), Tally()
    tasks = []
    T0[0] = time.monotonic()
    if attack:
        tasks += [asyncio.ensure_future(slow_uploader(port, stop, args.trickle, up)) for _ in range(args.uploaders)]
        tasks += [asyncio.ensure_future(slow_reader(port, stop, rd)) for _ in range(args.readers)]
        await asyncio.sleep(2)          # let the attack take hold before measuring
    clients = [asyncio.ensure_future(normal_client(port, stop, lat, fails)) for _ in range(4)]
    await asyncio.sleep(seconds)
    open_up, open_rd = up.open, rd.open
    stop.set()
    await asyncio.wait(clients + tasks, timeout=15)
    for t in tasks + clients:
        t.cancel()
    n = len(lat) + len(fails)
    out = {"requests": n, "ok": len(lat), "success": round(len(lat) / n, 4) if n else None,
           "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "failures": sorted(set(fails))[:5]}
    if attack:
        out["uploaders"] = {"answered": up.answered, "closed": up.closed, "open_at_end": open_up}
        out["readers"] = {"answered": rd.answered, "closed": rd.closed, "open_at_end": open_rd}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="attack duration per proxy (≤ 25)")
    ap.add_argument("--uploaders", type=int, default=300)
    ap.add_argument("--readers", type=int, default=300)
    ap.add_argument("--trickle", type=float, default=6.0, help="seconds between an uploader's bytes")
    ap.add_argument("--only", default="wasmgate,nginx")
    ap.add_argument("--gateway-dir", type=Path, default=ROOT)
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (configs, logs)")
    args = ap.parse_args(argv)
    args.seconds = min(args.seconds, 25.0)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    tools = ensure_tools()
    results = {}
    with tempfile.TemporaryDirectory(prefix="wasmgate-slow-") as tmp:
        scratch = Path(tempfile.mkdtemp(prefix="wasmgate-slow-")) if args.keep else Path(tmp)
        if args.keep:
            print(f"scratch dir: {scratch}")
        (scratch / "big").write_bytes(b"b" * BIG)
        try:
            up_port = free_port()
            start_nginx(tools["nginx"], scratch / "upstream", "upstream",
                        _UPSTREAM.format(port=up_port, big=scratch / "big"), up_port)
            for name in args.only.split(","):
                port = free_port()
                admin = free_port()
                if name == "wasmgate":
                    proc = start_gateway(scratch, up_port, port, admin, args.gateway_dir.resolve())
                else:
                    proc = start_nginx(tools["nginx"], scratch / "proxy", "nginx",
                                       _PROXY.format(port=port, upstream_port=up_port), port)
                try:
                    quiet = asyncio.run(measure(port, min(5.0, args.seconds), False, args))
                    attacked = asyncio.run(measure(port, args.seconds, True, args))
                    if name == "wasmgate":
                        attacked["gateway_counted"] = gateway_closes(admin)
                finally:
                    proc.stop()
                results[name] = {"quiet": quiet, "attack": attacked}
                print(f"{name:9} quiet : {json.dumps(quiet)}")
                print(f"{name:9} attack: {json.dumps(attacked)}", flush=True)
        finally:
            stop_all()
    print(json.dumps({"slow_clients": results, "uploaders": args.uploaders, "readers": args.readers,
                      "seconds": args.seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
