"""Fixtures for the filter-author tools: small WAT filters built on the fly, and the SDK's
callout example (built once per session, shared with tests/filters)."""
from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from tests.abi.abi_wat import Wat
from tests.filters.conftest import callout_wasm  # noqa: F401 (a fixture, re-used here)

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "filters" / "dist"


def wat_file(tmp_path: Path, name: str, wat: Wat) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat.render()))
    return path


@pytest.fixture
def trap_wasm(tmp_path) -> Path:
    """Traps (unreachable) in on_request_headers, inside a named function."""
    w = Wat()
    w.extra.append("(func $check_request (unreachable))")
    w.on("proxy_on_request_headers", "(call $check_request) (i32.const 0)")
    return wat_file(tmp_path, "trap", w)


@pytest.fixture
def tick_wasm(tmp_path) -> Path:
    """Sets a 1 s tick period in on_configure; on_tick traces itself."""
    w = Wat()
    w.on("proxy_on_configure", "(drop (call $proxy_set_tick_period_milliseconds (i32.const 1000))) (i32.const 1)")
    return wat_file(tmp_path, "tick", w)


@pytest.fixture
def pause_wasm(tmp_path) -> Path:
    """Pauses every request in on_request_headers and never resumes it."""
    return wat_file(tmp_path, "pause", Wat().on("proxy_on_request_headers", "(i32.const 1)"))


@pytest.fixture(scope="session")
def cargo_target_dir(tmp_path_factory) -> Path:
    """One CARGO_TARGET_DIR for every generated Rust project of the session: the SDK is compiled once."""
    return tmp_path_factory.mktemp("cargo-target")
