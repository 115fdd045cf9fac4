"""Filters from a URL or an OCI registry, pinned by sha256 (gateway/fetch.py, gateway/oci.py).

Real components: Debian's docker-registry on a loopback port, `wasmgate push` and skopeo as the
two publishers, an aiohttp HTTPS server with a trustme CA, the real gateway and filters.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, load_config
from gateway.oci import basic_auth
from gateway.reload import reload_gateway
from gateway.server import StartError
from tests.gateway.conftest import basic_yaml
from tests.helpers import echo_upstream, run_gateway
from tests.registry_server import RegistryServer

ROOT = Path(__file__).resolve().parents[2]
HEADERS = ROOT / "filters" / "dist" / "headers.wasm"
RISK = ROOT / "filters" / "dist" / "risk.wasm"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def push(wasm: Path, ref: str, *extra: str, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "push", str(wasm), ref, "--plain-http", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, input=stdin,
                          env={**os.environ, **(env or {})})


def filter_yaml(up_port: int, wasm: str, pin: str | None, *, fetch: str = "", extra: str = "") -> str:
    pin_line = f"    sha256: {pin}\n" if pin else ""
    return basic_yaml(up_port, routes="  - {name: all, cluster: backend, filters: [tagger]}\n", extra=(
        fetch +
        "filters:\n"
        "  - name: tagger\n"
        f"    wasm: {wasm}\n" + pin_line + extra +
        "    config: {request: {set: {x-tagged-by: remote-filter}}}\n"))


def fetch_yaml(registry: str, cache: Path, *, creds: str = "") -> str:
    return (f"filter_fetch:\n  cache_dir: {cache}\n  timeout_s: 20\n"
            f"  plain_http_registries: [\"{registry}\"]\n" + creds)


async def served_through_filter(gw, up) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url("/hello")) as r:
            assert r.status == 200
    assert up.requests[-1].header("x-tagged-by") == "remote-filter"


async def test_push_then_pull_oci_artifact_and_serve(tmp_path, upstream):
    with RegistryServer(tmp_path) as reg:
        ref = f"oci://{reg.address}/filters/tagger:v1"
        out = await asyncio.to_thread(push, HEADERS, ref)
        assert out.returncode == 0, out.stderr
        assert f"sha256: {sha(HEADERS)}" in out.stdout          # what the config pins
        # The registry holds the wasm artifact layout: one layer of the wasm media type.
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{reg.address}/v2/filters/tagger/manifests/v1",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
                manifest = json.loads(await r.read())
        assert [x["mediaType"] for x in manifest["layers"]] == ["application/vnd.module.wasm.content.layer.v1+wasm"]
        assert manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
        cache = tmp_path / "cache"
        text = filter_yaml(upstream.port, ref, sha(HEADERS), fetch=fetch_yaml(reg.address, cache))
        async with run_gateway(text, tmp_path) as gw:
            await served_through_filter(gw, upstream)
        assert (cache / "sha256" / f"{sha(HEADERS)}.wasm").read_bytes() == HEADERS.read_bytes()


def _oci_layout(layout: Path, wasm: bytes, tag: str, kind: str) -> None:
    """An OCI image layout (what buildah, `docker save` or oras produce), written here by hand so
    that skopeo, not our code, publishes it: ``compat`` is an image with one gzipped tar layer
    holding plugin.wasm, ``artifact`` the wasm artifact (the module as a layer of the wasm media type)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        tar.addfile(info, io.BytesIO(wasm))
    if kind == "compat":
        layer, layer_media = gzip.compress(raw.getvalue()), "application/vnd.oci.image.layer.v1.tar+gzip"
        config_media = "application/vnd.oci.image.config.v1+json"
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers",
                                        "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]}}).encode()
    else:
        layer, layer_media = wasm, "application/vnd.module.wasm.content.layer.v1+wasm"
        config, config_media = b"{}", "application/vnd.module.wasm.config.v1+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": config_media, **blob(config)},
                           "layers": [{"mediaType": layer_media, **blob(layer)}]}).encode()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


