"""Run real .wasm filters in-process, no sockets: the engine, limits and filter chain the
gateway runs (``abi.api``), driven one request at a time from Python.

    f = load_filter("x.wasm", config={"greeting": "hi"})
    r = f.request("POST", "/p", headers={"x-a": "1"}, body=[b"a", b"b"])
    r.local_reply            # Reply(status, headers, body, details), or None
    r.upstream_request       # what the upstream would see (method, path, headers, body), or None
    resp = r.respond(200, headers={"x-up": "1"}, body=b"hello")   # the response as returned
    f.tick(); f.logs; f.metrics; f.host_calls; f.close()

Every call is synchronous: the harness owns a private event loop and runs each phase on it to
completion (callouts answered by ``on_http_call`` included), so tests are plain functions.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, Union

from abi.api import (CallFailed, CallResponse, FilterLimits, FilterLoadError, FilterSpec, Forward, LocalReply,
                     LocalReplyInterrupt, LogInfo, StreamInfo, create_local_store, load_filter_host)

__all__ = ["load_filter", "load_chain", "FilterHarness", "Exchange", "Reply", "UpstreamRequest",
           "Response", "HttpCall", "HostCall", "Log", "CallFailed", "HarnessError", "HeaderList"]

HeadersIn = Union[Mapping[str, str], Iterable[tuple[str, str]], None]
BodyIn = Union[bytes, str, Sequence[bytes], None]
# What an on_http_call handler may return: (status, headers, body), a bare status, or a
# CallResponse; None (or raising CallFailed) fails the call as a refused connection would.
CallAnswer = Union[CallResponse, tuple, int, None]

_STATUS = {0: "OK", 1: "NotFound", 2: "BadArgument", 3: "SerializationFailure", 4: "ParseFailure",
           5: "BadExpression", 6: "InvalidMemoryAccess", 7: "Empty", 8: "CasMismatch",
           9: "ResultMismatch", 10: "InternalFailure", 11: "BrokenConnection", 12: "Unimplemented"}
_LEVELS = {"trace": 5, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_PROM_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_ids = count(1)
# Compiling a module can take seconds on a busy machine (the engine caches it on disk after).
LOAD_TIMEOUT_S = 120.0


class HarnessError(Exception):
    """The test drove the filter into something the harness cannot complete (a request paused
    for good, an http_call nobody answers); the message says what."""


class HeaderList(list):
    """Headers as ``[(name, value), ...]`` (lower-case names), with lookups by name."""

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self if k == name), default)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self if k == name]

    def __getitem__(self, key):                       # h["x-a"] by name, h[0] by position
        if isinstance(key, str):
            value = self.get(key)
            if value is None:
                raise KeyError(key)
            return value
        return super().__getitem__(key)

    def __contains__(self, item) -> bool:             # "x-a" in h
        if isinstance(item, str):
            return self.get(item) is not None
        return super().__contains__(item)


@dataclass
class Reply:
    """A local reply: a filter answered the request itself (or failed closed: 503)."""
    status: int
    headers: HeaderList
    body: bytes
    details: str = ""


@dataclass
class UpstreamRequest:
    """The request as the upstream would receive it, after every filter."""
    method: str
    path: str
    authority: str
    headers: HeaderList          # without pseudo-headers
    body: bytes


@dataclass
class Response:
    """The response as the client would receive it, after every filter."""
    status: int
    headers: HeaderList          # without :status
    body: bytes
    trailers: HeaderList = field(default_factory=HeaderList)
    local_reply: Reply | None = None   # set when a filter replaced the response with its own


@dataclass
class HttpCall:
    """One proxy_http_call a filter made (what it would send to the cluster)."""
    cluster: str
    method: str
    path: str
    authority: str
    headers: HeaderList
    body: bytes
    timeout_s: float | None
    outcome: str = ""            # "200, 5 bytes" | "failed: <reason>", once answered


@dataclass
class HostCall:
    filter: str
    name: str
    status: str                  # "OK", "NotFound", ... ("-" for calls without a result)


@dataclass
class Log:
    level: str                   # "debug" | "info" | "warning" | "error" | "critical"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


@dataclass
class Timing:
    """One guest callback: how long it ran and the host calls it made meanwhile."""
    filter: str
    callback: str
    us: float
    host_calls: list[HostCall] = field(default_factory=list)


def _headers(h: HeadersIn) -> list[tuple[str, str]]:
    items = h.items() if isinstance(h, Mapping) else (h or [])
    return [(str(k).lower(), str(v)) for k, v in items]


def _chunks(body: BodyIn) -> list[bytes]:
    if body is None:
        return []
    if isinstance(body, str):
        return [body.encode()]
    if isinstance(body, (bytes, bytearray)):
        return [bytes(body)]
    return [c.encode() if isinstance(c, str) else bytes(c) for c in body]


def _framed(headers: list[tuple[str, str]], chunks: list[bytes]) -> list[tuple[str, str]]:
    """Content-Length added as a client (or an upstream) would send it, unless chunked."""
    if chunks and not any(k in ("content-length", "transfer-encoding") for k, _ in headers):
        headers = headers + [("content-length", str(sum(map(len, chunks))))]
    return headers


def encode_config(config: Any) -> bytes:
    """A filter configuration as the gateway encodes the `config:` of a filter entry: a string
    as is, a mapping or list as compact JSON."""
    if config is None:
        return b""
    if isinstance(config, bytes):
        return config
    if isinstance(config, str):
        return config.encode()
    return json.dumps(config, separators=(",", ":")).encode()


class _Body:
    """A request/response body iterator as the gateway hands one to the chain."""

    def __init__(self, chunks: list[bytes], trailers: list[tuple[str, str]] | None):
        self._chunks = iter(chunks)
        self.trailers = trailers or None
        self.done = False

    def __aiter__(self) -> "_Body":
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self.done = True
            raise StopAsyncIteration from None


class _LogCapture(logging.Handler):
    def __init__(self, sink: list[Log]):
        super().__init__(logging.NOTSET)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        level = "trace" if record.levelno < logging.DEBUG else record.levelname.lower()
        self.sink.append(Log(level, record.getMessage()))


class _Services:
    """The HostServices (and HostObserver) of a harness: http_call answered by a callable,
    logs and host calls recorded, a clock the test moves, ticks on demand."""
    manual_ticks = True

    def __init__(self, harness: "FilterHarness", clusters: Iterable[str] | None, log_level: str):
        self.h = harness
        self.clusters = set(clusters) if clusters is not None else None
        self.log = logging.getLogger(f"wasmgate.harness.{next(_ids)}")
        self.log.propagate = False
        self.log.setLevel(_LEVELS[log_level.lower()])
        self.log.addHandler(_LogCapture(harness.logs))
        self.shared_store = create_local_store(16 * 1024 * 1024)
        self.observer = self
        self.offset_ns = 0
        self.pending: list[HostCall] = []     # host calls of the guest call running now

    # HostObserver
    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def host_call(self, filter_name: str, name: str, result: int | None, ns: int) -> None:
        if name.startswith("proxy_"):
            status = "-" if result is None else _STATUS.get(result, str(result))
        else:                                        # WASI: an errno
            status = "-" if result is None else ("OK" if result == 0 else f"errno {result}")
        call = HostCall(filter_name, name, status)
        self.h.host_calls.append(call)
        self.pending.append(call)

    def guest_call(self, filter_name: str, name: str, ns: int) -> None:
        made, self.pending = self.pending, []
        self.h.timings.append(Timing(filter_name, name, ns / 1000, made))

    # HostServices
    def has_cluster(self, name: str) -> bool:
        return self.clusters is None or name in self.clusters

    async def http_call(self, cluster, method, path, authority, headers, body, timeout_s,
                        reserve=None) -> CallResponse:
        call = HttpCall(cluster, method, path, authority, HeaderList(headers), body, timeout_s)
        self.h.http_calls.append(call)
        handler = self.h.on_http_call
        if handler is None:
            self.h.errors.append(f"the filter called cluster {cluster!r} ({method} {path}) but no "
                                 "on_http_call handler answers http calls")
            raise CallFailed("no on_http_call handler")
        try:
            answer = handler(call)
            if inspect.isawaitable(answer):
                answer = await answer
            response = _call_response(answer)
        except CallFailed as e:
            call.outcome = f"failed: {e.reason}"
            raise
        call.outcome = f"{response.status}, {len(response.body)} bytes"
        return response


def _call_response(answer: CallAnswer) -> CallResponse:
    if answer is None:
        raise CallFailed("refused (on_http_call returned None)")
    if isinstance(answer, CallResponse):
        return answer
    if isinstance(answer, int):
        return CallResponse(answer, [], b"")
    status, *rest = answer
    headers = _headers(rest[0]) if rest else []
    body = b"".join(_chunks(rest[1])) if len(rest) > 1 else b""
    return CallResponse(int(status), headers, body)


class Exchange:
    """One request through the filters. ``local_reply`` or ``upstream_request`` is set."""

    def __init__(self, harness: "FilterHarness", stream, method: str, path: str):
        self._h = harness
        self._stream = stream
        self.method = method
        self.path = path
        self.local_reply: Reply | None = None
        self.upstream_request: UpstreamRequest | None = None
        self.response: Response | None = None
        self._finished = False

    @property
    def forwarded(self) -> bool:
        return self.upstream_request is not None

    def respond(self, status: int = 200, headers: HeadersIn = None, body: BodyIn = None,
                trailers: HeadersIn = None, timeout_s: float | None = None) -> Response:
        """The upstream answers: run the response phase; returns what the client receives."""
        if self.upstream_request is None:
            raise HarnessError(f"the request got a local reply ({self.local_reply.status}); "
                               "there is no upstream response to give")
        if self.response is not None:
            raise HarnessError("respond() was already called for this request")
        chunks = _chunks(body)
        hdrs = [(":status", str(status))] + _framed(_headers(headers), chunks)
        body_it = _Body(chunks, _headers(trailers)) if chunks or trailers else None
        self.response = self._h._run(self._response(status, hdrs, body_it), timeout_s)
        return self.response

    async def _response(self, status: int, hdrs, body_it) -> Response:
        try:
            try:
                result = await self._stream.response(status, hdrs, body_it)
                if isinstance(result, Forward):
                    data = await _read(result.body)
            except LocalReplyInterrupt as e:
                result = e.reply
            if isinstance(result, LocalReply):
                reply = _reply(result)
                return Response(reply.status, reply.headers, reply.body, local_reply=reply)
            st = next((int(v) for k, v in result.headers if k == ":status"), status)
            rest = HeaderList((k, v) for k, v in result.headers if not k.startswith(":"))
            trailers = HeaderList(getattr(result.body, "trailers", None) or [])
            return Response(st, rest, data, trailers)
        finally:
            await self._finish(status)

    async def _finish(self, status: int) -> None:
        if not self._finished:
            self._finished = True
            await self._stream.finish(LogInfo(status=status))
            self._h._open.discard(self)

    def __repr__(self) -> str:
        what = (f"local_reply={self.local_reply}" if self.local_reply
                else f"upstream_request={self.upstream_request}")
        return f"<Exchange {self.method} {self.path} {what}>"


async def _read(body) -> bytes:
    if body is None:
        return b""
    return b"".join([chunk async for chunk in body])


def _reply(r: LocalReply) -> Reply:
    return Reply(r.status, HeaderList(r.headers), r.body, r.details)


class FilterHarness:
    """A chain of one or more loaded filters. Use load_filter / load_chain to make one."""

    def __init__(self, specs: list[FilterSpec], *, on_http_call: Callable[[HttpCall], CallAnswer
                 | Awaitable[CallAnswer]] | None = None, clusters: Iterable[str] | None = None,
                 log_level: str = "info", timeout_s: float = 10.0):
        self.logs: list[Log] = []
        self.host_calls: list[HostCall] = []
        self.timings: list[Timing] = []
        self.http_calls: list[HttpCall] = []
        self.errors: list[str] = []
        self.on_http_call = on_http_call
        self.timeout_s = timeout_s
        self.names = [s.name for s in specs]
        self._open: set[Exchange] = set()
        self._requests = count(1)
        self._loop = asyncio.new_event_loop()
        self._services = _Services(self, clusters, log_level)
        self._host = None
        try:
            self._host = self._run(load_filter_host(specs, self._services), LOAD_TIMEOUT_S)
        except FilterLoadError as e:
            self._loop.close()
            # The reason is usually what the filter logged (a bad configuration): keep it.
            said = [f"  {log}" for log in self.logs if log.level in ("warning", "error", "critical")]
            raise FilterLoadError(e.filter_name, "\n".join([e.message] + said)) from None
        except BaseException:
            self._loop.close()
            raise

    # -- running -----------------------------------------------------------------------------

    def _run(self, coro, timeout_s: float | None):
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
        except asyncio.TimeoutError:
            raise HarnessError(f"the filters did not finish within {limit:g} s (a request "
                               "paused and never resumed?)") from None
        finally:
            if self.errors:
                errors, self.errors = self.errors, []
                raise HarnessError("; ".join(errors))

    def request(self, method: str = "GET", path: str = "/", headers: HeadersIn = None,
                body: BodyIn = None, *, trailers: HeadersIn = None, authority: str = "example.com",
                scheme: str = "http", client: tuple[str, int] = ("127.0.0.1", 50000),
                timeout_s: float | None = None) -> Exchange:
        """Send a request through the filters (body: bytes, str, or a list of chunks, each
        delivered as its own on_request_body). Content-Length is added unless given or chunked."""
        n = next(self._requests)
        info = StreamInfo(request_id=f"req-{n}", route_name="try", cluster_name="upstream",
                          client_addr=client, local_addr=("127.0.0.1", 8080), connection_id=n,
                          scheme=scheme, start_time_ns=time.time_ns())
        stream = self._host.stream(self.names, info)
        ex = Exchange(self, stream, method, path)
        self._open.add(ex)
        chunks = _chunks(body)
        hdrs = [(":method", method), (":path", path), (":authority", authority), (":scheme", scheme)]
        hdrs += _framed(_headers(headers), chunks)
        body_it = _Body(chunks, _headers(trailers)) if chunks or trailers else None
        self._run(self._request(ex, hdrs, body_it), timeout_s)
        return ex

    async def _request(self, ex: Exchange, hdrs, body_it) -> None:
        try:
            result = await ex._stream.request(hdrs, body_it)
            if isinstance(result, Forward):
                data = await _read(result.body)
        except LocalReplyInterrupt as e:
            result = e.reply
        if isinstance(result, LocalReply):
            ex.local_reply = _reply(result)
            await ex._finish(result.status)
            return
        pseudo = dict((k, v) for k, v in result.headers if k.startswith(":"))
        ex.upstream_request = UpstreamRequest(
            pseudo.get(":method", ex.method), pseudo.get(":path", ex.path),
            pseudo.get(":authority", ""),
            HeaderList((k, v) for k, v in result.headers if not k.startswith(":")), data)

    def tick(self, filter_name: str | None = None) -> bool:
        """Deliver one proxy_on_tick to each filter that set a tick period (or to the one named);
        True when some filter got one. Ticks never fire by themselves in the harness."""
        names = [filter_name] if filter_name else self.names
        return any([self._run(self._tick(n), None) for n in names])

    async def _tick(self, name: str) -> bool:
        return self._host.tick(name)

    def advance(self, seconds: float) -> None:
        """Move the filters' clock (proxy_get_current_time_nanoseconds) forward."""
        self._services.offset_ns += int(seconds * 1e9)

    @property
    def metrics(self) -> dict[str, float]:
        """Filter-defined metrics by the name the filter gave them ("ratelimit.x.denied");
        histograms as their _count and _sum."""
        out = {}
        for s in self._host.metrics():
            if s.help.startswith("wasm metric ") and not s.labels:
                name = s.help[len("wasm metric "):]
                suffix = s.name[len(_PROM_BAD.sub("_", "wasmcustom_" + name)):]
                out[name + suffix] = s.value
        return out

    @property
    def log_text(self) -> str:
        return "\n".join(map(str, self.logs))

    def close(self) -> None:
        """Finish open requests (on_done/on_log/on_delete), then close the filters."""
        if self._loop.is_closed():
            return
        try:
            for ex in list(self._open):
                self._run(ex._finish(0), None)
            if self._host is not None:
                self._run(self._host.close(), None)
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def __enter__(self) -> "FilterHarness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spec(name: str, wasm: str | Path, config: Any, *, vm_config: Any = None, root_id: str = "",
          failure_policy: str = "fail_closed", limits: FilterLimits | None = None,
          deliver_body_while_paused: bool = False,
          environment: Mapping[str, str] | None = None) -> FilterSpec:
    return FilterSpec(name=name, wasm_path=Path(wasm), configuration=encode_config(config),
                      vm_configuration=encode_config(vm_config), failure_policy=failure_policy,
                      limits=limits or FilterLimits(),
                      environment=tuple((environment or {}).items()),
                      deliver_body_while_paused=deliver_body_while_paused, root_id=root_id)


