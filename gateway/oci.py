"""A small OCI distribution client for wasm filters: pull (both published layouts) and push.

Speaks the distribution API (https://github.com/opencontainers/distribution-spec) over aiohttp:
``GET /v2/<repo>/manifests/<ref>``, ``GET /v2/<repo>/blobs/<digest>``, monolithic blob upload
(``POST .../blobs/uploads/`` then ``PUT <location>?digest=``) and ``PUT .../manifests/<tag>``.
Auth follows the registry's ``WWW-Authenticate`` challenge: ``Basic`` (credentials sent as is)
or ``Bearer`` (token endpoint, with the credentials when given, anonymous otherwise), as docker,
skopeo and oras do. oras-py exists on PyPI but is blocking (requests) and knows no compat layout.

The two layouts a wasm filter is published in (Istio and Higress pull both):

* OCI artifact (solo-io/wasm ``spec.md``): a layer of media type
  ``application/vnd.module.wasm.content.layer.v1+wasm`` holding the module itself (config
  ``application/vnd.module.wasm.config.v1+json``). ``application/wasm`` layers (the CNCF TAG
  Runtime wasm artifact) are read the same way.
* compat (``spec-compat.md``): an ordinary image, OCI or Docker v2 schema 2, with one
  (gzipped) tar layer containing ``plugin.wasm``.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
CNCF_WASM_LAYER = "application/wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TAR_LAYERS = {OCI_TAR_GZIP, DOCKER_TAR_GZIP, "application/vnd.oci.image.layer.v1.tar"}
COMPAT_ANNOTATION = "module.wasm.image/variant"
ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_REF = re.compile(r"^oci://(?P<registry>[A-Za-z0-9.-]+(?::\d+)?|\[[0-9A-Fa-f:]+\](?::\d+)?)/"
                  r"(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
                  r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
                  r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class RegistryError(Exception):
    """A registry refused, answered something unusable, or could not be reached."""


@dataclass(frozen=True)
class Reference:
    registry: str                 # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None     # "sha256:<hex>" of the manifest

    @classmethod
    def parse(cls, text: str) -> "Reference":
        m = _REF.match(text)
        if m is None:
            raise ValueError("expected oci://registry[:port]/repository[:tag][@sha256:<hex>] "
                             "(lower-case repository path)")
        if m["tag"] is None and m["digest"] is None:
            return cls(m["registry"], m["repo"], "latest")
        return cls(m["registry"], m["repo"], m["tag"], m["digest"])

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        return f"oci://{self.registry}/{self.repository}{tag}{'@' + self.digest if self.digest else ''}"


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)     # a bearer token used as is (no token endpoint)


def basic_auth(username: str, password: str) -> str:
    """An Authorization header value (aiohttp.BasicAuth is deprecated)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """One registry, for one session: remembers the Authorization each scope earned."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, *, plain_http: bool = False,
                 credentials: Credentials | None = None, max_bytes: int = 256 * 1024 * 1024):
        self.session = session
        self.base = f"{'http' if plain_http else 'https'}://{registry}"
        self.credentials = credentials or Credentials()
        self.max_bytes = max_bytes
        self._auth: dict[str, str] = {}          # scope → Authorization header value
        if self.credentials.token:
            self._auth[""] = f"Bearer {self.credentials.token}"

    # -- pull ---------------------------------------------------------------------------

    async def pull_wasm(self, ref: Reference) -> bytes:
        """The module a reference points at, in either layout; blob digests verified."""
        scope = f"repository:{ref.repository}:pull"
        manifest = await self._manifest(ref, ref.manifest_ref, scope, check_digest=ref.digest)
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise RegistryError(f"{ref}: the manifest has no layers list")
        for layer in layers:
            if layer.get("mediaType") in (WASM_LAYER, CNCF_WASM_LAYER):
                return await self._blob(ref, layer, scope)
        tars = [x for x in layers if x.get("mediaType") in TAR_LAYERS]
        if not tars:
            kinds = ", ".join(str(x.get("mediaType")) for x in layers) or "none"
            raise RegistryError(f"{ref}: no wasm layer ({WASM_LAYER}) and no image layer with a "
                                f"plugin.wasm (layers: {kinds})")
        for layer in tars:           # compat: the one layer holding plugin.wasm
            wasm = _plugin_wasm(await self._blob(ref, layer, scope))
            if wasm is not None:
                return wasm
        raise RegistryError(f"{ref}: no plugin.wasm in the image's layers")

    async def _manifest(self, ref: Reference, reference: str, scope: str, *,
                        check_digest: str | None, depth: int = 0) -> dict[str, Any]:
        url = f"{self.base}/v2/{ref.repository}/manifests/{reference}"
        status, headers, body = await self._call("GET", url, scope, headers={"Accept": ACCEPT},
                                                 limit=MAX_MANIFEST_BYTES)
        if status == 404:
            raise RegistryError(f"{ref}: not found in the registry (manifest {reference})")
        if status != 200:
            raise RegistryError(f"{ref}: manifest request answered HTTP {status}: {_snippet(body)}")
        if check_digest is not None and sha256_digest(body) != check_digest:
            raise RegistryError(f"{ref}: the registry's manifest has digest {sha256_digest(body)}, "
                                f"not {check_digest}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise RegistryError(f"{ref}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{ref}: the manifest is not a JSON object")
        media = doc.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
        if media in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
            # A wasm module has no platform: an index of one (or several equal) images is
            # read through its first entry, as Istio does.
            entries = doc.get("manifests") or []
            if depth or not entries or not isinstance(entries[0], dict) or "digest" not in entries[0]:
                raise RegistryError(f"{ref}: an empty or nested image index")
            return await self._manifest(ref, entries[0]["digest"], scope,
                                        check_digest=entries[0]["digest"], depth=1)
        return doc

    async def _blob(self, ref: Reference, layer: dict[str, Any], scope: str) -> bytes:
        digest = str(layer.get("digest", ""))
        if not digest.startswith("sha256:"):
            raise RegistryError(f"{ref}: layer digest {digest!r} is not sha256")
        url = f"{self.base}/v2/{ref.repository}/blobs/{digest}"
        status, _, body = await self._call("GET", url, scope, limit=self.max_bytes)
        if status != 200:
            raise RegistryError(f"{ref}: blob {digest} answered HTTP {status}")
        if sha256_digest(body) != digest:
            raise RegistryError(f"{ref}: blob {digest} arrived with digest {sha256_digest(body)}")
        return body

    # -- push ---------------------------------------------------------------------------

    async def push_wasm(self, ref: Reference, wasm: bytes, *, compat: bool = False) -> str:
        """Publish ``wasm`` under ``ref``'s tag; the manifest's digest."""
        scope = f"repository:{ref.repository}:pull,push"
        if compat:
            layer, layer_media = _compat_layer(wasm), OCI_TAR_GZIP
            config = json.dumps({"architecture": "wasm", "os": "wasip1", "config": {},
                                 "rootfs": {"type": "layers",
                                            "diff_ids": [sha256_digest(gzip.decompress(layer))]}},
                                separators=(",", ":")).encode()
            config_media, annotations = OCI_CONFIG, {COMPAT_ANNOTATION: "compat"}
        else:
            layer, layer_media = wasm, WASM_LAYER
            config, config_media, annotations = b"{}", WASM_CONFIG, {}
        for blob in (config, layer):
            await self._upload(ref, blob, scope)
        manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_media, "digest": sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": layer_media, "digest": sha256_digest(layer), "size": len(layer),
                        **({} if compat else {"annotations": {
                            "org.opencontainers.image.title": "plugin.wasm"}})}],
        }
        if annotations:
            manifest["annotations"] = annotations
        body = json.dumps(manifest, separators=(",", ":")).encode()
        url = f"{self.base}/v2/{ref.repository}/manifests/{ref.tag or ref.digest or 'latest'}"
        status, _, answer = await self._call("PUT", url, scope, data=body,
                                             headers={"Content-Type": OCI_MANIFEST})
        if status not in (200, 201):
            raise RegistryError(f"{ref}: manifest upload answered HTTP {status}: {_snippet(answer)}")
        return sha256_digest(body)

    async def _upload(self, ref: Reference, blob: bytes, scope: str) -> None:
        digest = sha256_digest(blob)
        status, _, _ = await self._call("HEAD", f"{self.base}/v2/{ref.repository}/blobs/{digest}", scope)
        if status == 200:
            return                               # already there (content addressed)
        status, headers, body = await self._call("POST", f"{self.base}/v2/{ref.repository}/blobs/uploads/",
                                                 scope)
        if status != 202 or "Location" not in headers:
            raise RegistryError(f"{ref}: blob upload refused: HTTP {status}: {_snippet(body)}")
        location = URL(self.base).join(URL(headers["Location"])).update_query(digest=digest)
        status, _, body = await self._call(
            "PUT", str(location), scope, data=blob,
            headers={"Content-Type": "application/octet-stream"})
        if status != 201:
            raise RegistryError(f"{ref}: blob {digest} upload answered HTTP {status}: {_snippet(body)}")

    # -- HTTP + auth --------------------------------------------------------------------

    async def _call(self, method: str, url: str, scope: str, *, limit: int = 1 << 20,
                    headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, bytes]:
        """One request; on a 401, answer the challenge once and retry."""
        for attempt in (0, 1):
            h = dict(headers or {})
            auth = self._auth.get(scope) or self._auth.get("")
            if auth:
                h["Authorization"] = auth
            try:
                async with self.session.request(method, url, headers=h, **kw) as resp:
                    if resp.status == 401 and attempt == 0:
                        challenge = resp.headers.get("WWW-Authenticate", "")
                        await resp.read()
                        self._auth[scope] = await self._answer(challenge, scope)
                        continue
                    if resp.status == 401:
                        raise RegistryError(f"{self.base}: authentication failed (HTTP 401)")
                    body = await _read_capped(resp, limit, url) if method != "HEAD" else b""
                    return resp.status, resp.headers, body
            except aiohttp.ClientError as e:
                raise RegistryError(f"{self.base}: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    async def _answer(self, challenge: str, scope: str) -> str:
        kind, _, rest = challenge.strip().partition(" ")
        params = {k.lower(): (q if q is not None and q != "" else u).replace('\\"', '"')
                  for k, q, u in _CHALLENGE_PARAM.findall(rest)}
        c = self.credentials
        basic = basic_auth(c.username, c.password) if c.username or c.password else None
        if kind.lower() == "basic":
            if basic is None:
                raise RegistryError(f"{self.base}: the registry asks for credentials (Basic) and none "
                                    "are configured for it")
            return basic
        if kind.lower() != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.base}: unsupported authentication challenge {challenge[:80]!r}")
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": basic} if basic else {}
        async with self.session.get(params["realm"], params=query, headers=headers) as resp:
            body = await _read_capped(resp, 1 << 20, params["realm"])
            if resp.status != 200:
                raise RegistryError(f"{self.base}: token endpoint {params['realm']} answered HTTP "
                                    f"{resp.status}")
        try:
            token = json.loads(body)
            token = token.get("token") or token.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.base}: token endpoint {params['realm']} returned no token")
        return f"Bearer {token}"


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    out = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        out += chunk
        if len(out) > limit:
            raise RegistryError(f"{url}: more than {limit} bytes")
    return bytes(out)


def _plugin_wasm(layer: bytes) -> bytes | None:
    """plugin.wasm from a (gzipped) layer tar, wherever it sits in the tree; None if absent."""
    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit("/", 1)[-1] == "plugin.wasm":
                    f = tar.extractfile(member)
                    return f.read() if f is not None else None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RegistryError(f"an image layer is not a readable tar: {e}") from None
    return None


def _compat_layer(wasm: bytes) -> bytes:
    """A gzipped tar with plugin.wasm at its root; byte-for-byte reproducible (mtime 0)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        tar.addfile(info, io.BytesIO(wasm))
    return gzip.compress(raw.getvalue(), mtime=0)


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace").strip()
