"""CPU per filter callout: a gRPC call (proxy_grpc_call) beside an HTTP call (proxy_http_call),
in the same run, as a ratio (not a test).

    python -m bench.callout_cost              # 2000 requests x 5 rounds per mode
    python -m bench.callout_cost -n 5000 -r 7

Each request goes through a one-filter chain the way gateway/proxy.py drives it. The filter
(WAT, SDK-like) dispatches one callout in on_request_headers and pauses; the answer resumes the
request (a failed callout makes it a 503, and the run stops: a callout that silently failed
cannot look cheap). Three modes of the same filter, interleaved round by round:

- ``none``: no callout (the baseline: a request through the filter);
- ``http``: proxy_http_call to an HTTP/1.1 cluster (gateway/upstream.py's pooled keep-alive
  connections);
- ``grpc``: proxy_grpc_call (unary) to a `protocol: grpc` cluster (gateway/grpc_client.py:
  grpcio's asyncio channel over h2c).

The servers (aiohttp, grpcio) run in a child process, so only the gateway side is counted:
``time.process_time()`` of this process, all its threads (gRPC's own included).
Per callout = mode - none; the figure is grpc / http.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from abi.api import FilterSpec, Forward, LogInfo, StreamInfo, load_filter_host
from abi.pairs import serialize

CALL_HEADERS = serialize([(b":method", b"GET"), (b":path", b"/check"), (b":authority", b"authz")])
REQUEST = [(":method", "GET"), (":path", "/api"), (":authority", "bench.local"), (":scheme", "http"),
           ("x-user", "alice")]
MODES = ("none", "http", "grpc")


def _data(offset: int, data: bytes) -> str:
    text = "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:02x}" for b in data)
    return f'(data (i32.const {offset}) "{text}")'


def filter_wat(mode: str) -> str:
    """The bench filter: dispatch (mode), Pause; resume on the answer, 503 on a failure."""
    strings = {"http": 0x100, "grpc": 0x120, "svc": 0x140, "meth": 0x160, "msg": 0x180,
               "hdrs": 0x200, "nomd": 0x300}
    values = {"http": b"http", "grpc": b"grpc", "svc": b"t.Svc", "meth": b"Check", "msg": b"alice",
              "hdrs": CALL_HEADERS, "nomd": serialize([])}

    def s(key: str) -> str:
        return f"(i32.const {strings[key]}) (i32.const {len(values[key])})"
    dispatch = {
        "none": "(return (i32.const 0))",
        "http": f"(drop (call $http_call {s('http')} {s('hdrs')} (i32.const 0) (i32.const 0) {s('nomd')} "
                "(i32.const 5000) (i32.const 0x400)))",
        "grpc": f"(drop (call $grpc_call {s('grpc')} {s('svc')} {s('meth')} {s('nomd')} {s('msg')} "
                "(i32.const 5000) (i32.const 0x400)))",
    }[mode]
    # The dispatching context by token (requests in flight at once): slot (token >> 2) % 1024.
    slot = "(i32.add (i32.const 0x1000) (i32.shl (i32.and (i32.shr_u {t} (i32.const 2)) (i32.const 1023)) (i32.const 2)))"
    remember = f"(i32.store {slot.format(t='(i32.load (i32.const 0x400))')} (local.get $ctx))"
    origin = f"(i32.load {slot.format(t='(local.get $token)')})"
    resume = f"(drop (call $effective {origin})) (drop (call $continue (i32.const 0)))"
    fail = (f"(drop (call $effective {origin})) (drop (call $reply (i32.const 503) "
            "(i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))")
    return "\n".join([
        "(module",
        '(import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))',
        '(import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))',
        '(import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))',
        '(import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))',
        '(import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))',
        '(memory (export "memory") 2)',
        '(func (export "proxy_abi_version_0_2_1"))',
        # Never asked for memory (the filter reads nothing back); a fixed scratch area suffices.
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0x8000))',
        '(func (export "proxy_on_context_create") (param i32 i32))',
        '(func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)',
        f'  {dispatch} {remember} (i32.const 1))',
        '(func (export "proxy_on_http_call_response") (param i32) (param $token i32) (param $nh i32) (param i32 i32)',
        f'  (if (local.get $nh) (then {resume}) (else {fail})))',
        f'(func (export "proxy_on_grpc_receive") (param i32) (param $token i32) (param i32) {resume})',
        f'(func (export "proxy_on_grpc_close") (param i32) (param $token i32) (param i32) {fail})',
        *(_data(strings[k], values[k]) for k in strings),
        ")",
    ])


# -- the servers (child process) -------------------------------------------------------------

async def _serve() -> None:
    import grpc
    from aiohttp import web

    async def allow(_request):
        return web.Response(body=b"allow")
    runner = web.ServerRunner(web.Server(allow))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    async def check(request: bytes, _ctx) -> bytes:
        return b"allow"

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(check) if details.method == "/t.Svc/Check" else None
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"http": site._server.sockets[0].getsockname()[1], "grpc": grpc_port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)   # until the parent goes
    await server.stop(None)
    await runner.cleanup()


# -- the measurement ---------------------------------------------------------------------------

async def _one(host, mode: str, i: int) -> None:
    info = StreamInfo(request_id=f"r{i}", route_name="bench", cluster_name="upstream",
                      client_addr=("127.0.0.1", 40000), local_addr=("127.0.0.1", 8080),
                      connection_id=i, start_time_ns=time.time_ns())
    stream = host.stream([mode], info)
    out = await stream.request(list(REQUEST), None)
    await stream.finish(LogInfo(status=200))
    if not isinstance(out, Forward):
        raise SystemExit(f"{mode}: the callout failed ({out!r}); see the log")


async def run(host, mode: str, n: int, concurrency: int = 1) -> float:
    """n requests, ``concurrency`` at a time; CPU µs per request."""
    t0 = time.process_time()
    for start in range(0, n, concurrency):
        if concurrency == 1:
            await _one(host, mode, start)
        else:
            await asyncio.gather(*(_one(host, mode, i) for i in range(start, min(n, start + concurrency))))
    return (time.process_time() - t0) / n * 1e6


async def main_async(args) -> None:
    from gateway.config import Cluster, Endpoint
    from gateway.upstream import Upstreams

    child = subprocess.Popen([sys.executable, "-m", "bench.callout_cost", "--serve"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(child.stdout.readline())
        services = Upstreams((Cluster("http", (Endpoint("127.0.0.1", ports["http"]),)),
                              Cluster("grpc", (Endpoint("127.0.0.1", ports["grpc"]),), protocol="grpc")))
        with tempfile.TemporaryDirectory() as tmp:
            specs = []
            for mode in MODES:
                path = Path(tmp) / f"{mode}.wat"
                path.write_text(filter_wat(mode))
                specs.append(FilterSpec(name=mode, wasm_path=path))
            host = await load_filter_host(specs, services)
        try:
            for mode in MODES:
                await run(host, mode, min(500, args.n))          # warm up: connections, caches
            results: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    results[mode].append(await run(host, mode, args.n, args.concurrency))
        finally:
            await host.close()
            await services.aclose()
    finally:
        child.stdin.close()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    med = {m: statistics.median(v) for m, v in results.items()}
    print(f"callout CPU, {args.n} requests x {args.repeats} rounds, {args.concurrency} in flight "
          "(median of rounds; µs of this process's CPU, all threads)")
    for m in MODES:
        print(f"  {m:5} {med[m]:8.1f} µs/request   (rounds: {', '.join(f'{x:.0f}' for x in results[m])})")
    http, grpc_ = med["http"] - med["none"], med["grpc"] - med["none"]
    print(f"  per callout: http_call {http:.1f} µs, grpc_call {grpc_:.1f} µs -> grpc/http = {grpc_ / http:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000, help="requests per mode per round")
    p.add_argument("-r", "--repeats", type=int, default=5)
    p.add_argument("-c", "--concurrency", type=int, default=1,
                   help="requests in flight at once (default 1: one after another)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_serve() if args.serve else main_async(args))


if __name__ == "__main__":
    main()