def load_filter(wasm: str | Path, config: Any = None, *, name: str | None = None,
                on_http_call=None, clusters: Iterable[str] | None = None, log_level: str = "info",
                timeout_s: float = 10.0, **options) -> FilterHarness:
    """Load one filter as a `filters:` entry would: ``config`` as its `config:` (a mapping
    is sent as JSON, a string as is); ``options``: vm_config, root_id, failure_policy,
    limits (abi.api.FilterLimits), deliver_body_while_paused, environment.
    Raises abi.api.FilterLoadError when the gateway would refuse to load it."""
    spec = _spec(name or Path(wasm).stem, wasm, config, **options)
    return FilterHarness([spec], on_http_call=on_http_call, clusters=clusters,
                         log_level=log_level, timeout_s=timeout_s)


def load_chain(filters: Sequence[str | Path | tuple], *, on_http_call=None,
               clusters: Iterable[str] | None = None, log_level: str = "info",
               timeout_s: float = 10.0) -> FilterHarness:
    """Several filters in chain order: each item a path, or (path, config), or
    (path, config, {options}). Names are the file stems (repeats get "#2", "#3")."""
    specs, seen = [], {}
    for item in filters:
        wasm, config, options = (item, None, {}) if isinstance(item, (str, Path)) else \
            (tuple(item) + (None, {}))[:3]
        stem = Path(wasm).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}#{seen[stem]}"
        specs.append(_spec(name, wasm, config, **(options or {})))
    return FilterHarness(specs, on_http_call=on_http_call, clusters=clusters,
                         log_level=log_level, timeout_s=timeout_s)
