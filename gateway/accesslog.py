"""One JSON line per request, buffered and flushed a few times a second (never per request)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO

_FLUSH_S = 0.2
# The line is formatted by hand: json.dumps costs several µs per request on the hot path.
# Strings go through json's C string escaper, so the output is still strict JSON.
_q = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]


class AccessLog:
    def __init__(self, path: str | None):
        self.enabled = path is not None
        self._own = False
        self._out: IO[str] | None = None
        if path == "-":
            self._out = sys.stdout
        elif path is not None:
            self._out = open(path, "a", encoding="utf-8")
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
              error: str = "") -> None:
        if not self.enabled:
            return
        line = (f'{{"time":"{self._time(time.time())}","request_id":{_q(request_id)},"client":{_q(client)},'
                f'"method":{_q(method)},"path":{_q(path)},"status":{int(status)},"bytes_in":{int(bytes_in)},'
                f'"bytes_out":{int(bytes_out)},"route":{_q(route)},"upstream":{_q(upstream)},'
                f'"duration_ms":{duration_ms:.3f},"worker":{self._pid}')
        self._pending.append(f'{line},"error":{_q(error)}}}' if error else line + "}")
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(_FLUSH_S, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._timer = None
        if not self._pending or self._out is None:
            return
        lines, self._pending = self._pending, []
        try:
            self._out.write("\n".join(lines) + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass    # a closed stdout must not take requests down with it

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
            self._out = None
