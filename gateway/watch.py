"""`--watch`: notice a change to the config file or to a wasm, certificate, key or CA file it
references.

Cheap polling of (mtime, size) — no inotify dependency, and it works on every filesystem. A
change is reported once the files have stayed the same for one more poll, so an editor's
half-written file is not loaded (it would be refused anyway, and reloaded when complete).
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, load_config

Signature = dict[str, tuple[int, int] | None]


class Watcher:
    def __init__(self, config_path: Path):
        self.config_path = Path(config_path)
        self.files = self._referenced_files()
        self.applied = self._signature()     # what the running config was loaded from
        self._pending: Signature | None = None

    def _referenced_files(self) -> list[Path]:
        # A broken config references nothing new: keep watching the files we had.
        try:
            config = load_config(self.config_path)
            local = {s.filter for s in config.filter_sources if not s.remote}   # remote: pinned
            return [Path(f.wasm_path) for f in config.filters if f.name in local] + config.tls_files()
        except ConfigError:
            return getattr(self, "files", [])

    def _signature(self) -> Signature:
        out: Signature = {}
        for p in [self.config_path, *self.files]:
            try:
                st = os.stat(p)
                out[str(p)] = (st.st_mtime_ns, st.st_size)
            except OSError:
                out[str(p)] = None
        return out

    def poll(self) -> str | None:
        """The name of a changed file once the change is stable, else None."""
        sig = self._signature()
        if sig == self.applied:
            self._pending = None
            return None
        if sig != self._pending:
            self._pending = sig              # changed since the last poll: wait until it settles
            return None
        changed = next((p for p in sig if sig[p] != self.applied.get(p)), str(self.config_path))
        self.files = self._referenced_files()
        self.applied = self._signature()
        self._pending = None
        return Path(changed).name
