"""The audit trail: one JSON line per filter lifecycle event (``audit_log: {path: …}``).

Events: ``load`` (at start, or a filter a reload adds), ``reload`` (a reload replaced it),
``rebuild`` (a new instance after a failure), ``refuse`` (it could not be fetched, verified,
loaded or configured: the start or the reload was refused), ``unload`` (a reload removed it,
or the gateway stopped). Each line says which binary ran with which rights:

    {"time", "event", "filter", "source", "sha256", "capabilities", "readable_properties",
     "config_digest", "outcome": "ok" | "failed", "error"?, "trigger", "admin_client"?,
     "generation", "pid"}

Written synchronously with O_APPEND (events are rare; a line must not be lost to a crash right
after the event), one write() per line, so the workers of one gateway can share the file.
``filter_record`` is also what GET /filters shows per running filter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abi.api import FilterSpec
    from .config import Config

log = logging.getLogger("wasmgate.audit")


def filter_record(config: "Config", spec: "FilterSpec", sha256: str | None) -> dict[str, Any]:
    """Who a filter is: where it came from, which bytes, which rights, which configuration."""
    source = next((s for s in config.filter_sources if s.filter == spec.name), None)
    return {
        "filter": spec.name,
        "source": source.location if source is not None else str(spec.wasm_path),
        "sha256": sha256 or (source.sha256 if source is not None else None),
        "capabilities": "all" if spec.capabilities is None else sorted(spec.capabilities),
        "readable_properties": "all" if spec.readable_properties is None else list(spec.readable_properties),
        "config_digest": hashlib.sha256(spec.configuration).hexdigest(),
    }


class AuditLog:
    def __init__(self, path: str | None):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) if path else None

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def event(self, event: str, config: "Config", spec: "FilterSpec | None", *, filter_name: str = "",
              sha256: str | None = None, outcome: str = "ok", error: str = "", trigger: str,
              admin_client: str = "", generation: int = 0) -> None:
        if self._fd is None:
            return
        line: dict[str, Any] = {"time": _now(), "event": event}
        if spec is not None:
            line.update(filter_record(config, spec, sha256))
        else:
            line["filter"] = filter_name
        line["outcome"] = outcome
        if error:
            line["error"] = error
        line["trigger"] = trigger
        if admin_client:
            line["admin_client"] = admin_client
        line["generation"] = generation
        line["pid"] = os.getpid()
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, data)
        except OSError as e:                  # a full disk must not take the gateway down
            log.error("audit log %s: write failed: %s", self.path, e)

    def filters(self, event: str, config: "Config", digests: dict[str, str], names: list[str] | None = None,
                **kw: Any) -> None:
        """One ``event`` line for each filter of ``config`` (or those in ``names``)."""
        for spec in config.filters:
            if names is None or spec.name in names:
                self.event(event, config, spec, sha256=digests.get(spec.name), **kw)

    def refused(self, config: "Config | None", filter_name: str, error: str, **kw: Any) -> None:
        spec = next((s for s in config.filters if s.name == filter_name), None) if config else None
        self.event("refuse", config, spec, filter_name=filter_name, outcome="failed", error=error, **kw)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
