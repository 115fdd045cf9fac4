"""Helpers for end-to-end filter tests: a gateway (real sockets on 127.0.0.1) running the
committed filters/dist/*.wasm in front of an echo upstream, and a JWT minter.

Each test module starts ONE gateway (module-scoped, module event loop) whose routes each use
a differently configured filter, so the suite stays fast.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from abi.api import FilterLoadError
from tests.helpers import echo_upstream, run_gateway

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "filters" / "dist"
CARGO, RUSTC = "/usr/bin/cargo", "/usr/bin/rustc"


@pytest.fixture(scope="session")
def callout_wasm():
    """filters/examples/callout built from source (an SDK filter exporting every callback)."""
    if not (os.access(CARGO, os.X_OK) and os.access(RUSTC, os.X_OK)):
        pytest.skip("Debian's cargo/rustc not installed (./dev test installs them)")
    r = subprocess.run([CARGO, "build", "--offline", "--locked", "--release", "--target", "wasm32-wasi",
                        "-p", "example-callout"], cwd=ROOT / "filters", env={**os.environ, "RUSTC": RUSTC},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return ROOT / "filters" / "target" / "wasm32-wasi" / "release" / "example_callout.wasm"


def gateway_yaml(up_port: int, filters: list[dict[str, Any]], routes: list[dict[str, Any]],
                 extra_clusters: list[dict[str, Any]] | None = None) -> str:
    """The config as JSON (a subset of YAML). ``filters`` entries may give ``wasm`` as a bare
    filter name ("auth"), resolved to filters/dist/<name>.wasm."""
    fl = []
    for f in filters:
        f = dict(f)
        if "/" not in str(f["wasm"]):
            f["wasm"] = str(DIST / f"{f['wasm']}.wasm")
        fl.append(f)
    doc = {
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "admin": {"address": "127.0.0.1", "port": 0},
        "access_log": {"path": None},
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{up_port}"]}] + (extra_clusters or []),
        "routes": routes,
        "filters": fl,
    }
    return json.dumps(doc, indent=1)


@asynccontextmanager
async def filter_gateway(tmp_path: Path, filters, routes, handler=None):
    async with echo_upstream(handler) as up:
        async with run_gateway(gateway_yaml(up.port, filters, routes), tmp_path) as gw:
            yield gw, up


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(claims: dict, secret: bytes, header: dict | None = None, *, sign: bool = True) -> str:
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if not sign:
        return signing_input + "."
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def header_values(received_headers: list, name: str) -> list[str]:
    return [v for k, v in received_headers if k.lower() == name.lower()]


async def assert_start_refused(tmp_path: Path, yaml_text: str, caplog, reason: str, filter_name: str = "f") -> None:
    """The gateway refuses to start because filter ``filter_name`` refused its configuration, and
    the filter's own ``reason`` reaches the operator (in the error or in the log)."""
    with caplog.at_level("DEBUG"):
        with pytest.raises(FilterLoadError) as ei:
            async with run_gateway(yaml_text, tmp_path):
                pass
    assert ei.value.filter_name == filter_name
    assert reason in str(ei.value) or reason in caplog.text, (str(ei.value), caplog.text[-2000:])
