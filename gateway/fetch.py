"""Where a filter's module comes from: a file, an https:// or http:// URL, or an OCI reference.

A remote module is pinned by the sha256 of its bytes (``filters[].sha256``) and lands in a
content-addressed cache (``<filter_fetch.cache_dir>/sha256/<hex>.wasm``), which is the path the
filter is loaded from (config.py sets ``FilterSpec.wasm_path`` to it). ``fetch_filters`` runs
at start, on every reload and in ``wasmgate check``, before any filter is compiled — never on
the request path. With ``pull_policy: if_not_present`` (the default, Istio's for a pinned
module) a verified cached blob is used without asking the source; with ``always`` the source is
asked every time and the cached blob is the fallback when it cannot be reached (logged). Bytes
that do not match the pin are refused, naming both digests, and never cached.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

log = logging.getLogger("wasmgate.fetch")

PULL_POLICIES = ("if_not_present", "always")
REMOTE_KINDS = ("https", "http", "oci")


def default_cache_dir() -> Path:
    """Beside the engine's compiled-module cache: $WASMGATE_CACHE_DIR or ~/.cache/wasmgate."""
    env = os.environ.get("WASMGATE_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "wasmgate") / "filters"


@dataclass(frozen=True)
class RegistryCredential:
    """Credentials for one host[:port] (a registry, or the host of an https:// URL), read from
    an environment variable or a file at config load; never written to logs or GET /config."""
    host: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)      # a bearer token used as is


@dataclass(frozen=True)
class FetchSettings:
    cache_dir: Path = field(default_factory=default_cache_dir)
    timeout_s: float = 60.0                         # one whole fetch (all its requests)
    max_bytes: int = 268435456                      # 256 MiB: a module, or an image layer
    ca: Path | None = None                          # extra trust for https:// and registries
    plain_http_registries: tuple[str, ...] = ()     # host[:port] spoken to over plain HTTP
    credentials: tuple[RegistryCredential, ...] = ()

    def blob_path(self, sha256: str) -> Path:
        return self.cache_dir / "sha256" / f"{sha256}.wasm"

    def credential(self, host: str) -> RegistryCredential | None:
        return next((c for c in self.credentials if c.host == host.lower()), None)


@dataclass(frozen=True)
class FilterSource:
    filter: str
    location: str              # resolved file path, URL, or oci:// reference (as written)
    kind: str                  # "file" | "https" | "http" | "oci"
    sha256: str | None         # lower-case hex of the module's bytes; required for remote kinds
    pull_policy: str = "if_not_present"

    @property
    def remote(self) -> bool:
        return self.kind in REMOTE_KINDS


def source_kind(wasm: str) -> str:
    for kind in REMOTE_KINDS:
        if wasm.startswith(f"{kind}://"):
            return kind
    return "file"


class FetchError(Exception):
    def __init__(self, filter_name: str, message: str):
        super().__init__(f'filter "{filter_name}": {message}')
        self.filter_name = filter_name
        self.message = message


class _Unreachable(Exception):
    """The source could not be asked or did not answer with a module (fallback allowed)."""


class FetchConfig(Protocol):
    """What fetching reads of a Config (config.py, which imports this module's types)."""
    filter_sources: tuple[FilterSource, ...]
    filter_fetch: FetchSettings


async def fetch_filters(config: FetchConfig, *, all_errors: bool = False) -> list[FetchError]:
    """Make every filter's module present and verified at its FilterSpec.wasm_path.

    Raises the first FetchError, or with ``all_errors`` returns them all (``wasmgate check``).
    """
    sources = [s for s in config.filter_sources if s.remote or s.sha256]
    if not sources:
        return []
    settings = config.filter_fetch
    errors: list[FetchError] = []
    session = None
    try:
        for src in sources:
            try:
                if not src.remote:
                    await _verify_file(src)
                    continue
                if session is None:
                    session = _session(settings)
                await _ensure_remote(src, settings, session)
            except FetchError as e:
                if not all_errors:
                    raise
                errors.append(e)
    finally:
        if session is not None:
            await session.close()
    return errors


