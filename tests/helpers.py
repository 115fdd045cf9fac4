"""Reusable end-to-end helpers: a real upstream echo server and an in-process gateway.

Typical use (everything on 127.0.0.1, ports chosen by the OS)::

    from tests.helpers import echo_upstream, run_gateway

    async def test_something(tmp_path):
        async with echo_upstream() as up:
            yaml_text = f'''
    listeners: [{{name: main, address: 127.0.0.1, port: 0}}]
    admin: {{address: 127.0.0.1, port: 0}}
    access_log: {{path: null}}
    clusters: [{{name: backend, endpoints: ["127.0.0.1:{up.port}"]}}]
    routes: [{{name: all, cluster: backend}}]
    '''
            async with run_gateway(yaml_text, tmp_path) as gw:
                async with aiohttp.ClientSession() as s:
                    async with s.get(gw.url("/hello")) as r:
                        echoed = await r.json()       # what the upstream received
                assert up.requests[-1].path == "/hello"

``run_gateway`` writes the YAML to ``tmp_path/config.yaml`` (so relative ``wasm:`` paths resolve
against ``tmp_path``; pass ``config_dir=`` to resolve them elsewhere, e.g. the repository root),
validates it with the real loader (a bad config raises ``gateway.config.ConfigError``) and starts the
real ``Gateway`` in this event loop. ``filter_host_factory`` lets a test inject a fake FilterHost; by
default the real one (``abi.api.load_filter_host``) is used when the config has filters.

The echo upstream answers every request with JSON::

    {"method", "path" (with query), "headers": [[name, value], ...], "body_length", "body_sha256"}

and records each request in ``up.requests`` (``Received`` objects incl. the raw body when it is at
most ``keep_body_bytes``). Pass ``handler=`` to replace the echo with your own aiohttp handler.

Also here:

* ``raw_upstream(handler)``: an upstream scripted byte by byte (asyncio streams), for resets,
  timeouts, 1xx, trailers, odd framing; ``read_request_head(reader)`` helps its handlers.
* ``raw_exchange(port, data)``: send raw bytes, get everything until the server closes;
  ``split_responses(raw)`` parses concatenated responses (Content-Length or chunked).
* ``run_cli_gateway(config_path, *args)``: ``python -m gateway.cli run`` as a subprocess (e.g.
  ``"--workers", "2"``), waiting for its "listener NAME on http://..." lines; ``.ports``,
  ``.url()``, ``.proc``, ``.output``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_length: int
    body: bytes | None          # None when larger than keep_body_bytes

    def header(self, name: str) -> str | None:
        """First value of a header (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass
class Upstream:
    port: int
    requests: list[Received] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _echo_handler(up: Upstream, keep_body_bytes: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        kept = bytearray()
        # Stream the body so a test can push far more than memory through the echo server.
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
            if length <= keep_body_bytes:
                kept += chunk
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        up.requests.append(Received(request.method, request.path_qs, headers, length,
                                    bytes(kept) if length <= keep_body_bytes else None))
        payload = {"method": request.method, "path": request.path_qs, "headers": headers,
                   "body_length": length, "body_sha256": digest.hexdigest()}
        return web.Response(body=json.dumps(payload).encode(), content_type="application/json")
    return handle


@asynccontextmanager
async def echo_upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
                        *, keep_body_bytes: int = 1 << 20, ssl_context=None) -> AsyncIterator[Upstream]:
    """A real aiohttp server on 127.0.0.1:0 echoing what it received (or running ``handler``);
    HTTPS with ``ssl_context`` (an ``ssl.SSLContext`` for the server side)."""
    up = Upstream(port=0)
    server = web.Server(handler or _echo_handler(up, keep_body_bytes), handler_cancellation=True)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    up.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield up
    finally:
        await runner.cleanup()


def gateway_config(up_port: int, routes: list[dict], filters: list[dict] | None = None, *,
                   drain_timeout_s: float = 5) -> str:
    """Config text for ``run_gateway`` (JSON is YAML): listener "main" and admin on port 0, no
    access log, cluster "backend" on the upstream, these routes and filters."""
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "limits": {"drain_timeout_s": drain_timeout_s},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}],
        "routes": routes,
    }
    if filters:
        doc["filters"] = filters
    return json.dumps(doc, indent=1)


