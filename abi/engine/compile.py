"""``Engine`` compiles modules (with an on-disk cache) and owns the epoch ticker that enforces
CPU deadlines. One per process (workers are separate processes). ``Module`` is the result."""
from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path

import wasmtime as wt

from . import crossing
from .binary import Export, Import, _parse_signatures, _to_binary
from .crossing import WASMTIME_VERSION
from .errors import EngineError
from .ticker import _NativeTicker, _Ticker, new_ticker

_CACHE_MAGIC = b"WGCWASM1"    # our cache-file header: magic + sha256(payload) + payload


def _stop_tickers(tickers: dict, lock: threading.Lock) -> None:
    with lock:
        for ticker in tickers.values():
            ticker.stop()


def _default_cache_dir() -> Path:
    env = os.environ.get("WASMGATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wasmgate"


class Engine:
    """One wasmtime engine with epoch interruption and a compiled-module disk cache."""

    def __init__(self, cache_dir: Path | None = None):
        cfg = wt.Config()
        cfg.epoch_interruption = True
        # Linear memory never moves when it grows, so a cached base address stays valid and
        # only the cached size needs refreshing (see Memory).
        cfg.memory_may_move = False
        self._wt = wt.Engine(cfg)
        self.version = WASMTIME_VERSION
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        # The ticker follows the crossings (_crossing.c's call() marks what its ticker counts);
        # made at the first instance of each kind, so an idle engine has no thread.
        self._tickers: dict[bool, _Ticker | _NativeTicker] = {}
        self._tickers_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_tickers, self._tickers,
                                           self._tickers_lock)

    def ticker(self, native: bool) -> _Ticker | _NativeTicker:
        """The epoch ticker for instances on the C crossings (``native``) or on ctypes."""
        with self._tickers_lock:
            ticker = self._tickers.get(native)
            if ticker is None:
                ticker = self._tickers[native] = new_ticker(self._wt, native)
            return ticker

    @property
    def _ticker(self) -> _Ticker | _NativeTicker:
        """The ticker an instance made now would use."""
        return self.ticker(crossing.USE_NATIVE)

    def close(self) -> None:
        """Stop the epoch ticker (instances of this engine then never hit their deadline)."""
        self._finalizer()

    def compile(self, wasm: bytes, name: str = "") -> "Module":
        """Compile a module (binary or WAT text); reuse the disk cache when possible.

        ``name`` (e.g. "auth.wasm") prefixes backtrace frames.
        """
        digest = hashlib.sha256(wasm).hexdigest()
        binary = _to_binary(wasm)
        path = self.cache_dir / f"{digest}-{self.version}.cwasm"
        wt_module = self._load_cached(path)
        cache_hit = wt_module is not None
        if wt_module is None:
            wt_module = self._compile_fresh(binary)
            self._store_cached(path, wt_module)
        return Module(wt_module, digest, name, cache_hit, _parse_signatures(binary))

    def _compile_fresh(self, binary: bytes) -> wt.Module:
        try:
            return wt.Module(self._wt, binary)
        except wt.WasmtimeError as e:
            raise EngineError(f"invalid wasm module: {e}") from None

    def _load_cached(self, path: Path) -> wt.Module | None:
        # A cache entry is trusted native code: verify our checksum before deserializing,
        # and treat any problem as a miss (recompile and overwrite).
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        head = len(_CACHE_MAGIC) + 32
        payload = blob[head:]
        if blob[:len(_CACHE_MAGIC)] != _CACHE_MAGIC or \
                hashlib.sha256(payload).digest() != blob[len(_CACHE_MAGIC):head]:
            return None
        try:
            return wt.Module.deserialize(self._wt, payload)
        except wt.WasmtimeError:
            return None

    def _store_cached(self, path: Path, module: wt.Module) -> None:
        try:
            payload = bytes(module.serialize())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(_CACHE_MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)   # atomic: concurrent workers never see half a file
        except (OSError, wt.WasmtimeError):
            pass                    # the cache is an optimisation, never a failure


class Module:
    """A compiled module: its sha256, imports and exports (with value types)."""

    def __init__(self, wt_module: wt.Module, sha256: str, name: str,
                 cache_hit: bool,
                 signatures: tuple[list[Import], dict[str, Export], dict[int, str], bool]):
        self._wt = wt_module
        self.sha256 = sha256
        self.name = name
        self.cache_hit = cache_hit
        self.imports, self.exports, self._export_names, self.has_start = signatures
