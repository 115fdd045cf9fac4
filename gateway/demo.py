"""`python -m gateway.demo -c config.yaml`: the demo upstream plus the gateway, in one command.

The echo upstream listens where the config's first cluster points, so a newcomer can curl the
gateway right away and see what the upstream received. A TLS listener whose certificate and key
live under `.demo-tls/` gets a fresh self-signed certificate (localhost, 127.0.0.1, ::1) at start.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .cli import run_loop, serve, setup_logging
from .config import Config, ConfigError, Listener, load_config
from .tls import write_self_signed

DEMO_TLS_DIR = ".demo-tls"


def write_demo_certificates(config_path: str | Path) -> list[Path]:
    """Write a self-signed certificate and key for every listener whose `tls.cert` and `tls.key`
    are under .demo-tls/ (relative to the config); return the certificate files written."""
    path = Path(config_path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []                            # load_config reports it properly
    written = []
    for lst in (doc.get("listeners") or []) if isinstance(doc, dict) else []:
        tls = lst.get("tls") if isinstance(lst, dict) else None
        files = [tls.get("cert"), tls.get("key")] if isinstance(tls, dict) else []
        if files and all(isinstance(f, str) and Path(f).parts[:1] == (DEMO_TLS_DIR,) for f in files):
            cert, key = (path.resolve().parent / f for f in files)
            write_self_signed(cert, key)
            written.append(cert)
    return written


def curl_hint(config: Config, port: int, lst: Listener | None = None) -> str:
    """A curl command line that hits the first route through a listener (default: the first)."""
    lst = lst or config.listeners[0]
    host = "127.0.0.1" if lst.address in ("0.0.0.0", "::") else lst.address
    if ":" in host:
        host = f"[{host}]"
    # A route without filters answers a bare curl; a filtered one would start with a 401.
    route = next((r for r in config.routes if not r.filters), config.routes[0])
    m = route.match
    path = m.path or ((m.prefix.rstrip("/") + "/hello") if m.prefix else "/hello")
    parts = ["curl -i" if lst.tls is None else "curl -ik"]     # -k: the demo's self-signed certificate
    if m.host:
        parts.append(f"-H 'Host: {m.host}'")
    for name, value in m.headers:
        parts.append(f"-H '{name}: {value}'")
    if m.methods and "GET" not in m.methods:
        parts.append(f"-X {sorted(m.methods)[0]}")
    parts.append(f"{'http' if lst.tls is None else 'https'}://{host}:{port}{path}")
    return " ".join(parts)


async def _demo(config: Config) -> int:
    from .demo_upstream import start_upstream
    ep = config.clusters[0].endpoints[0]
    try:
        runner = await start_upstream(ep.host, ep.port)
    except OSError as e:
        print(f"demo: cannot start the echo upstream on {ep}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"demo: echo upstream on http://{ep} (cluster \"{config.clusters[0].name}\")", flush=True)
    def started(gw) -> None:
        hints = "\n    ".join(curl_hint(config, gw.listener_ports[lst.name], lst) for lst in config.listeners)
        print(f"demo: gateway ready; in another terminal try:\n\n    {hints}\n\n"
              f"(the echo upstream answers with what it received; Ctrl-C stops both)", flush=True)

    try:
        return await serve(config, on_started=started)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo")
    parser.add_argument("-c", "--config", default="config.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    for cert in write_demo_certificates(args.config):
        print(f"demo: wrote a self-signed certificate for localhost and 127.0.0.1: {cert} "
              f"(clients need curl -k, or --cacert {cert})", flush=True)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    return run_loop(_demo(config))


if __name__ == "__main__":
    sys.exit(main())
