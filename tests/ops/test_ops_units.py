"""Units of the ops glue: the --watch poller and the cross-worker metric sums."""
from __future__ import annotations

import json
import os
from pathlib import Path

from abi.api import MetricSample
from gateway.watch import Watcher
from gateway.worker_metrics import merge_counters, sum_samples

DIST = Path(__file__).resolve().parents[2] / "filters" / "dist"


def _config(path: Path, wasm: Path, tag: str) -> None:
    path.write_text(json.dumps({
        "listeners": [{"name": "main", "address": "127.0.0.1", "port": 0}],
        "clusters": [{"name": "b", "endpoints": ["127.0.0.1:1"]}],
        "routes": [{"name": "r", "cluster": "b", "filters": ["h"]}],
        "filters": [{"name": "h", "wasm": str(wasm), "config": {"response": {"set": {"x": tag}}}}]}))


def _bump(path: Path, ns: int) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns))


def test_watcher_reports_a_change_once_it_is_stable(tmp_path):
    wasm = tmp_path / "h.wasm"
    wasm.write_bytes((DIST / "headers.wasm").read_bytes())
    cfg = tmp_path / "c.yaml"
    _config(cfg, wasm, "a")
    w = Watcher(cfg)
    assert w.poll() is None
    _config(cfg, wasm, "bb")
    assert w.poll() is None                  # changed since the last poll: not settled yet
    assert w.poll() == "c.yaml"
    assert w.poll() is None                  # reported once
    _bump(wasm, 1_000_000)                   # a referenced wasm file counts too
    assert w.poll() is None and w.poll() == "h.wasm"
    wasm.unlink()                            # so does its disappearance
    assert w.poll() is None and w.poll() == "h.wasm"


def test_watcher_keeps_watching_through_a_broken_config(tmp_path):
    wasm = tmp_path / "h.wasm"
    wasm.write_bytes(b"\0asm")
    cfg = tmp_path / "c.yaml"
    _config(cfg, wasm, "a")
    w = Watcher(cfg)
    cfg.write_text("listeners: [")
    w.poll()
    assert w.poll() == "c.yaml"
    assert w.files == [wasm]            # the broken file names no wasm: keep the old ones
    _bump(wasm, 1_000_000)
    w.poll()
    assert w.poll() == "h.wasm"


def _snap(pid: int, active: int, failures: float, up: float) -> dict:
    return {"pid": pid, "t": 0.0, "active": [active, active],
            "samples": [["f_failures_total", "counter", failures, {"filter": "h"}, ""],
                        ["wasmgate_filter_up", "gauge", up, {"filter": "h"}, ""]],
            "reload": {"generation": 1, "fingerprint": "f", "ok": 2, "failed": 1, "last_ts": 0.0,
                       "last_ok": True, "errors": []}}


def test_a_restarted_worker_continues_its_predecessors_counters_not_gauges():
    dead = _snap(1, active=3, failures=2, up=1)
    new = _snap(2, active=1, failures=0, up=1)
    merged = merge_counters(new, dead)
    assert merged["pid"] == 2
    assert merged["active"] == [1, 1]                       # gauges are this process's own
    values = {s[0]: s[2] for s in merged["samples"]}
    assert values == {"f_failures_total": 2, "wasmgate_filter_up": 1}
    assert merged["reload"]["ok"] == 4 and merged["reload"]["failed"] == 2


def test_sum_samples_adds_by_name_and_labels_and_takes_max_of_ejection():
    s = sum_samples([
        MetricSample("c_total", "counter", 2, {"a": "1"}), MetricSample("c_total", "counter", 3, {"a": "1"}),
        MetricSample("c_total", "counter", 5, {"a": "2"}),
        MetricSample("wasmgate_upstream_endpoint_ejected", "gauge", 1, {"endpoint": "e"}),
        MetricSample("wasmgate_upstream_endpoint_ejected", "gauge", 0, {"endpoint": "e"}),
    ])
    got = {(m.name, tuple(m.labels.items())): m.value for m in s}
    assert got == {("c_total", (("a", "1"),)): 5, ("c_total", (("a", "2"),)): 5,
                   ("wasmgate_upstream_endpoint_ejected", (("endpoint", "e"),)): 1}
