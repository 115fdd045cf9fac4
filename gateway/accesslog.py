"""One JSON line per request, buffered and flushed a few times a second (never per request)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO
from urllib.parse import unquote_plus

_FLUSH_S = 0.2
# The line is formatted by hand: json.dumps costs several µs per request on the hot path.
# Strings go through json's C string escaper, so the output is still strict JSON.
_q = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]


# Workers share one log file or pipe: each write() must hold whole lines, and a pipe only
# keeps writes of up to PIPE_BUF bytes from interleaving.
_BATCH = 4096


class AccessLog:
    def __init__(self, path: str | None, redact_query_params: tuple[str, ...] = ()):
        self.enabled = path is not None
        # Credentials a client may put in the query (the auth filter reads api_key /
        # access_token there) must not end up in log files.
        self._redact = frozenset(redact_query_params)
        self._own = False
        self._out: IO[str] | None = None
        self._fd: int | None = None
        if path == "-":
            try:
                self._fd = sys.stdout.fileno()
                sys.stdout.flush()
            except (AttributeError, OSError, ValueError):
                self._out = sys.stdout          # a replaced stdout (e.g. under a test runner)
        elif path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._own = True
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pid = os.getpid()
        self._sec = -1
        self._sec_text = ""

    def _time(self, now: float) -> str:
        # Formatting a timestamp costs more than the rest of the line; reuse it within a second.
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._sec_text}.{int((now - sec) * 1000):03d}Z"

    def write(self, *, request_id: str, client: str, method: str, path: str, status: int,
              bytes_in: int, bytes_out: int, route: str, upstream: str, duration_ms: float,
              error: str = "", filters: str = "") -> None:
        if not self.enabled:
            return
        if self._redact and "?" in path:
            path = redact_query(path, self._redact)
        line = (f'{{"time":"{self._time(time.time())}","request_id":{_q(request_id)},"client":{_q(client)},'
                f'"method":{_q(method)},"path":{_q(path)},"status":{int(status)},"bytes_in":{int(bytes_in)},'
                f'"bytes_out":{int(bytes_out)},"route":{_q(route)},"upstream":{_q(upstream)},'
                f'"duration_ms":{duration_ms:.3f},"worker":{self._pid}')
        if filters:
            line = f'{line},"filters":{_q(filters)}'
        self._pending.append(f'{line},"error":{_q(error)}}}' if error else line + "}")
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(_FLUSH_S, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            if self._fd is not None:
                _write_batches(self._fd, lines)
            elif self._out is not None:
                self._out.write("\n".join(lines) + "\n")
                self._out.flush()
        except (OSError, ValueError):
            pass    # a closed stdout must not take requests down with it

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._own and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def redact_query(target: str, names: frozenset[str]) -> str:
    """``target`` with the values of the named query parameters replaced by "[redacted]"."""
    path, _, query = target.partition("?")
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, _ = part.partition("=")
        if eq and unquote_plus(name) in names:
            parts[i] = f"{name}=[redacted]"
            changed = True
    return f"{path}?{'&'.join(parts)}" if changed else target


def _write_batches(fd: int, lines: list[str]) -> None:
    batch: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode() + b"\n"
        if batch and size + len(data) > _BATCH:
            _write_all(fd, b"".join(batch))
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        _write_all(fd, b"".join(batch))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
