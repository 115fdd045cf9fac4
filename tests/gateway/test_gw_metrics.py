"""Prometheus text rendering of the gateway's own metrics and of foreign samples."""
from abi.api import MetricSample
from gateway.metrics import Metrics


def test_render_families_histograms_and_exact_numbers():
    m = Metrics()
    m.request_done("api", 200, 10, 20)
    m.request_done("api", 200, 0, 5)
    m.error("upstream_refused")
    m.upstream("backend", 0.0007)
    m.upstream("backend", 3.0)
    samples = [
        MetricSample("wasm_lat_bucket", "histogram", 1, {"le": "1.0"}, "latency"),
        MetricSample("wasm_lat_bucket", "histogram", 2, {"le": "+Inf"}, "latency"),
        MetricSample("wasm_lat_sum", "histogram", 7.5, {}, "latency"),
        MetricSample("wasm_lat_count", "histogram", 2, {}, "latency"),
        MetricSample("wasm_big_total", "counter", 1234567891, {"filter": 'a"b'}, "big"),
    ]
    text = m.render(extra=samples)
    lines = text.splitlines()
    assert 'wasmgate_requests_total{route="api",status="200"} 2' in lines
    assert 'wasmgate_errors_total{kind="upstream_refused"} 1' in lines
    assert 'wasmgate_upstream_latency_seconds_bucket{cluster="backend",le="0.001"} 1' in lines
    assert 'wasmgate_upstream_latency_seconds_bucket{cluster="backend",le="2.5"} 1' in lines
    assert 'wasmgate_upstream_latency_seconds_bucket{cluster="backend",le="+Inf"} 2' in lines
    assert 'wasmgate_body_bytes_total{direction="in"} 10' in lines
    assert lines.count("# TYPE wasm_lat histogram") == 1
    i = lines.index("# TYPE wasm_lat histogram")
    assert lines[i + 1:i + 5] == ['wasm_lat_bucket{le="1.0"} 1', 'wasm_lat_bucket{le="+Inf"} 2',
                                  "wasm_lat_sum 7.5", "wasm_lat_count 2"]
    assert 'wasm_big_total{filter="a\\"b"} 1234567891' in lines
    # Every sample line belongs to a family announced by a TYPE line before it.
    typed = set()
    for line in lines:
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert any(name == f or name.startswith(f + "_") for f in typed), line
