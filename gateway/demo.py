"""`python -m gateway.demo -c config.yaml`: the demo upstream plus the gateway, in one command.

The echo upstream listens where the config's first cluster points, so a newcomer can curl the
gateway right away and see what the upstream received.
"""
from __future__ import annotations

import argparse
import sys

from .cli import run_loop, serve, setup_logging
from .config import Config, ConfigError, load_config


def curl_hint(config: Config, port: int) -> str:
    """A curl command line that hits the first route."""
    lst = config.listeners[0]
    host = "127.0.0.1" if lst.address in ("0.0.0.0", "::") else lst.address
    if ":" in host:
        host = f"[{host}]"
    # A route without filters answers a bare curl; a filtered one would start with a 401.
    route = next((r for r in config.routes if not r.filters), config.routes[0])
    m = route.match
    path = m.path or ((m.prefix.rstrip("/") + "/hello") if m.prefix else "/hello")
    parts = ["curl -i"]
    if m.host:
        parts.append(f"-H 'Host: {m.host}'")
    for name, value in m.headers:
        parts.append(f"-H '{name}: {value}'")
    if m.methods and "GET" not in m.methods:
        parts.append(f"-X {sorted(m.methods)[0]}")
    parts.append(f"http://{host}:{port}{path}")
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
        hint = curl_hint(config, gw.listener_ports[config.listeners[0].name])
        print(f"demo: gateway ready; in another terminal try:\n\n    {hint}\n\n"
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
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    return run_loop(_demo(config))


if __name__ == "__main__":
    sys.exit(main())
