"""Tools for filter authors: the in-process harness (`wasmgate.harness`), its pytest plugin
(`wasmgate.testing`), `wasmgate try` and `wasmgate new filter`."""