@pytest.mark.parametrize("kind", ["compat", "artifact"])
async def test_skopeo_published_module_is_pulled(tmp_path, upstream, kind):
    """Both layouts published by skopeo (an independent client), behind basic auth: the compat
    image as docker pushes it (a Docker v2 schema 2 manifest whose tar layer holds plugin.wasm)
    and the wasm OCI artifact."""
    layout = tmp_path / "layout"
    _oci_layout(layout, HEADERS.read_bytes(), "v2", kind)
    with RegistryServer(tmp_path, users={"ci": "s3cret"}) as reg:
        done = await asyncio.to_thread(subprocess.run, [
            "skopeo", "--insecure-policy", "copy", *(["--format", "v2s2"] if kind == "compat" else []),
            "--dest-tls-verify=false", "--dest-creds", "ci:s3cret", f"oci:{layout}:v2",
            f"docker://{reg.address}/filters/compat:v2"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        (tmp_path / "reg.pass").write_text("s3cret\n")
        creds = (f"  credentials:\n    - {{host: \"{reg.address}\", username: ci, password_file: reg.pass}}\n")
        text = filter_yaml(upstream.port, f"oci://{reg.address}/filters/compat:v2", sha(HEADERS),
                           fetch=fetch_yaml(reg.address, tmp_path / "cache", creds=creds))
        async with aiohttp.ClientSession() as s:      # compat: it is a Docker schema 2 image
            async with s.get(f"http://{reg.address}/v2/filters/compat/manifests/v2",
                             headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                                "application/vnd.oci.image.manifest.v1+json",
                                      "Authorization": basic_auth("ci", "s3cret")}) as r:
                assert r.headers["Content-Type"] == ("application/vnd.docker.distribution.manifest.v2+json"
                                                     if kind == "compat" else "application/vnd.oci.image.manifest.v1+json")
        async with run_gateway(text, tmp_path) as gw:
            await served_through_filter(gw, upstream)
        # Without credentials the registry's Basic challenge cannot be answered: a clear refusal.
        (tmp_path / "nocreds").mkdir()
        bare = filter_yaml(upstream.port, f"oci://{reg.address}/filters/compat:v2", sha(HEADERS),
                           fetch=fetch_yaml(reg.address, tmp_path / "cache2"))
        with pytest.raises(StartError, match=r'filter "tagger": cannot fetch oci://.*asks for credentials'):
            async with run_gateway(bare, tmp_path / "nocreds"):
                pass


async def test_push_compat_with_basic_auth_from_env(tmp_path, upstream):
    with RegistryServer(tmp_path, users={"ci": "s3cret"}) as reg:
        ref = f"oci://{reg.address}/filters/tagger:compat"
        refused = await asyncio.to_thread(push, HEADERS, ref, "--docker-compat")
        assert refused.returncode == 1 and "asks for credentials" in refused.stderr
        wrong = await asyncio.to_thread(push, HEADERS, ref, "--docker-compat", "--username", "ci",
                                        "--password-stdin", stdin="nope\n")
        assert wrong.returncode == 1 and "authentication failed" in wrong.stderr
        assert "nope" not in wrong.stderr
        out = await asyncio.to_thread(push, HEADERS, ref, "--docker-compat",
                                      env={"WASMGATE_REGISTRY_USERNAME": "ci", "WASMGATE_REGISTRY_PASSWORD": "s3cret"})
        assert out.returncode == 0, out.stderr
        os.environ["S13_TEST_REGISTRY_PASSWORD"] = "s3cret"
        try:
            creds = (f"  credentials:\n    - {{host: \"{reg.address}\", username: ci, "
                     "password_env: S13_TEST_REGISTRY_PASSWORD}\n")
            text = filter_yaml(upstream.port, ref, sha(HEADERS),
                               fetch=fetch_yaml(reg.address, tmp_path / "cache", creds=creds))
            async with run_gateway(text, tmp_path) as gw:
                await served_through_filter(gw, upstream)
                # GET /config never shows the password (it is only an env var's name anyway).
                async with aiohttp.ClientSession() as s:
                    async with s.get(gw.admin_url + "/config") as r:
                        assert "s3cret" not in await r.text()
        finally:
            del os.environ["S13_TEST_REGISTRY_PASSWORD"]


async def test_wrong_digest_is_refused_naming_both(tmp_path, upstream):
    with RegistryServer(tmp_path) as reg:
        ref = f"oci://{reg.address}/filters/tagger:v1"
        assert (await asyncio.to_thread(push, HEADERS, ref)).returncode == 0
        cache = tmp_path / "cache"
        text = filter_yaml(upstream.port, ref, sha(RISK), fetch=fetch_yaml(reg.address, cache))
        with pytest.raises(StartError) as e:
            async with run_gateway(text, tmp_path):
                pass
        assert f"has sha256 {sha(HEADERS)}, the config pins {sha(RISK)}" in str(e.value)
        assert not (cache / "sha256").exists() or not any((cache / "sha256").iterdir())   # nothing cached


async def test_registry_down_falls_back_to_the_cached_pin(tmp_path, upstream, caplog):
    with RegistryServer(tmp_path) as reg:
        ref = f"oci://{reg.address}/filters/tagger:v1"
        assert (await asyncio.to_thread(push, HEADERS, ref)).returncode == 0
        cache = tmp_path / "cache"
        text = filter_yaml(upstream.port, ref, sha(HEADERS), fetch=fetch_yaml(reg.address, cache),
                           extra="    pull_policy: always\n")
        async with run_gateway(text, tmp_path) as gw:            # fetched, cached
            await served_through_filter(gw, upstream)
        reg.stop()
        caplog.set_level(logging.WARNING, logger="wasmgate.fetch")
        async with run_gateway(text, tmp_path) as gw:            # registry down: the cached blob
            await served_through_filter(gw, upstream)
        assert any("cannot fetch" in r.message and "using the cached blob with the same pin" in r.message
                   for r in caplog.records)
        # No cached copy of that pin: a clear error, nothing started.
        other = filter_yaml(upstream.port, ref, sha(RISK), fetch=fetch_yaml(reg.address, cache))
        with pytest.raises(StartError, match=rf"cannot fetch {ref}: .*no cached copy of sha256:{sha(RISK)}"):
            async with run_gateway(other, tmp_path):
                pass


async def test_https_url_with_a_test_ca_and_reload_to_a_new_pin(tmp_path, upstream):
    import trustme
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    files = {"/v1.wasm": HEADERS.read_bytes(), "/v2.wasm": HEADERS.read_bytes() + b"\x00\x03\x02v2"}
    hits: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        if request.path not in files:
            return web.Response(status=404)
        return web.Response(body=files[request.path])

    async with echo_upstream(serve, ssl_context=server_ctx) as files_server:
        base = f"https://127.0.0.1:{files_server.port}"
        fetch = f"filter_fetch: {{cache_dir: cache, ca: ca.pem}}\n"
        text = filter_yaml(upstream.port, f"{base}/v1.wasm", sha(HEADERS), fetch=fetch)
        async with run_gateway(text, tmp_path) as gw:
            await served_through_filter(gw, upstream)
            assert hits == ["/v1.wasm"]
            # A reload with a new URL and pin fetches it (a custom section appended: same code).
            v2_pin = hashlib.sha256(files["/v2.wasm"]).hexdigest()
            gw.config_path.write_text(filter_yaml(upstream.port, f"{base}/v2.wasm", v2_pin, fetch=fetch))
            result = await reload_gateway(gw.gateway)
            assert result.ok, result.errors
            assert hits == ["/v1.wasm", "/v2.wasm"]
            await served_through_filter(gw, upstream)
            # A 404 source with no cached copy refuses the reload; the running filter stays.
            gw.config_path.write_text(filter_yaml(upstream.port, f"{base}/gone.wasm", sha(RISK), fetch=fetch))
            refused = await reload_gateway(gw.gateway)
            assert not refused.ok
            assert refused.errors == [f'filter "tagger": cannot fetch {base}/gone.wasm: HTTP 404; and no cached '
                                      f"copy of sha256:{sha(RISK)} in {tmp_path / 'cache'}"]
            await served_through_filter(gw, upstream)
        # Without the test CA the certificate is not trusted: refused, no fallback.
        (tmp_path / "noca").mkdir()
        bare = filter_yaml(upstream.port, f"{base}/v1.wasm", sha(HEADERS),
                           fetch=f"filter_fetch: {{cache_dir: {tmp_path / 'cache-noca'}}}\n")
        with pytest.raises(StartError, match="certificate verify failed"):
            async with run_gateway(bare, tmp_path / "noca"):
                pass


def test_remote_source_needs_a_pin_and_a_valid_reference(tmp_path):
    (tmp_path / "config.yaml").write_text(basic_yaml(1, extra=(
        "filter_fetch:\n"
        "  credentials: [{host: r.example, username: u, password_env: S13_SURELY_UNSET}]\n"
        "filters:\n"
        "  - {name: a, wasm: \"oci://r.example/f/a:v1\"}\n"
        "  - {name: b, wasm: \"oci://R.example/Upper\", sha256: " + "0" * 64 + "}\n"
        "  - {name: c, wasm: \"https://x.example/c.wasm\", sha256: nothex}\n"
        "  - {name: d, wasm: \"https://x.example/d.wasm\", sha256: " + "a" * 64 + ", pull_policy: sometimes}\n")))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "config.yaml")
    errors = "\n".join(e.value.errors)
    assert "config.yaml:9 filter_fetch.credentials[0].password_env: environment variable S13_SURELY_UNSET is not set" in errors
    assert ("config.yaml:11 filters[0].wasm: a remote module (oci://) needs a sha256: pin beside it" in errors)
    assert "config.yaml:12 filters[1].wasm: expected oci://registry[:port]/repository" in errors
    assert "config.yaml:13 filters[2].sha256: expected 64 hex digits" in errors
    assert 'config.yaml:14 filters[3].pull_policy: must be if_not_present or always, got "sometimes"' in errors


