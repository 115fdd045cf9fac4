"""Who may use the admin listener: bearer token, Host names (DNS rebinding), cross-origin POSTs.

Real sockets: an in-process gateway, requests written byte by byte so the Host, Origin and
Authorization headers are exactly what a browser or an attacker would send.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main as cli_main
from gateway.config import ConfigError, load_config
from gateway.reload import state_of
from tests.gateway.conftest import basic_yaml
from tests.helpers import raw_exchange, run_gateway, split_responses

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token-0123456789abcdef"


def with_admin(up_port: int, admin: str) -> str:
    return basic_yaml(up_port).replace("admin: {address: 127.0.0.1, port: 0}", f"admin: {admin}")


async def ask(port: int, method: str, path: str, *headers: str, host: str | None = None
              ) -> tuple[int, dict[str, str], str]:
    """One request on its own connection; ``host`` defaults to 127.0.0.1:<port>."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", *headers,
             "Content-Length: 0", "Connection: close"]
    raw = await raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    [(status, head, body)] = split_responses(raw)
    return status, head, body.decode()


async def test_token_required_accepted_wrong(upstream, tmp_path):
    async with run_gateway(with_admin(upstream.port, f"{{address: 127.0.0.1, port: 0, token: {TOKEN}}}"),
                           tmp_path) as gw:
        port = gw.gateway.admin_port
        for path in ("/metrics", "/config"):
            status, head, body = await ask(port, "GET", path)
            assert status == 401 and head["www-authenticate"] == 'Bearer realm="wasmgate admin"', (head, body)
            assert "Authorization: Bearer" in body
        status, head, _ = await ask(port, "POST", "/reload")
        assert status == 401
        for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Basic {TOKEN}", TOKEN):
            status, head, body = await ask(port, "GET", "/metrics", f"Authorization: {wrong}")
            assert status == 401 and 'error="invalid_token"' in head["www-authenticate"], (wrong, body)
        status, _, body = await ask(port, "GET", "/metrics", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and "wasmgate_requests_total" in body
        status, _, _ = await ask(port, "GET", "/metrics", f"Authorization: bearer {TOKEN}")
        assert status == 200                                 # the scheme is case-insensitive
        status, _, body = await ask(port, "POST", "/reload", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and body.startswith("ok"), body
        # /ready stays open: load-balancer health checks cannot always send a header.
        status, _, body = await ask(port, "GET", "/ready")
        assert (status, body) == (200, "ready\n")
        status, _, body = await ask(port, "GET", "/config", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and TOKEN not in body
        assert json.loads(body)["admin"]["token"] == "[redacted]"


async def test_token_file_relative_to_the_config_file(upstream, tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin.token").write_text(TOKEN + "\n")      # echo's newline is not the token's
    yaml_text = with_admin(upstream.port, "{address: 127.0.0.1, port: 0, token_file: secrets/admin.token}")
    async with run_gateway(yaml_text, tmp_path) as gw:
        port = gw.gateway.admin_port
        assert (await ask(port, "GET", "/metrics"))[0] == 401
        status, _, body = await ask(port, "GET", "/config", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and TOKEN not in body
        view = json.loads(body)["admin"]
        assert view["token"] == "[redacted]"
        assert view["token_file"] == str(tmp_path / "secrets" / "admin.token")


async def test_rebinding_host_refused_allowed_names_accepted(upstream, tmp_path):
    yaml_text = with_admin(upstream.port, "{address: 127.0.0.1, port: 0, allowed_hosts: [Admin.Example.Internal]}")
    async with run_gateway(yaml_text, tmp_path) as gw:
        port = gw.gateway.admin_port
        # A page on evil.example whose name now resolves to 127.0.0.1: same-origin to the browser.
        for path in ("/config", "/metrics", "/ready"):
            status, _, body = await ask(port, "GET", path, host=f"evil.example:{port}")
            assert status == 403 and 'Host "evil.example' in body and "admin.allowed_hosts" in body, body
        status, _, _ = await ask(port, "POST", "/reload", f"Origin: http://evil.example:{port}",
                                 host=f"evil.example:{port}")
        assert status == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                     f"admin.example.internal:{port}", "ADMIN.example.internal."):
            status, _, body = await ask(port, "GET", "/config", host=host)
            assert status == 200 and json.loads(body)["admin"]["allowed_hosts"] == ["admin.example.internal"], host
        # A configured name is also an origin POST /reload accepts, when the page is the listener itself.
        status, _, body = await ask(port, "POST", "/reload", f"Origin: http://admin.example.internal:{port}",
                                    host=f"admin.example.internal:{port}")
        assert status == 200 and body.startswith("ok"), body


async def test_cross_origin_post_reload_refused(upstream, tmp_path):
    async with run_gateway(basic_yaml(upstream.port), tmp_path) as gw:
        port = gw.gateway.admin_port
        refused = [
            f"Origin: http://evil.example",                       # a form on another site posting here
            f"Origin: http://localhost:{port + 1 if port < 65535 else 1}",   # another local web app
            "Origin: null",                                       # sandboxed iframe, file:// page
            f"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site",
            "Sec-Fetch-Site: same-site",
        ]
        for header in refused:
            status, _, body = await ask(port, "POST", "/reload", header)
            assert status == 403 and "POST /reload refused" in body, (header, body)
        assert state_of(gw.gateway).ok == 0                   # none of them reached the reload
        accepted = [
            (),                                                   # curl, scripts: no Origin at all
            (f"Origin: http://127.0.0.1:{port}",),                # the admin listener's own page
            ("Sec-Fetch-Site: same-origin", "Origin: http://127.0.0.1:1"),   # the browser's own word wins
            ("Sec-Fetch-Site: none",),                            # typed in the address bar
        ]
        for headers in accepted:
            status, _, body = await ask(port, "POST", "/reload", *headers)
            assert status == 200 and body.startswith("ok"), (headers, body)
        assert state_of(gw.gateway).ok == len(accepted)
        # Reads are not state changes: another origin may GET (the browser keeps the answer from it).
        status, _, _ = await ask(port, "GET", "/metrics", "Origin: http://evil.example")
        assert status == 200


def _config_file(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(basic_yaml(9).replace("admin: {address: 127.0.0.1, port: 0}", admin))
    return path


@pytest.mark.parametrize("admin,field,message", [
    ("admin: {address: 0.0.0.0, port: 9901}", "admin.address",
     "0.0.0.0 is not a loopback address: set admin.token or admin.token_file"),
    ("admin: {address: '::', port: 9901}", "admin.address", ":: is not a loopback address"),
    (f"admin: {{port: 9901, token: {TOKEN}, token_file: t}}", "admin.token_file",
     "use either token or token_file, not both"),
    ("admin: {address: 0.0.0.0, port: 9901, token_file: missing.token}", "admin.token_file",
     "cannot read"),
    ("admin: {port: 9901, token: short}", "admin.token", "the token is 5 characters; use at least 16"),
    ('admin: {port: 9901, token: "has space in it 0123456789"}', "admin.token",
     "the token may contain only letters"),
    ("admin: {port: 9901, allowed_hosts: ['admin.example:9901']}", "admin.allowed_hosts[0]",
     '"admin.example:9901" is not a host name'),
])
def test_check_reports_admin_mistakes(tmp_path, capsys, admin, field, message):
    path = _config_file(tmp_path, admin)
    assert cli_main(["check", "--no-load", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2 {field}: {message}" in err, err


def test_loopback_without_token_and_non_loopback_with_token_are_valid(tmp_path):
    assert load_config(_config_file(tmp_path, "admin: {address: '::1', port: 9901}")).admin.token is None
    cfg = load_config(_config_file(tmp_path, f"admin: {{address: 0.0.0.0, port: 9901, token: {TOKEN}}}"))
    assert cfg.admin.token == TOKEN and TOKEN not in repr(cfg)
    with pytest.raises(ConfigError):
        load_config(_config_file(tmp_path, "admin: {address: '::ffff:10.0.0.1', port: 9901}"))
    load_config(_config_file(tmp_path, "admin: {address: '::ffff:127.0.0.1', port: 9901}"))


def test_run_refuses_a_public_admin_without_token(tmp_path):
    path = _config_file(tmp_path, "admin: {address: 0.0.0.0, port: 0}")
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:2 admin.address: 0.0.0.0 is not a loopback address" in proc.stderr, proc.stderr
    assert "not started" in proc.stderr and "listener" not in proc.stdout
