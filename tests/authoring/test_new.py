"""`wasmgate new filter`: the files of a Rust project (SDK by absolute path, Debian source
replacement, header-only by default), the refusals, build_if_stale, and AssemblyScript and C
projects that build and pass their tests. The Rust project is built and its tests run by
test_quick_path.py (the README's five-minute path)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib

import pytest

from gateway.cli import main
from wasmgate.scaffold import sdk_path, unavailable
from wasmgate.testing import build_if_stale
from tests.authoring.conftest import ROOT


def test_rust_project_files(tmp_path, capsys):
    assert main(["new", "filter", "my-filter", "--dir", str(tmp_path / "p")]) == 0
    assert f"created {tmp_path / 'p'}" in capsys.readouterr().out
    p = tmp_path / "p"
    assert sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) == [
        ".cargo/config.toml", ".gitignore", "Cargo.toml", "README.md", "build.sh", "conftest.py",
        "gateway-snippet.yaml", "pytest.ini", "src/lib.rs", "tests/test_filter.py"]
    cargo = tomllib.loads((p / "Cargo.toml").read_text())
    assert cargo["package"]["name"] == "my-filter"
    sdk = cargo["dependencies"]["wasmgate-sdk"]
    assert sdk == {"path": str(ROOT / "filters" / "sdk"), "default-features": False}   # header-only
    assert cargo["features"]["body"] == ["wasmgate-sdk/request-body", "wasmgate-sdk/response-body"]
    replace = tomllib.loads((p / ".cargo" / "config.toml").read_text())["source"]
    assert replace["debian"] == {"directory": "/usr/share/cargo/registry"}
    assert os.access(p / "build.sh", os.X_OK)
    assert "dist/my_filter.wasm" in (p / "build.sh").read_text()
    assert "{{" not in "".join(f.read_text() for f in p.rglob("*") if f.is_file() and f.suffix != ".rs")


def test_sdk_found_by_env(tmp_path, monkeypatch):
    (tmp_path / "Cargo.toml").write_text("[package]\n")
    monkeypatch.setenv("WASMGATE_SDK", str(tmp_path))
    assert sdk_path() == tmp_path


@pytest.mark.parametrize("argv, message", [
    (["Bad Name"], "filter name 'Bad Name': use lower-case letters"),
    (["ok", "--dir", "{nonempty}"], "exists and is not empty"),
])
def test_refusals(tmp_path, capsys, argv, message):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    argv = [a.replace("{nonempty}", str(tmp_path / "x")) for a in argv]
    assert main(["new", "filter", *argv]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["new", "filter", "ok", "--lang", "cobol"])


def test_build_if_stale(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out.wasm"
    src.mkdir()
    (src / "a.rs").write_text("1")
    cmd = ["sh", "-c", f"echo built >> {tmp_path / 'log'}; touch {out}"]
    assert build_if_stale(out, sources=[src], command=cmd) is True          # missing → built
    assert build_if_stale(out, sources=[src], command=cmd) is False         # fresh → not
    future = time.time() + 5
    os.utime(src / "a.rs", (future, future))
    assert build_if_stale(out, sources=[src], command=cmd) is True          # a newer source
    assert (tmp_path / "log").read_text() == "built\nbuilt\n"
    with pytest.raises(pytest.UsageError, match="building out.wasm failed"):
        os.utime(src / "a.rs", (future + 10, future + 10))
        build_if_stale(out, sources=[src], command=["sh", "-c", "echo broken >&2; exit 3"])


@pytest.mark.parametrize("lang", ["assemblyscript", "c"])
def test_new_project_builds_and_its_tests_pass(tmp_path, lang):
    """AssemblyScript (Solo.io's SDK from npm, pinned) and C (clang-14 + wasi-libc + proxy_wasm.h):
    `new` → `python -m pytest` builds the filter (stale: no dist/ yet) and passes. Rust: the
    five-minute path (test_quick_path.py)."""
    why = unavailable(lang)
    if why:
        pytest.skip(why)
    p = tmp_path / f"demo-{lang}"
    assert main(["new", "filter", f"demo-{lang}", "--lang", lang, "--dir", str(p)]) == 0
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=p,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert (p / "dist" / f"demo_{lang}.wasm").stat().st_size > 1000