async def test_pinned_local_file_is_verified(tmp_path, upstream):
    text = filter_yaml(upstream.port, str(HEADERS), sha(RISK))
    with pytest.raises(StartError, match=f"{HEADERS} has sha256 {sha(HEADERS)}, the config pins {sha(RISK)}"):
        async with run_gateway(text, tmp_path):
            pass
    async with run_gateway(filter_yaml(upstream.port, str(HEADERS), sha(HEADERS)), tmp_path) as gw:
        await served_through_filter(gw, upstream)


def _token_issuer(directory: Path):
    """A self-signed ES256 signing certificate and a function minting the JWTs docker-registry's
    `auth: token` verifies (x5c header chaining to its rootcertbundle)."""
    import base64
    import datetime
    import time as _time
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "token-root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()   # noqa: E731

    def mint(subject: str, scope: str) -> str:
        _, repo, actions = scope.split(":")
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}
        t = int(_time.time())
        claims = {"iss": "test-issuer", "sub": subject, "aud": "test-registry", "iat": t, "nbf": t - 60,
                  "exp": t + 600, "jti": os.urandom(8).hex(),
                  "access": [{"type": "repository", "name": repo, "actions": actions.split(",")}]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    return mint


async def test_bearer_token_registry(tmp_path, upstream):
    """A registry with `auth: token`: its challenge sends clients to a token endpoint (here an
    aiohttp server minting the JWTs the registry verifies); push and pull both follow it."""
    mint = _token_issuer(tmp_path)
    asked: list[tuple[str, str]] = []

    async def token(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != basic_auth("ci", "s3cret"):
            return web.Response(status=401)
        asked.append((request.query["service"], request.query["scope"]))
        return web.json_response({"token": mint("ci", request.query["scope"])})

    async with echo_upstream(token) as token_server:
        reg = RegistryServer(tmp_path)
        reg.config.write_text(reg.config.read_text() + (
            "auth:\n  token:\n"
            f"    realm: http://127.0.0.1:{token_server.port}/token\n"
            "    service: test-registry\n    issuer: test-issuer\n"
            f"    rootcertbundle: {tmp_path / 'token-root.pem'}\n"))
        with reg:
            ref = f"oci://{reg.address}/filters/tagger:v1"
            out = await asyncio.to_thread(push, HEADERS, ref, env={
                "WASMGATE_REGISTRY_USERNAME": "ci", "WASMGATE_REGISTRY_PASSWORD": "s3cret"})
            assert out.returncode == 0, (out.stderr, asked)
            # (the registry names the actions in either order)
            assert ("test-registry", {"pull", "push"}) in [(svc, set(scope.split(":")[2].split(",")))
                                                             for svc, scope in asked], asked
            (tmp_path / "reg.pass").write_text("s3cret")
            creds = f"  credentials: [{{host: \"{reg.address}\", username: ci, password_file: reg.pass}}]\n"
            text = filter_yaml(upstream.port, ref, sha(HEADERS),
                               fetch=fetch_yaml(reg.address, tmp_path / "cache", creds=creds))
            async with run_gateway(text, tmp_path) as gw:
                await served_through_filter(gw, upstream)
            assert asked[-1] == ("test-registry", "repository:filters/tagger:pull"), asked
