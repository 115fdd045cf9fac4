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
          f"{_plural(len(config.clusters) + len(config.redis_clusters), 'cluster')}, "
          f"{_plural(len(config.routes), 'route')}, "
          f"{_plural(len(config.filters), 'filter')})")
    return 0


async def _check_filters(config: Config) -> list[str]:
    """Load every filter on its own (start-up stops at the first failure; check lists all)."""
    from abi.api import FilterLoadError, load_filter_host
    from .upstream import Upstreams
    services = Upstreams(config.clusters, redis_clusters=config.redis_clusters, node=config.node)
    from .fetch import fetch_filters
    fetch_errors = await fetch_filters(config, all_errors=True)
    errors = [str(e) for e in fetch_errors]
    unfetched = {e.filter_name for e in fetch_errors}
    for spec in config.filters:
        if spec.name in unfetched:
            continue
        try:
            host = await load_filter_host([spec], services)
        except FilterLoadError as e:
            errors.append(str(e))
            continue
        await host.close()
    await services.aclose()
    return errors


def cmd_push(args: argparse.Namespace) -> int:
    """Publish a module; print what a config pins (the module's sha256) and the manifest digest."""
    import hashlib
    from .oci import Reference
    try:
        ref = Reference.parse(args.reference)
        wasm = open(args.wasm, "rb").read()
    except ValueError as e:
        print(f"wasmgate push: {args.reference}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"wasmgate push: cannot read {args.wasm}: {e.strerror or e}", file=sys.stderr)
        return 2
    if ref.tag is None:
        print(f"wasmgate push: {args.reference}: push needs a tag (oci://…/repo:tag)", file=sys.stderr)
        return 2
    if not wasm.startswith(b"\0asm"):
        print(f"wasmgate push: {args.wasm} is not a WebAssembly module", file=sys.stderr)
        return 2
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else os.environ.get(
        "WASMGATE_REGISTRY_PASSWORD", "")
    username = args.username or os.environ.get("WASMGATE_REGISTRY_USERNAME", "")
    token = os.environ.get("WASMGATE_REGISTRY_TOKEN", "")
    try:
        digest = run_loop(_push(ref, wasm, args, username, password, token))
    except Exception as e:                   # RegistryError, or the CA file
        print(f"wasmgate push: {e}", file=sys.stderr)
        return 1
    print(f"pushed {ref.registry}/{ref.repository}:{ref.tag}@{digest} "
          f"({'compat image' if args.docker_compat else 'wasm artifact'})")
    print(f"sha256: {hashlib.sha256(wasm).hexdigest()}")
    return 0


async def _push(ref: Any, wasm: bytes, args: argparse.Namespace, username: str, password: str,
                token: str) -> str:
    import ssl
    import aiohttp
    from .oci import Credentials, Registry, RegistryError
    ctx = ssl.create_default_context(cafile=args.ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        registry = Registry(session, ref.registry, plain_http=args.plain_http,
                            credentials=Credentials(username, password, token))
        try:
            return await registry.push_wasm(ref, wasm, compat=args.docker_compat)
        except RegistryError:
            raise
        except (aiohttp.ClientError, OSError) as e:
            raise RegistryError(f"{ref.registry}: {type(e).__name__}: {e}") from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def serve(config: Config, *, reuse_port: bool = False, ports: dict[str, int] | None = None,
                announce: bool = True, shared_store_name: str | None = None,
                on_started: Any = None, ready_fd: int | None = None, ops_store: str | None = None,
                slot: tuple[int, int] = (0, 1), watch_s: float | None = None) -> int:
    """Start the gateway, print where it listens, run until SIGTERM/SIGINT, then drain."""
    from abi.api import FilterLoadError
    from . import gc_tuning
    from .server import Gateway, StartError

    if shared_store_name is not None:
        store = _shared_store_api("open_shared_store")(shared_store_name)
    else:   # one process: its own store, still sized by the config and kept across reloads
        store = _shared_store_api("create_local_store")(config.shared_data_max_bytes)
    try:
        gw = await Gateway.start(config, reuse_port=reuse_port, ports=ports, shared_store=store)
    except (FilterLoadError, StartError) as e:
        print(f"wasmgate: {e}; not started", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from .workers import install
    close_ops = await install(gw, ops_store=ops_store, slot=slot[0], count=slot[1], watch_s=watch_s)
    if announce:
        _announce(config, gw.listener_ports, gw.admin_port)
    if on_started is not None:
        on_started(gw)
    gc_tuning.tune()
    gc_tuning.settle()          # start-up's objects out of the collector's sight (gc_tuning.py)
    _tell_ready(ready_fd)
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.1fs)", gw.config.limits.drain_timeout_s)
    await close_ops()
    await gw.stop()
    return 0


def _announce(config: Config, ports: dict[str, int], admin_port: int | None) -> None:
    for lst in config.listeners:
        scheme = "https" if lst.tls is not None else "http"
        print(f"wasmgate: listener {lst.name} on {scheme}://{_host(lst.address)}:{ports[lst.name]}", flush=True)
    if config.admin is not None and admin_port is not None:
        print(f"wasmgate: admin on http://{_host(config.admin.address)}:{admin_port}", flush=True)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def cmd_run(args: argparse.Namespace) -> int:
    stored = None
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # a reload before our handler is up must not kill us
    if args.worker_ports is not None:
        from .workers import current_config
        stored = current_config(args.config, args.ops_store)   # a restart: the applied config, even
    config = stored or _load(args.config)                       # if the file on disk is broken now
    if config is None:
        return 2
    if args.workers < 1:
        print("wasmgate: --workers must be at least 1", file=sys.stderr)
        return 2
    watch_s = 1.0 if args.watch else None
    if args.worker_ports is not None:
        ports = dict(item.split("=", 1) for item in args.worker_ports.split(",") if item)
        slot, count = (int(x) for x in (args.worker_slot or "0/1").split("/"))
        return run_loop(serve(config, reuse_port=True, ports={k: int(v) for k, v in ports.items()},
                              announce=False, shared_store_name=args.shared_store, ready_fd=args.ready_fd,
                              ops_store=args.ops_store, slot=(slot, count)))
    if args.workers == 1:
        return run_loop(serve(config, watch_s=watch_s))
    return supervise(args.config, config, args.workers, watch_s)


# -- workers ------------------------------------------------------------------------------------

def supervise(path: str, config: Config, workers: int, watch_s: float | None = None) -> int:
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
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from .workers import SupervisorOps
    ops = SupervisorOps(path, workers, watch_s, config)    # reload broadcast, restart count, --watch
    ops.install_signals()
    procs = [_Worker(cmd + ops.worker_args(i)) for i in range(workers)]
    code = 0
    try:
        # Announce only once every worker listens: a client that reads the "listener" line can
        # rely on all workers taking connections.
        failed = _wait_ready(procs, lambda: stopping)
        if failed is not None:
            print(f"wasmgate: worker {failed.proc.pid} exited with {failed.proc.returncode} during start-up; "
                  f"stopping", file=sys.stderr)
            return failed.proc.returncode or 1
        for s in holders:
            s.close()
        holders = []
        _announce(config, ports, ports.get("admin"))
        print(f"wasmgate: {workers} workers: {' '.join(str(w.proc.pid) for w in procs)}", flush=True)
        last_restart = 0.0
        while not stopping:
            time.sleep(0.1)
            ops.tick(procs)
            for i, w in enumerate(procs):
                rc = w.proc.poll()
                if rc is None or stopping:
                    continue
                # A crashed worker is replaced, at most one restart per second.
                time.sleep(max(0.0, last_restart + 1.0 - time.monotonic()))
                last_restart = time.monotonic()
                procs[i] = _Worker(cmd + ops.worker_args(i))
                ops.restarted(w.proc.pid, rc, procs[i].proc.pid)
                print(f"wasmgate: worker {w.proc.pid} exited with {rc}; restarted as {procs[i].proc.pid}",
                      flush=True)
    finally:
        for s in holders:
            s.close()
        for w in procs:
            w.close_pipe()
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.limits.drain_timeout_s + 5
        for w in procs:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if store_name is not None:
            _shared_store_api("remove_shared_store")(store_name)
        ops.close()
    return code


class _Worker:
    """A worker process and the pipe on which it says it is listening."""

    def __init__(self, cmd: list[str]):
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(cmd + ["--ready-fd", str(w)], pass_fds=(w,), preexec_fn=_die_with_parent)
        finally:
            os.close(w)
        self.ready_fd: int | None = r
        self.ready = False

    def poll_ready(self) -> None:
        if self.ready or self.ready_fd is None:
            return
        import select
        if select.select([self.ready_fd], [], [], 0)[0]:
            self.ready = os.read(self.ready_fd, 64).startswith(b"ready")
            self.close_pipe()

    def close_pipe(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


def _wait_ready(procs: list[_Worker], stopping: Any) -> _Worker | None:
    """Block until every worker reported ready; return one that died first, if any."""
    while not stopping():
        for w in procs:
            w.poll_ready()
            if not w.ready and w.proc.poll() is not None:
                return w
        if all(w.ready for w in procs):
            return None
        time.sleep(0.02)
    return None


def _tell_ready(fd: int | None) -> None:
    if fd is not None:
        try:
            os.write(fd, b"ready\n")
            os.close(fd)
        except OSError:
            pass


def _shared_store_api(name: str) -> Any:
    import abi.api
    return getattr(abi.api, name)


def _create_shared_store(config: Config) -> str | None:
    """One shared-data store for all workers, if the config has filters and abi.api offers it.

    Until abi.api exports create/open/remove_shared_store, each worker keeps its own store.
    """
    # Even without filters now: a reload may add some, and their data must be gateway-wide too.
    import abi.api
    create = getattr(abi.api, "create_shared_store", None)
    if create is None:
        log.warning("shared data is per worker: abi.api has no create_shared_store yet")
        return None
    name = f"wasmgate-{os.getpid()}"
    _KEEP.append(create(name, config.shared_data_max_bytes))   # the supervisor holds it open
    return name


_KEEP: list[Any] = []


def _die_with_parent() -> None:
    # A worker must not outlive a killed supervisor (it would keep holding the port).
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["try"]:             # its own parser: -H/--data mean the response after --response
        from wasmgate.try_filter import main as try_main
        return try_main(argv[1:])
    if argv[:1] == ["new"]:
        from wasmgate.scaffold import main as new_main
        return new_main(argv[1:])
    parser = argparse.ArgumentParser(prog="wasmgate", description="An edge HTTP gateway running Proxy-Wasm filters.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", default="config.yaml", help="config file (default: config.yaml)")
    run.add_argument("--workers", type=int, default=1, help="worker processes sharing the ports (SO_REUSEPORT)")
    run.add_argument("--worker-ports", default=None, help=argparse.SUPPRESS)
    run.add_argument("--shared-store", default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--watch", action="store_true",
                     help="reload when the config file or a wasm file it references changes (polls every 1 s)")
    run.add_argument("--ops-store", default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-slot", default=None, help=argparse.SUPPRESS)
    push = sub.add_parser("push", help="publish a .wasm filter to an OCI registry",
                          description="Credentials: WASMGATE_REGISTRY_USERNAME + WASMGATE_REGISTRY_PASSWORD "
                                      "(or --password-stdin), or WASMGATE_REGISTRY_TOKEN (a bearer token).")
    push.add_argument("wasm", help="the .wasm file")
    push.add_argument("reference", help="oci://registry[:port]/repository:tag")
    push.add_argument("--docker-compat", action="store_true",
                      help="publish as an ordinary image with plugin.wasm in a tar layer (compat layout) "
                           "instead of the wasm OCI artifact")
    push.add_argument("--plain-http", action="store_true", help="speak plain HTTP to the registry")
    push.add_argument("--ca", default=None, help="PEM bundle to trust for the registry's certificate")
    push.add_argument("--username", default=None, help="overrides WASMGATE_REGISTRY_USERNAME")
    push.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    check = sub.add_parser("check", help="validate a config file and list every error")
    check.add_argument("config")
    check.add_argument("--no-load", action="store_true", help="validate only; do not load the wasm filters")
    sub.add_parser("try", help="run a request through filters in-process (wasmgate try --help)", add_help=False)
    sub.add_parser("new", help="create a filter project: wasmgate new filter NAME (--help)", add_help=False)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "check":
        return cmd_check(args)
    if args.command == "push":
        return cmd_push(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
