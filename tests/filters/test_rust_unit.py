"""Run the Rust unit tests of filters/ (SDK: SHA-256 NIST vectors, HMAC RFC 4231, JSON/msgpack
edge cases, dispatcher; each filter's pure logic) as part of the Python suite, so `./dev test`
and CI cover them. Uses Debian's toolchain, offline."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.filters.conftest import ROOT

CARGO = "/usr/bin/cargo"
RUSTC = "/usr/bin/rustc"


@pytest.mark.skipif(not (os.access(CARGO, os.X_OK) and os.access(RUSTC, os.X_OK)),
                    reason="Debian's cargo/rustc not installed (./dev test installs them)")
def test_cargo_test_workspace():
    # rustdoc too: the doctests link the SDK's crates, built by Debian's rustc (rustup's rustdoc,
    # often first on PATH, rejects their metadata).
    env = {**os.environ, "RUSTC": RUSTC, "RUSTDOC": "/usr/bin/rustdoc"}
    r = subprocess.run([CARGO, "test", "--offline", "--locked", "--workspace", "-q"],
                       cwd=ROOT / "filters", env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    passed = sum(int(n) for n in re.findall(r"test result: ok\. (\d+) passed", out))
    assert passed >= 30, out[-2000:]
    assert "FAILED" not in out
