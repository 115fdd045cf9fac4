"""Config validation: every error names file:line and the field path; all errors are collected."""
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from gateway.config import ConfigError, load_config, redact

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
listeners:
  - name: main
    address: 127.0.0.1
    port: 0
admin: {address: 127.0.0.1, port: 0}
limits: {max_request_body_bytes: 1000, max_header_bytes: 4096, drain_timeout_s: 2.5}
access_log: {path: null}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:9000", "[::1]:9001"]
    connect_timeout_ms: 50
    eject_ms: 0
routes:
  - name: api
    match: {host: Example.COM:8080, prefix: /api, methods: [get, POST], headers: {x-env: prod}}
    cluster: backend
    rewrite: {prefix: /v1, host: internal}
    filters: [auth]
  - name: rest
    cluster: backend
filters:
  - name: auth
    wasm: f.wasm
    config: {token: abc, nested: {password: p, list: [1, 2]}}
    vm_config: "raw string"
    failure_policy: fail_open
    limits: {memory_mb: 32, callback_ms: 50}
    environment: {MODE: test}
    deliver_body_while_paused: true
  - name: mp
    wasm: f.wasm
    encoding: msgpack
    config: {a: 1}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    (tmp_path / "f.wasm").write_bytes(b"\0asm\1\0\0\0")
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    return info.value.errors


