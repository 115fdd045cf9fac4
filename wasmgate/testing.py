"""pytest plugin (entry point ``pytest11: wasmgate``): real .wasm filters in tests.

    def test_greets(wasm_filter):
        f = wasm_filter("dist/myfilter.wasm", config={"greeting": "hi"})
        r = f.request("GET", "/")
        assert r.upstream_request.headers["x-greeting"] == "hi"

``wasm_filter(path, config=..., on_http_call=..., ...)`` is ``wasmgate.harness.load_filter``
and ``wasm_chain([...])`` is ``load_chain``; both close what they loaded when the test ends.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pytest

from .harness import (CallFailed, FilterHarness, HarnessError, load_chain,  # noqa: F401 (re-exported)
                      load_filter)


@pytest.fixture
def wasm_filter() -> Iterator[Callable[..., FilterHarness]]:
    """A factory: ``wasm_filter(path, config=None, **options)`` → a loaded FilterHarness."""
    loaded: list[FilterHarness] = []

    def load(wasm, config=None, **options) -> FilterHarness:
        h = load_filter(wasm, config, **options)
        loaded.append(h)
        return h
    yield load
    for h in loaded:
        h.close()


@pytest.fixture
def wasm_chain() -> Iterator[Callable[..., FilterHarness]]:
    """A factory: ``wasm_chain([path | (path, config) | (path, config, options), ...])``."""
    loaded: list[FilterHarness] = []

    def load(filters, **options) -> FilterHarness:
        h = load_chain(filters, **options)
        loaded.append(h)
        return h
    yield load
    for h in loaded:
        h.close()


def _newest(paths: Iterable[Path]) -> float:
    newest = 0.0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
        newest = max([newest] + [f.stat().st_mtime for f in files])
    return newest


def build_if_stale(output: str | Path, *, sources: Sequence[str | Path], command: Sequence[str],
                   timeout_s: float = 600) -> bool:
    """Run ``command`` when ``output`` is missing or older than any file under ``sources``
    (a generated project's conftest.py calls this at session start). True when it built;
    a failed build stops the session with the build's output."""
    output = Path(output)
    if output.exists() and output.stat().st_mtime >= _newest(Path(s) for s in sources):
        return False
    r = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0 or not output.exists():
        raise pytest.UsageError(f"building {output.name} failed ({' '.join(command)}):\n"
                                f"{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return True
