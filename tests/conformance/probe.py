"""Helpers for the conformance + abuse suite: recording upstream, config building, probe parsing.

Everything runs through real HTTP on 127.0.0.1: a recording upstream (tests.helpers.echo_upstream
with our own handler), the real gateway in-process (tests.helpers.run_gateway) and an aiohttp client.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from tests.conformance import watlib
from tests.helpers import echo_upstream, run_gateway


CALLOUT_DELAY_S = 0.1
BIG_BODY = bytes(range(256)) * (3 * 4096)          # 3 MiB
STREAM_PARTS = [b"part-one;", b"part-two;", b"part-three"]


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def first(self, name: str) -> str | None:
        vals = self.all(name)
        return vals[0] if vals else None


@dataclass
class Recorder:
    port: int = 0
    requests: list[Seen] = field(default_factory=list)

    def main_requests(self) -> list[Seen]:
        return [r for r in self.requests if not r.path.startswith("/callout")]

    def callouts(self) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith("/callout")]


def _handler(rec: Recorder):
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.content.read()   # no client_max_size cap
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        rec.requests.append(Seen(request.method, request.path_qs, headers, body))
        if request.path.startswith("/callout"):
            await asyncio.sleep(CALLOUT_DELAY_S)
            return web.Response(status=201, body=b"callout-ok", headers={"x-callout": "yes"})
        if request.path.startswith("/big"):
            return web.Response(body=BIG_BODY, headers={"x-upstream": "echo"}, content_type="application/octet-stream")
        if request.path.startswith("/slow"):
            await asyncio.sleep(0.5)
            return web.Response(body=b"slow", headers={"x-upstream": "echo"})
        if request.path.startswith("/notmodified"):
            return web.Response(status=304, headers={"x-upstream": "echo", "etag": '"v1"'})
        if request.path.startswith("/nobody"):
            return web.Response(status=204, headers={"x-upstream": "echo"})
        if request.path.rsplit("/", 1)[-1] == "stream":     # /stream, /a/stream
            resp = web.StreamResponse(headers={"x-upstream": "echo", "content-type": "text/plain"})
            await resp.prepare(request)
            for part in STREAM_PARTS:
                await resp.write(part)
                await asyncio.sleep(0.05)
            await resp.write_eof()
            return resp
        payload = {"method": request.method, "path": request.path_qs, "headers": headers,
                   "body": body.decode("latin-1")}
        return web.Response(body=json.dumps(payload).encode(), content_type="application/json",
                            headers={"x-up-replace": "orig", "x-up-remove": "gone", "x-upstream": "echo"})
    return handle


@asynccontextmanager
async def recording_upstream():
    rec = Recorder()
    async with echo_upstream(handler=_handler(rec)) as up:
        rec.port = up.port
        yield rec


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def filter_entry(name: str, wasm: Path, config=None, **extra) -> dict:
    entry = {"name": name, "wasm": str(wasm)}
    if config is not None:
        entry["config"] = config
    entry.update(extra)
    return entry


def gateway_yaml(up_port: int, filters: list[dict], routes: list[dict]) -> str:
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "clusters": [
            {"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]},
            {"name": "callout", "endpoints": [f"127.0.0.1:{up_port}"]},
            {"name": "dead", "endpoints": [f"127.0.0.1:{closed_port()}"], "connect_timeout_ms": 500},
        ],
        "routes": routes,
    }
    if filters:
        doc["filters"] = filters
    return yaml.safe_dump(doc, sort_keys=False)


@asynccontextmanager
async def probe_gateway(tmp_path: Path, up: Recorder, filters: list[dict], routes: list[dict] | None = None):
    if routes is None:
        routes = [{"name": "all", "cluster": "backend", "filters": [f["name"] for f in filters]}]
    async with run_gateway(gateway_yaml(up.port, filters, routes), tmp_path) as gw:
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield gw, session


async def wasmgate_check(cfg: Path) -> tuple[int, str]:
    """Run `wasmgate check <cfg>` as a user would: (exit code, stdout + stderr)."""
    import sys
    root = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "check", str(cfg), cwd=str(root),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, (out + err).decode()


def strict_module(tmp_path: Path, binary: bool = False) -> Path:
    return watlib.build("strict_sdk.wat", tmp_path, binary=binary)


def parse_report(value: str | None) -> dict[str, list[str]]:
    """`k=v;k=v;...` -> {k: [v, ...]}"""
    assert value is not None, "probe report header missing"
    out: dict[str, list[str]] = {}
    for item in value.split(";"):
        if not item:
            continue
        k, _, v = item.partition("=")
        out.setdefault(k, []).append(v)
    return out


def one(rep: dict[str, list[str]], key: str) -> str:
    assert key in rep, f"{key!r} not in report {rep}"
    assert len(rep[key]) == 1, f"{key!r} reported {rep[key]}"
    return rep[key][0]


async def get_trace(session: aiohttp.ClientSession, gw, tag: str, prefix: str = "") -> list[tuple]:
    async with session.get(gw.url(f"{prefix}/__trace/{tag}")) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    events = []
    for tok in text.split():
        name, *args = tok.split(":")
        events.append((name, *args))
    return events


def ints(ev: tuple) -> tuple:
    return (ev[0], *[int(a) for a in ev[1:]])


async def metrics_text(session: aiohttp.ClientSession, gw) -> str:
    async with session.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def samples(text: str) -> list[tuple[str, str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return out


async def wait_for(predicate, timeout: float = 3.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(interval)