def test_good_config_builds_frozen_objects(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.listeners[0].port == 0
    assert cfg.limits.max_request_body_bytes == 1000 and cfg.limits.drain_timeout_s == 2.5
    assert cfg.access_log_path is None
    c = cfg.clusters[0]
    assert [str(e) for e in c.endpoints] == ["127.0.0.1:9000", "[::1]:9001"]
    assert c.connect_timeout_ms == 50 and c.request_timeout_ms == 15000 and c.max_connections == 256
    r = cfg.routes[0]
    assert r.match.host == "example.com" and r.match.methods == {"GET", "POST"}
    assert r.match.headers == (("x-env", "prod"),)
    assert r.rewrite.prefix == "/v1" and r.filters == ("auth",)
    auth, mp = cfg.filters
    assert json.loads(auth.configuration) == {"token": "abc", "nested": {"password": "p", "list": [1, 2]}}
    assert auth.vm_configuration == b"raw string"
    assert auth.failure_policy == "fail_open" and auth.deliver_body_while_paused is True
    assert auth.limits.memory_bytes == 32 * 1024 * 1024 and auth.limits.callback_ms == 50
    assert auth.environment == (("MODE", "test"),)
    assert auth.wasm_path == (tmp_path / "f.wasm").resolve()
    assert msgpack.unpackb(mp.configuration) == {"a": 1}
    with pytest.raises(Exception):
        cfg.listeners[0].port = 1  # frozen


def test_buffer_and_callout_limits_defaults_and_overrides(tmp_path):
    # Defaults: 1 MiB of body buffered per filter (Envoy's buffer limit), 16 MiB of callouts.
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.limits.max_buffered_body_bytes == 1048576
    assert [f.limits.max_buffered_body_bytes for f in cfg.filters] == [1048576, 1048576]
    assert [f.limits.max_callout_bytes for f in cfg.filters] == [16777216, 16777216]
    # The gateway-wide value is every filter's default; a filter's own limits override it.
    text = GOOD.replace("drain_timeout_s: 2.5}", "drain_timeout_s: 2.5, max_buffered_body_bytes: 4096}").replace(
        "limits: {memory_mb: 32, callback_ms: 50}",
        "limits: {memory_mb: 32, callback_ms: 50, max_buffered_body_bytes: 0, max_callout_bytes: 65536}")
    auth, mp = load_config(write(tmp_path, text)).filters
    assert (auth.limits.max_buffered_body_bytes, auth.limits.max_callout_bytes) == (0, 65536)
    assert (mp.limits.max_buffered_body_bytes, mp.limits.max_callout_bytes) == (4096, 16777216)
    assert auth.limits.memory_bytes == 32 << 20 and auth.limits.callback_ms == 50


def test_buffer_and_callout_limits_validated(tmp_path):
    text = GOOD.replace("drain_timeout_s: 2.5}", "drain_timeout_s: 2.5, max_buffered_body_bytes: -1}").replace(
        "limits: {memory_mb: 32, callback_ms: 50}",
        "limits: {max_buffered_body_bytes: 4294967296, max_callout_bytes: lots}")
    errs = errors_of(tmp_path, text)
    assert [e.split(" ", 1)[1] for e in errs] == [
        "limits.max_buffered_body_bytes: must be 0..4294967295, got -1",
        "filters[0].limits.max_buffered_body_bytes: must be 0..4294967295, got 4294967296",
        "filters[0].limits.max_callout_bytes: expected an integer, got 'lots'",
    ]


def test_max_requests_per_io_cycle_defaults_to_one_and_refuses_zero(tmp_path):
    assert load_config(write(tmp_path, GOOD)).limits.max_requests_per_io_cycle == 1
    text = GOOD.replace("drain_timeout_s: 2.5}", "drain_timeout_s: 2.5, max_requests_per_io_cycle: 16}")
    assert load_config(write(tmp_path, text)).limits.max_requests_per_io_cycle == 16
    errs = errors_of(tmp_path, GOOD.replace("drain_timeout_s: 2.5}", "drain_timeout_s: 2.5, max_requests_per_io_cycle: 0}"))
    assert [e.split(" ", 1)[1] for e in errs] == ["limits.max_requests_per_io_cycle: must be >= 1, got 0"]


def test_issue_example_message(tmp_path):
    text = GOOD.replace("  - name: rest\n    cluster: backend", "  - name: rest\n    cluster: usrs")
    errs = errors_of(tmp_path, text)
    line = text.splitlines().index("    cluster: usrs") + 1
    assert errs == [f'{tmp_path / "config.yaml"}:{line} routes[1].cluster: no cluster named "usrs"']


def test_all_errors_collected_with_lines_and_paths(tmp_path):
    text = """\
listeners:
  - {name: main, port: 70000}
  - {name: main, port: true, extra: 1}
clusters:
  - name: backend
    endpoints: ["nohost", "127.0.0.1:0"]
    connect_timeout_ms: fast
  - name: backend
    endpoints: []
routes:
  - name: r
    match: {prefix: api, path: /x}
    cluster: nope
    filters: [ghost]
  - name: r
    cluster: backend
filters:
  - name: f
    wasm: missing.wasm
    failure_policy: sometimes
    bogus: 1
bogus_top: 1
"""
    errs = errors_of(tmp_path, text)
    f = str(tmp_path / "config.yaml")
    expected = [
        f"{f}:2 listeners[0].port: must be 0..65535, got 70000",
        f"{f}:3 listeners[1].extra: unknown key",
        f"{f}:3 listeners[1].port: expected an integer, got true",
        f'{f}:3 listeners[1].name: duplicate name "main" (also listeners[0])',
        f'{f}:6 clusters[0].endpoints[0]: "nohost" is not host:port',
        f'{f}:6 clusters[0].endpoints[1]: "127.0.0.1:0": port must be 1..65535',
        f"{f}:7 clusters[0].connect_timeout_ms: expected an integer, got 'fast'",
        f"{f}:9 clusters[1].endpoints: needs at least one endpoint",
        f'{f}:8 clusters[1].name: duplicate name "backend" (also clusters[0])',
        f'{f}:12 routes[0].match.prefix: must start with "/", got "api"',
        f"{f}:12 routes[0].match.path: use either prefix or path, not both",
        f'{f}:13 routes[0].cluster: no cluster named "nope"',
        f'{f}:14 routes[0].filters[0]: no filter named "ghost"',
        f'{f}:15 routes[1].name: duplicate name "r" (also routes[0])',
        f"{f}:19 filters[0].wasm: file not found: {(tmp_path / 'missing.wasm').resolve()}",
        f'{f}:20 filters[0].failure_policy: must be fail_closed or fail_open, got "sometimes"',
        f"{f}:21 filters[0].bogus: unknown key",
        f"{f}:22 bogus_top: unknown key",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), f"missing {want!r} in:\n" + "\n".join(errs)
    assert len(errs) == len(expected), "\n".join(errs)


def test_wrong_shapes_and_missing_required(tmp_path):
    errs = errors_of(tmp_path, "listeners: {name: main}\nclusters: []\n")
    f = str(tmp_path / "config.yaml")
    assert f"{f}:1 listeners: expected a list, got a mapping" in errs
    assert f"{f}:1 routes: required" in errs


def test_invalid_yaml_names_line(tmp_path):
    errs = errors_of(tmp_path, "listeners:\n  - name: main\n   port: [\n")
    assert len(errs) == 1 and errs[0].startswith(f"{tmp_path / 'config.yaml'}:3 invalid YAML")


def test_empty_and_unreadable(tmp_path):
    assert errors_of(tmp_path, "")[0].endswith("the file is empty")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.errors[0]


def test_duplicate_yaml_keys_and_listener_port_clash(tmp_path):
    text = """\
listeners:
  - {name: a, port: 8080}
  - {name: b, port: 8080}
clusters: [{name: c, endpoints: ["127.0.0.1:1"], name: d}]
routes: [{name: r, cluster: c}]
"""
    errs = errors_of(tmp_path, text)
    assert any(":4 clusters[0].name: duplicate key" in e for e in errs)
    assert any(":3 listeners.b.port: 127.0.0.1:8080 is also used by listener \"a\"" in e for e in errs)


def test_rewrite_prefix_needs_a_path_match(tmp_path):
    text = """\
listeners: [{name: a, port: 0}]
clusters: [{name: c, endpoints: ["127.0.0.1:1"]}]
routes: [{name: r, cluster: c, rewrite: {prefix: /x}}]
"""
    errs = errors_of(tmp_path, text)
    assert any("routes[0].rewrite.prefix: needs match.prefix or match.path" in e for e in errs)


def test_redact_hides_secret_looking_keys():
    raw = {"name": "auth", "config": {"api_key": "k", "Token": "t", "nested": {"password": "p", "ok": 1},
                                      "secrets": ["a", "b"], "keep": "v"}}
    out = redact(raw)
    assert out["config"]["api_key"] == "[redacted]" and out["config"]["Token"] == "[redacted]"
    assert out["config"]["nested"] == {"password": "[redacted]", "ok": 1}
    assert out["config"]["secrets"] == ["[redacted]", "[redacted]"]
    assert out["config"]["keep"] == "v" and out["name"] == "auth"


def test_cli_check_lists_errors_and_exits_nonzero(tmp_path):
    bad = write(tmp_path, GOOD.replace("cluster: backend\n    rewrite", "cluster: usrs\n    rewrite"))
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert 'routes[0].cluster: no cluster named "usrs"' in r.stderr
    assert "Traceback" not in r.stderr
    good = write(tmp_path, GOOD, "good.yaml")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--no-load", str(good)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{good}: OK (1 listener, 1 cluster, 2 routes, 2 filters)"
    # Without --no-load every filter is loaded: both (empty, unusable) modules are reported.
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(good)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert 'filter "auth"' in r.stderr and 'filter "mp"' in r.stderr and "2 filter(s) failed to load" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_run_refuses_bad_config(tmp_path):
    bad = write(tmp_path, "listeners: []\nclusters: []\nroutes: []\n")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "-c", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "listeners: needs at least one listener" in r.stderr and "not started" in r.stderr


REDIS = """\
listeners: [{name: main, port: 0}]
clusters:
  - {name: backend, endpoints: ["127.0.0.1:9000"]}
  - name: store
    type: redis
    endpoints: ["127.0.0.1:6379", "10.0.0.2:6380"]
    username: gw
    password_file: redis.pass
    database: 2
    timeout_ms: 50
routes: [{name: r, cluster: backend}]
"""


def test_redis_cluster_keys_defaults_and_password_file(tmp_path):
    (tmp_path / "redis.pass").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, REDIS))
    assert [c.name for c in cfg.clusters] == ["backend"]           # HTTP clusters only
    (rc,) = cfg.redis_clusters
    assert [str(e) for e in rc.endpoints] == ["127.0.0.1:6379", "10.0.0.2:6380"]
    assert (rc.username, rc.password, rc.database, rc.timeout_ms) == ("gw", "s3cret", 2, 50)
    assert (rc.connect_timeout_ms, rc.max_connections, rc.eject_ms) == (1000, 64, 1000)
    assert rc.max_reply_bytes == 16 * 1024 * 1024
    assert "s3cret" not in repr(rc)
    raw = redact(cfg.raw)
    assert raw["clusters"][1]["password_file"] == "[redacted]"


