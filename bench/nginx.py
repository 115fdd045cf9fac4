"""nginx as the fixed-speed upstream and as the native proxy peer, each with its own temp prefix
and config (never the system config)."""
from __future__ import annotations

import os
from pathlib import Path

from bench.procs import Proc, free_port, wait_ready

UPSTREAM_BODY = "hello from the bench upstream\n"   # 30 bytes, fixed

_COMMON = """\
{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server_tokens off;
{body}
}}
"""

_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{text}";
        }}
    }}
"""

_PROXY = """\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} {ssl}reuseport backlog=4096;{h2c_listen}
{tls}        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def _config(prefix: Path, body: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return _COMMON.format(user=user, prefix=prefix, body=body)


# The TLS settings wasmgate's listener uses by default (gateway/tls.py): TLS 1.2 and 1.3, the same
# TLS 1.2 cipher list, server order; session tickets on (both sides' defaults).
_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;
"""


def start_nginx(nginx_bin: str, prefix: Path, name: str, port: int, *,
                upstream_port: int | None = None, cpus: str | None = None,
                tls: tuple[str, str, str] | None = None, http2: bool = False) -> Proc:
    """Upstream (fixed 200 response) when upstream_port is None, else a keep-alive proxy to it;
    tls: (cert, key, TLS 1.2 ciphers) terminates TLS on the proxy's listener. ``http2``: with tls,
    ALPN offers h2 beside http/1.1 there; without, a second port (returned as ``proc.h2c_port``)
    takes HTTP/2 with prior knowledge (nginx 1.22's plain `listen ... http2` speaks only HTTP/2,
    so readiness is checked on ``port``)."""
    prefix.mkdir(parents=True, exist_ok=True)
    h2c_port = None
    if upstream_port is None:
        text = UPSTREAM_BODY.replace("\n", "\\n")
        body = _UPSTREAM.format(port=port, text=text)
    else:
        h2c_port = free_port() if http2 and not tls else None
        h2c = f"\n        listen 127.0.0.1:{h2c_port} http2 reuseport backlog=4096;" if h2c_port else ""
        ssl = ("ssl http2 " if http2 else "ssl ") if tls else ""
        body = _PROXY.format(port=port, upstream_port=upstream_port, ssl=ssl, h2c_listen=h2c,
                             tls=_TLS.format(cert=tls[0], key=tls[1], ciphers=tls[2]) if tls else "")
    conf = prefix / "nginx.conf"
    conf.write_text(_config(prefix, body))
    argv = [nginx_bin, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    if cpus:
        argv = ["taskset", "-c", cpus] + argv
    proc = Proc(name, argv, log_path=prefix / "stdout.log")
    proc.h2c_port = h2c_port          # type: ignore[attr-defined]
    try:
        wait_ready(f"{'https' if tls else 'http'}://127.0.0.1:{port}/", proc, timeout=10,
                   cafile=tls[0] if tls else None)
    except Exception:
        err = (prefix / "error.log")
        extra = err.read_text(errors="replace")[-2000:] if err.exists() else ""
        proc.stop()
        raise RuntimeError(f"{name} (nginx) did not start: {extra}")
    return proc
