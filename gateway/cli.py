"""`wasmgate run -c config.yaml [--workers N]` and `wasmgate check config.yaml`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Coroutine

from .config import Config, ConfigError, load_config

log = logging.getLogger("wasmgate")


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the gateway's event loop: uvloop when installed (the one place that decides)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s); not started", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{args.config}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    load_errors = run_loop(_check_filters(config)) if config.filters and not args.no_load else []
    if load_errors:
        for line in load_errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        print(f"{args.config}: {len(load_errors)} filter(s) failed to load", file=sys.stderr)
        return 1
    print(f"{args.config}: OK ({_plural(len(config.listeners), 'listener')}, "
          f"{_plural(len(config.clusters), 'cluster')}, {_plural(len(config.routes), 'route')}, "
          f"{_plural(len(config.filters), 'filter')})")
    return 0


async def _check_filters(config: Config) -> list[str]:
    """Load every filter on its own (start-up stops at the first failure; check lists all)."""
    from abi.api import FilterLoadError, load_filter_host
    from .upstream import Upstreams
    services = Upstreams(config.clusters)
    errors = []
    for spec in config.filters:
        try:
            host = await load_filter_host([spec], services)
        except FilterLoadError as e:
            errors.append(str(e))
            continue
        await host.close()
    services.close()
    return errors


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def serve(config: Config, *, reuse_port: bool = False, ports: dict[str, int] | None = None,
                announce: bool = True, shared_store_name: str | None = None,
                on_started: Any = None) -> int:
    """Start the gateway, print where it listens, run until SIGTERM/SIGINT, then drain."""
    from abi.api import FilterLoadError
    from .server import Gateway, StartError

    store = None
    if shared_store_name is not None:
        store = _shared_store_api("open_shared_store")(shared_store_name)
    try:
        gw = await Gateway.start(config, reuse_port=reuse_port, ports=ports, shared_store=store)
    except FilterLoadError as e:
        print(f"wasmgate: {e}; not started", file=sys.stderr)
        return 1
    except StartError as e:
        print(f"wasmgate: {e}; not started", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if announce:
        _announce(config, gw.listener_ports, gw.admin_port)
    if on_started is not None:
        on_started(gw)
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.1fs)", config.limits.drain_timeout_s)
    await gw.stop()
    return 0


def _announce(config: Config, ports: dict[str, int], admin_port: int | None) -> None:
    for lst in config.listeners:
        print(f"wasmgate: listener {lst.name} on http://{_host(lst.address)}:{ports[lst.name]}", flush=True)
    if config.admin is not None and admin_port is not None:
        print(f"wasmgate: admin on http://{_host(config.admin.address)}:{admin_port}", flush=True)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    if args.workers < 1:
        print("wasmgate: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.worker_ports is not None:
        ports = dict(item.split("=", 1) for item in args.worker_ports.split(",") if item)
        return run_loop(serve(config, reuse_port=True, ports={k: int(v) for k, v in ports.items()},
                              announce=False, shared_store_name=args.shared_store))
    if args.workers == 1:
        return run_loop(serve(config))
    return supervise(args.config, config, args.workers)


# -- workers ------------------------------------------------------------------------------------

def supervise(path: str, config: Config, workers: int) -> int:
    """Run N worker processes that share each listener port through SO_REUSEPORT."""
    from .server import bind_socket

    # Port 0 must mean the same port for every worker: resolve it here and hold it until the
    # workers have bound (a bound, non-listening socket takes no connections).
    holders = []
    ports: dict[str, int] = {}
    try:
        for lst in config.listeners:
            s = bind_socket(lst.address, lst.port, reuse_port=True)
            holders.append(s)
            ports[lst.name] = s.getsockname()[1]
        if config.admin is not None:
            s = bind_socket(config.admin.address, config.admin.port, reuse_port=True)
            holders.append(s)
            ports["admin"] = s.getsockname()[1]
    except OSError as e:
        print(f"wasmgate: cannot bind: {e.strerror or e}; not started", file=sys.stderr)
        return 1
    spec = ",".join(f"{k}={v}" for k, v in ports.items())
    cmd = [sys.executable, "-m", "gateway.cli", "run", "-c", path, "--worker-ports", spec]
    store_name = _create_shared_store(config)
    if store_name is not None:
        cmd += ["--shared-store", store_name]
    procs = [_spawn(cmd) for _ in range(workers)]
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    _announce(config, ports, ports.get("admin"))
    print(f"wasmgate: {workers} workers: {' '.join(str(p.pid) for p in procs)}", flush=True)
    code = 0
    try:
        while not stopping:
            time.sleep(0.1)
            if holders and time.monotonic() - started > 2:
                for s in holders:
                    s.close()
                holders = []
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc is None:
                    continue
                if time.monotonic() - started < _STARTUP_S or rc in (1, 2):
                    # Dying at start-up (bad filter, port taken) is not worth restarting.
                    print(f"wasmgate: worker {p.pid} exited with {rc} at start-up; stopping", file=sys.stderr)
                    stopping, code = True, rc or 1
                    break
                procs[i] = _spawn(cmd)
                print(f"wasmgate: worker {p.pid} exited with {rc}; restarted as {procs[i].pid}", flush=True)
    finally:
        for s in holders:
            s.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.limits.drain_timeout_s + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if store_name is not None:
            _shared_store_api("remove_shared_store")(store_name)
    return code


def _shared_store_api(name: str) -> Any:
    import abi.api
    return getattr(abi.api, name)


def _create_shared_store(config: Config) -> str | None:
    """One shared-data store for all workers, if the config has filters and abi.api offers it.

    Until abi.api exports create/open/remove_shared_store, each worker keeps its own store.
    """
    if not config.filters:
        return None
    import abi.api
    create = getattr(abi.api, "create_shared_store", None)
    if create is None:
        log.warning("shared data is per worker: abi.api has no create_shared_store yet")
        return None
    name = f"wasmgate-{os.getpid()}"
    _KEEP.append(create(name, config.shared_data_max_bytes))   # the supervisor holds it open
    return name


_KEEP: list[Any] = []


# A worker exiting this soon after start-up failed to start; later deaths are crashes to restart.
_STARTUP_S = 2.0


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    # A worker must not outlive a killed supervisor (it would keep holding the port).
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wasmgate", description="An edge HTTP gateway running Proxy-Wasm filters.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", default="config.yaml", help="config file (default: config.yaml)")
    run.add_argument("--workers", type=int, default=1, help="worker processes sharing the ports (SO_REUSEPORT)")
    run.add_argument("--worker-ports", default=None, help=argparse.SUPPRESS)
    run.add_argument("--shared-store", default=None, help=argparse.SUPPRESS)
    check = sub.add_parser("check", help="validate a config file and list every error")
    check.add_argument("config")
    check.add_argument("--no-load", action="store_true", help="validate only; do not load the wasm filters")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "check":
        return cmd_check(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