def test_redis_cluster_errors(tmp_path):
    text = REDIS.replace("    password_file: redis.pass\n", "    password_file: missing.pass\n    password: x\n") \
        .replace("    timeout_ms: 50\n", "    timeout_ms: 0\n    request_timeout_ms: 5\n    max_reply_bytes: 8\n") \
        .replace("routes: [{name: r, cluster: backend}]",
                 "  - {name: odd, type: memcached, endpoints: [\"127.0.0.1:1\"]}\n"
                 "  - {name: lone, type: redis, endpoints: [\"127.0.0.1:1\"], username: u}\n"
                 "routes: [{name: r, cluster: store}]")
    errs = [e.split(" ", 1)[1] for e in errors_of(tmp_path, text)]
    assert errs == [
        "clusters[1].request_timeout_ms: unknown key (allowed: connect_timeout_ms, database, eject_ms, "
        "endpoints, max_connections, max_reply_bytes, name, password, password_file, timeout_ms, type, username)",
        "clusters[1].password_file: use either password or password_file, not both",
        "clusters[1].timeout_ms: must be >= 1, got 0",
        "clusters[1].max_reply_bytes: must be >= 16, got 8",
        'clusters[2].type: must be http or redis, got "memcached"',
        "clusters[3].username: needs a password (or password_file)",
        'routes[0].cluster: "store" is a redis cluster (type: redis); a route needs an HTTP cluster',
    ]
    errs = errors_of(tmp_path, REDIS.replace("redis.pass", "nope.pass"))
    assert len(errs) == 1 and "clusters[1].password_file: cannot read" in errs[0] and "nope.pass" in errs[0]