@dataclass
class RunningGateway:
    gateway: object             # gateway.server.Gateway
    config_path: Path

    def url(self, path: str = "/", listener: str = "main") -> str:
        """http://127.0.0.1:<port><path> for a listener (default "main")."""
        port = self.gateway.listener_ports[listener]  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}{path}"

    def port(self, listener: str = "main") -> int:
        return self.gateway.listener_ports[listener]  # type: ignore[attr-defined]

    @property
    def admin_url(self) -> str | None:
        port = self.gateway.admin_port  # type: ignore[attr-defined]
        return None if port is None else f"http://127.0.0.1:{port}"


@asynccontextmanager
async def run_gateway(yaml_text: str, tmp_path: Path, *, filter_host_factory=None,
                      config_dir: Path | None = None, drain_timeout_s: float = 1.0
                      ) -> AsyncIterator[RunningGateway]:
    """Validate ``yaml_text`` with the real loader and run the gateway in-process on its ports."""
    from gateway.config import load_config
    from gateway.server import Gateway

    directory = Path(config_dir) if config_dir is not None else Path(tmp_path)
    path = directory / "config.yaml" if config_dir is None else Path(tmp_path) / "config.yaml"
    path.write_text(yaml_text)
    config = load_config(path, base_dir=directory)
    kwargs = {} if filter_host_factory is None else {"filter_host_factory": filter_host_factory}
    gateway = await Gateway.start(config, **kwargs)
    try:
        yield RunningGateway(gateway, path)
    finally:
        await gateway.stop(drain_timeout_s=drain_timeout_s)


async def until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything received until the server closes
    (or ``timeout`` passes). For malformed-request and smuggling tests no client library allows."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def split_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse concatenated HTTP/1.1 responses with Content-Length or chunked bodies (test use)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    rest = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            raw = rest
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


@asynccontextmanager
async def raw_upstream(handler) -> AsyncIterator[Upstream]:
    """An upstream you script byte by byte: ``async def handler(reader, writer)`` runs per
    connection (asyncio streams). For resets, timeouts, 1xx, odd framing. ``up.requests`` stays
    empty; count connections yourself if needed."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    up = Upstream(port=server.sockets[0].getsockname()[1])
    try:
        yield up
    finally:
        server.close()
        if hasattr(server, "close_clients"):
            server.close_clients()


async def read_chunked_rest(reader) -> bytes:
    """For raw_upstream handlers: a chunked request body after its head, up to and including the
    empty line after the last chunk and its trailers."""
    rest = b""
    while not rest.endswith(b"\r\n\r\n") or b"0\r\n" not in rest:
        data = await reader.read(65536)
        if not data:
            break
        rest += data
    return rest


async def read_request_head(reader) -> bytes:
    """For raw_upstream handlers: one request head (b'' at EOF)."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""


class CliGateway:
    """A `wasmgate run` subprocess; ``ports`` maps listener names (and "admin") to real ports."""

    def __init__(self, proc, ports: dict[str, int]):
        self.proc = proc
        self.ports = ports

    def url(self, path: str = "/", listener: str = "main") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"


@asynccontextmanager
async def run_cli_gateway(config_path: Path, *extra_args: str, startup_timeout: float = 20.0,
                          stop_timeout: float = 20.0) -> AsyncIterator[CliGateway]:
    """Run ``python -m gateway.cli run -c config_path *extra_args`` and wait for its
    "wasmgate: listener NAME on http://HOST:PORT" lines; SIGTERM and wait on exit."""
    import re
    import signal
    import sys
    from gateway.config import load_config
    config = load_config(config_path)
    expected = {lst.name for lst in config.listeners} | ({"admin"} if config.admin else set())
    root = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "-c", str(config_path), *extra_args,
        cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    ports: dict[str, int] = {}
    output: list[str] = []
    try:
        async with asyncio.timeout(startup_timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("gateway exited during start-up:\n" + "".join(output))
                output.append(line)
                m = re.match(r"wasmgate: (?:listener (\S+)|(admin)) on https?://[^:]+:(\d+)", line)
                if m:
                    ports[m.group(1) or "admin"] = int(m.group(3))
                    if set(ports) >= expected:
                        break
        gw = CliGateway(proc, ports)
        gw.output = output  # type: ignore[attr-defined]

        async def pump():
            # Keep reading so the child never blocks on a full pipe; tests may inspect it.
            while line := await proc.stdout.readline():
                output.append(line.decode())
        pump_task = asyncio.ensure_future(pump())
        try:
            yield gw
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(stop_timeout):
                    await proc.wait()
                    await pump_task
            except TimeoutError:
                proc.kill()
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