async def _verify_file(src: FilterSource) -> None:
    try:
        got = await asyncio.to_thread(_sha256_file, Path(src.location))
    except OSError as e:
        raise FetchError(src.filter, f"cannot read {src.location}: {e.strerror or e}") from None
    if got != src.sha256:
        raise FetchError(src.filter, f"{src.location} has sha256 {got}, the config pins {src.sha256}")


async def _ensure_remote(src: FilterSource, settings: FetchSettings, session) -> None:
    blob = settings.blob_path(src.sha256)
    cached = await asyncio.to_thread(_cached_ok, blob, src.sha256)
    if cached and src.pull_policy == "if_not_present":
        log.info('filter "%s": %s sha256:%s from the cache (%s)', src.filter, src.location, src.sha256, blob)
        return
    try:
        data = await asyncio.wait_for(_download(src, settings, session), settings.timeout_s)
    except (_Unreachable, asyncio.TimeoutError) as e:
        reason = str(e) or f"no answer within {settings.timeout_s:g}s"
        if cached:
            log.warning('filter "%s": cannot fetch %s (%s); using the cached blob with the same pin '
                        'sha256:%s (%s)', src.filter, src.location, reason, src.sha256, blob)
            return
        raise FetchError(src.filter, f"cannot fetch {src.location}: {reason}; and no cached copy of "
                                     f"sha256:{src.sha256} in {settings.cache_dir}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != src.sha256:
        raise FetchError(src.filter, f"{src.location} has sha256 {got}, the config pins {src.sha256}; "
                                     "refused")
    await asyncio.to_thread(_store, blob, data)
    log.info('filter "%s": fetched %s (%d bytes, sha256:%s) into %s', src.filter, src.location,
             len(data), got, blob)


async def _download(src: FilterSource, settings: FetchSettings, session) -> bytes:
    import aiohttp
    from . import oci
    try:
        if src.kind == "oci":
            ref = oci.Reference.parse(src.location)
            cred = settings.credential(ref.registry)
            registry = oci.Registry(
                session, ref.registry, plain_http=ref.registry.lower() in settings.plain_http_registries,
                credentials=oci.Credentials(cred.username, cred.password, cred.token) if cred else None,
                max_bytes=settings.max_bytes)
            return await registry.pull_wasm(ref)
        return await _get_url(src.location, settings, session)
    except oci.RegistryError as e:
        raise _Unreachable(str(e)) from None
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise _Unreachable(f"{type(e).__name__}: {e}") from None


async def _get_url(url: str, settings: FetchSettings, session) -> bytes:
    from .oci import basic_auth
    headers = {}
    cred = settings.credential(urlsplit(url).netloc)
    if cred is not None:
        headers["Authorization"] = (f"Bearer {cred.token}" if cred.token else
                                    basic_auth(cred.username, cred.password))
    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise _Unreachable(f"HTTP {resp.status}")
        out = bytearray()
        async for chunk in resp.content.iter_chunked(65536):
            out += chunk
            if len(out) > settings.max_bytes:
                raise _Unreachable(f"more than filter_fetch.max_bytes ({settings.max_bytes})")
        return bytes(out)


def _session(settings: FetchSettings):
    import aiohttp
    ctx = ssl.create_default_context()
    if settings.ca is not None:
        ctx.load_verify_locations(cafile=str(settings.ca))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                 timeout=aiohttp.ClientTimeout(total=settings.timeout_s))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_ok(blob: Path, sha256: str) -> bool:
    """A cached blob counts only if its bytes still match its name (a damaged one is dropped)."""
    try:
        if _sha256_file(blob) == sha256:
            return True
    except OSError:
        return False
    log.warning("cached filter blob %s does not match its digest; removed", blob)
    blob.unlink(missing_ok=True)
    return False


def _store(blob: Path, data: bytes) -> None:
    """Atomically: workers of one gateway may fetch the same blob at once."""
    blob.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=blob.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, blob)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
