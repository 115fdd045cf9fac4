"""pytest plugin (entry point ``pytest11: wasmgate``): real .wasm filters in tests.

    def test_greets(wasm_filter):
        f = wasm_filter("dist/myfilter.wasm", config={"greeting": "hi"})
        r = f.request("GET", "/")
        assert r.upstream_request.headers["x-greeting"] == "hi"

``wasm_filter(path, config=..., on_http_call=..., ...)`` is ``wasmgate.harness.load_filter``
and ``wasm_chain([...])`` is ``load_chain``; both close what they loaded when the test ends.
"""
from __future__ import annotations

from typing import Callable, Iterator

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