METADATA = """\
listeners: [{name: main, address: 127.0.0.1, port: 0}]
node:
  id: gw-1
  cluster: edge
  metadata: {region: eu, weight: 3, labels: {app: gw}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:9000"]
    metadata: {envoy.lb: {canary: true, zones: [a, b]}}
routes:
  - name: api
    cluster: backend
    metadata:
      policy: {require-header: x-tenant}
"""


def test_metadata_and_node(tmp_path):
    cfg = load_config(write(tmp_path, METADATA))
    assert cfg.node.id == "gw-1" and cfg.node.cluster == "edge"
    # Numbers are kept as doubles: what Envoy's google.protobuf.Struct holds (and serves).
    assert cfg.node.metadata == {"region": "eu", "weight": 3.0, "labels": {"app": "gw"}}
    assert isinstance(cfg.node.metadata["weight"], float)
    assert cfg.clusters[0].metadata == {"envoy.lb": {"canary": True, "zones": ["a", "b"]}}
    assert cfg.routes[0].metadata == {"policy": {"require-header": "x-tenant"}}
    # Defaults: no node (empty fields), no metadata.
    plain = load_config(write(tmp_path, GOOD))
    assert (plain.node.id, plain.node.cluster, dict(plain.node.metadata)) == ("", "", {})
    assert plain.routes[0].metadata == {} and plain.clusters[0].metadata == {}


def test_metadata_errors_name_line_and_path(tmp_path):
    text = METADATA.replace("region: eu", "region: null").replace(
        "policy: {require-header: x-tenant}", "policy: x-tenant\n      other: {1: a}").replace(
        "cluster: edge", "cluster: edge\n  zone: x").replace(
        "metadata: {envoy.lb: {canary: true, zones: [a, b]}}", "metadata: [a]")
    errs = errors_of(tmp_path, text)
    lines = text.splitlines()
    f = tmp_path / "config.yaml"

    def at(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line) + 1
    assert errs == [
        f"{f}:{at('metadata: [a]')} clusters[0].metadata: expected a mapping of namespaces, got a list",
        f"{f}:{at('policy: x-tenant')} routes[0].metadata.policy: expected a mapping of keys to values, "
        "got scalar 'x-tenant'",
        f"{f}:{at('other: {1: a}')} routes[0].metadata.other: keys must be strings, got scalar '1'",
        f"{f}:{at('zone: x')} node.zone: unknown key (allowed: cluster, id, metadata)",
        f"{f}:{at('region: null')} node.metadata.region: expected a string, number, boolean, list or "
        "mapping (null cannot be served to filters)",
    ]


def test_filter_vm_id_default_and_errors(tmp_path):
    auth, mp = load_config(write(tmp_path, GOOD)).filters
    assert (auth.vm_id, mp.vm_id) == ("", "")           # default: the gateway-wide VM
    text = GOOD.replace("    encoding: msgpack\n", "    encoding: msgpack\n    vm_id: shared\n")
    assert [f.vm_id for f in load_config(write(tmp_path, text)).filters] == ["", "shared"]
    bad = GOOD.replace("    deliver_body_while_paused: true\n",
                       '    deliver_body_while_paused: true\n    vm_id: ""\n').replace(
        "    encoding: msgpack\n", '    encoding: msgpack\n    vm_id: "a\\0b"\n')
    errs = errors_of(tmp_path, bad)
    lines = bad.splitlines()
    empty_line = lines.index('    vm_id: ""') + 1
    nul_line = lines.index('    vm_id: "a\\0b"') + 1
    cfg = tmp_path / "config.yaml"
    assert errs == [f"{cfg}:{empty_line} filters[0].vm_id: must not be empty",
                    f"{cfg}:{nul_line} filters[1].vm_id: must not contain NUL"]
    errs = errors_of(tmp_path, GOOD.replace("    encoding: msgpack\n", "    encoding: msgpack\n    vm_id: [a]\n"))
    assert [e.split(" ", 1)[1] for e in errs] == ["filters[1].vm_id: expected a string, got a list"]
