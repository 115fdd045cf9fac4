"""The `rebuild_stall` scenario: does rebuilding one filter's instance stall other routes?

The gateway serves two routes: `/slow` runs tests/conformance/wat/slow_configure.wat, whose
on_configure computes for 1 s and which traps on a request carrying `x-act`; `/other` runs no
filter. An open-loop paced client (bench/paced.py) loads `/other` at a fixed rate twice, in
one gateway process: first with nothing else going on (the baseline), then while a `Trapper`
keeps `/slow` rebuilding — trap it, poll until `/slow` answers 200 again (the new instance
serves), trap again. bench/run.py reports `/other`'s p50/p99 of both runs and their ratio.
"""
from __future__ import annotations

import threading
import time

from bench import gateway_cfg as gcfg
from bench.procs import http_get
from bench.tools import ROOT

SLOW_WAT = ROOT / "tests" / "conformance" / "wat" / "slow_configure.wat"
CONFIGURE_MS = 1000          # the slow filter's on_configure, in ms of computing
RATE = 1000                  # /other, requests per second (open loop)
CONNECTIONS = 16
POLL_S = 0.01                # how often the trapper asks /slow whether it is back


def config(*, port: int, admin_port: int, upstream_port: int) -> dict:
    cfg = gcfg.gateway_config(port=port, admin_port=admin_port, upstream_port=upstream_port)
    cfg["routes"] = [
        {"name": "slow", "match": {"prefix": "/slow"}, "cluster": "upstream", "filters": ["slow"]},
        {"name": "other", "match": {"prefix": "/other"}, "cluster": "upstream"},
    ]
    cfg["filters"] = [{"name": "slow", "wasm": str(SLOW_WAT), "config": str(CONFIGURE_MS),
                       "failure_policy": "fail_closed"}]
    return cfg


class Trapper(threading.Thread):
    """Keeps the slow filter rebuilding until stopped; counts completed rebuilds and the time
    a rebuild was in flight (trap answered → /slow serves again)."""

    def __init__(self, base_url: str):
        super().__init__(name="rebuild-trapper", daemon=True)
        self.base = base_url
        self.stopping = threading.Event()
        self.rebuilds = 0
        self.rebuilding_s = 0.0
        self.started_at = self.stopped_at = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            while not self.stopping.is_set() and not self.errors:
                self._one_rebuild()
        except Exception as e:           # noqa: BLE001 - reported by the scenario
            self.errors.append(f"{type(e).__name__}: {e}")
        self.stopped_at = time.monotonic()

    def _one_rebuild(self) -> None:
        status, _, body = http_get(f"{self.base}/slow/boom", {"x-act": "1"})
        if status != 503:
            self.errors.append(f"trap request answered {status}: {body[:200]!r}")
            return
        t0 = time.monotonic()
        while not self.stopping.is_set():
            status, _, body = http_get(f"{self.base}/slow/poll")
            if status == 200:
                self.rebuilds += 1
                break
            if status != 503:
                self.errors.append(f"/slow answered {status} during a rebuild: {body[:200]!r}")
                return
            self.stopping.wait(POLL_S)
        self.rebuilding_s += time.monotonic() - t0

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def rebuilding_share(self) -> float:
        span = self.stopped_at - self.started_at
        return round(self.rebuilding_s / span, 3) if span > 0 else 0.0
