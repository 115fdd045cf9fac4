"""In-process profile of the filter chain (not a test): µs of CPU per request through abi/.

    python -m bench.chain_profile                 # auth → ratelimit → headers, µs/request
    python -m bench.chain_profile --profile       # + cProfile of one run (top 30 by tottime)
    python -m bench.chain_profile --filters auth  # any subset / order of the bench filters
    python -m bench.chain_profile -n 20000 -r 7   # requests per run, runs (best and median shown)
    python -m bench.chain_profile --dist DIR      # the same filters built elsewhere (e.g. opt-level 3)
    python -m bench.chain_profile --dist B --against-dist A   # the filters of two builds,
                                                  # runs interleaved (a: e.g. main's filters/dist)
    python -m bench.chain_profile --breakdown     # time inside each guest callback (host calls
                                                  # excluded) and each host function, per request
    python -m bench.chain_profile --wasm F.wasm --config 'add-header x-a b' [--root-id ID]
                          [--expect-header x-a]   # any one module instead (e.g. a filters/examples
                                                  # build); the request must reach the upstream,
                                                  # with each --expect-header on it
    python -m bench.chain_profile --trace         # the per-request filter trace on vs off, runs
                                                  # interleaved (recording + the summary the
                                                  # access log formats)
    python -m bench.chain_profile --store shm     # the chain on the gateway-wide ShmStore (what
                                                  # each of 2+ workers uses) vs the one-process
                                                  # LocalStore, runs interleaved
    python -m bench.chain_profile --against /tmp/main-tree  # this tree's abi/ vs the abi/ of
                                                  # another tree (e.g. `git archive main`, with
                                                  # its abi/engine/_crossing*.so built or
                                                  # copied), both loaded in this process, runs
                                                  # interleaved: paired "filters add"

Loads the real filters/dist/*.wasm with the benchmark's configs (bench/gateway_cfg.py, the
ones `python -m bench` runs: an API key that auth accepts, a rate limit that never rejects)
through ``abi.api.load_filter_host`` with a fake HostServices, then drives each request the way
gateway/proxy.py does: ``host.stream(...)`` → ``request(...)`` → ``response(...)`` →
``finish(...)``, with 4 pseudo + 8 request headers (x-api-key among them), a GET without body,
and a 200 with 5 response headers and a content-length body (never iterated by the chain,
since no bench filter has a body callback). No sockets, no HTTP parsing: only the ABI host.

Every response is checked (the chain must forward, the filters' headers must be there), so a
run that silently stopped running the filters cannot look fast.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import time
from pathlib import Path

from abi.api import (CallFailed, FilterSpec, Forward, LogInfo, StreamInfo, create_shared_store,
                     load_filter_host, remove_shared_store)
from bench.gateway_cfg import API_KEY, API_KEY_HEADER, CHAIN, DIST, FILTER_CONFIGS

SHARED_DATA_MAX_BYTES = 16 << 20      # --store shm: the config's default shared_data.max_bytes
REQUEST_HEADERS = [
    (":method", "GET"), (":path", "/api/v1/items?page=2&sort=asc"), (":authority", "bench.local:8080"),
    (":scheme", "http"),
    ("user-agent", "wrk/4.2.0 (bench; x86_64-pc-linux-gnu)"),
    ("accept", "application/json, text/plain;q=0.9, */*;q=0.8"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-language", "en-US,en;q=0.5"),
    (API_KEY_HEADER, API_KEY),
    ("x-forwarded-for", "203.0.113.7"),
    ("cookie", "session=4f9a1c2e7b3d; theme=dark"),
    ("x-trace-id", "b7ad6b7169203331"),
]
RESPONSE_STATUS = 200
RESPONSE_HEADERS = [
    ("server", "nginx/1.22.1"), ("date", "Wed, 25 Nov 2026 03:00:00 GMT"),
    ("content-type", "application/json"), ("content-length", "2"), ("etag", '"6543-2"'),
]


class _Body:
    """A response body iterator the chain hands back untouched (never iterated here)."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class FakeServices:
    def __init__(self, shared_store=None) -> None:
        self.log = logging.getLogger("bench.chain_profile")
        if shared_store is not None:         # else the filter host makes a LocalStore
            self.shared_store = shared_store

    def has_cluster(self, name: str) -> bool:
        return False

    async def http_call(self, cluster, method, path, authority, headers, body, timeout_s, reserve=None):
        raise CallFailed("no clusters in the profile harness")


def wasm_spec(path: Path, config: str, root_id: str, api=None) -> FilterSpec:
    """--wasm: one module of the user's, named by its file stem, its config sent as is."""
    spec = FilterSpec if api is None else api.FilterSpec
    return spec(name=Path(path).stem, wasm_path=Path(path), configuration=config.encode(),
                root_id=root_id)


def specs(names: list[str], dist: Path = DIST, api=None) -> list[FilterSpec]:
    spec = FilterSpec if api is None else api.FilterSpec
    return [spec(name=n, wasm_path=Path(dist) / f"{n}.wasm",
                       configuration=json.dumps(FILTER_CONFIGS[n]).encode())
            for n in names]


async def load(names: list[str], dist: Path = DIST, extra: list[FilterSpec] = (), shared_store=None,
               api=None):
    """``api``: another tree's abi.api (--against); default this tree's."""
    loader = load_filter_host if api is None else api.load_filter_host
    return await loader(specs(names, dist, api) + list(extra), FakeServices(shared_store))


def import_abi(tree: Path, alias: str = "abi_against"):
    """The abi/ package of another source tree, imported under `alias` (its imports are all
    relative), next to this tree's; returns its ``api`` module."""
    import importlib
    import importlib.util
    import sys
    pkg = Path(tree) / "abi"
    spec = importlib.util.spec_from_file_location(alias, pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return importlib.import_module(alias + ".api")


def _check(names: list[str], fwd_req, fwd_resp, expect_request: list[str] = (), api=None) -> None:
    forward = Forward if api is None else api.Forward
    if not isinstance(fwd_req, forward) or not isinstance(fwd_resp, forward):
        raise SystemExit(f"the chain did not forward: {fwd_req!r} / {fwd_resp!r}")
    req = dict(fwd_req.headers)
    resp = dict(fwd_resp.headers)
    expect = [(h in req, f"request header {h}") for h in expect_request]
    if "auth" in names:
        expect.append((API_KEY_HEADER not in req or "x-auth-identity" in req, "auth identity"))
    if "headers" in names:
        expect.append(("x-request-id" in req, "headers: x-request-id"))
        expect.append(("x-served-by" in resp, "headers: x-served-by"))
    if "ratelimit" in names:
        expect.append(("ratelimit-limit" in resp, "ratelimit: ratelimit-limit"))
    missing = [what for ok, what in expect if not ok]
    if missing:
        raise SystemExit(f"filters did not run as expected: {missing}\n  request {req}\n  response {resp}")


async def run(host, names: list[str], n: int, *, check_every: int = 1000,
              expect_request: list[str] = (), trace: bool = False, api=None) -> float:
    """n requests, one after another; returns CPU µs per request (process time). ``trace``: the
    stream records the filter trace and its summary is formatted, as for the access log.
    ``api``: the abi.api of the tree `host` comes from (--against)."""
    stream_info, log_info = (StreamInfo, LogInfo) if api is None else (api.StreamInfo, api.LogInfo)
    body = _Body()
    log = log_info(status=RESPONSE_STATUS, bytes_in=0, bytes_out=2, duration_ns=1000,
                  upstream_address="127.0.0.1:9000")
    local = ("127.0.0.1", 8080)
    t0 = time.process_time()
    for i in range(n):
        info = stream_info(request_id=f"req-{i}", route_name="bench", cluster_name="upstream",
                          client_addr=("127.0.0.1", 40000 + (i & 1023)), local_addr=local,
                          connection_id=i >> 6, start_time_ns=time.time_ns(), trace=trace)
        stream = host.stream(names, info)
        fwd_req = await stream.request(list(REQUEST_HEADERS), None)
        fwd_resp = await stream.response(RESPONSE_STATUS,
                                         [(":status", "200")] + RESPONSE_HEADERS, body)
        await stream.finish(log)
        summary = stream.trace_summary() if trace else ""
        if i % check_every == 0:
            _check(names, fwd_req, fwd_resp, expect_request, api)
            if trace and summary.count("rqh=C,rsh=C") != len(names):
                raise SystemExit(f"the trace did not record every filter: {summary!r}")
    return (time.process_time() - t0) / n * 1e6


def instrument():
    """Time every guest export call (minus the host functions it made) and every host function.

    Patches abi.filter before filters load; the timers add ~0.2 µs per crossing, so absolute
    totals are inflated: read it for proportions (guest work vs host Python vs the rest)."""
    import collections

    import abi.filter as F
    pc = time.perf_counter
    host_total = [0.0]
    stats: dict[str, collections.Counter] = {"guest": collections.Counter(),
                                             "host": collections.Counter(),
                                             "n_guest": collections.Counter(),
                                             "n_host": collections.Counter(),
                                             "alloc": collections.Counter(),
                                             "n_alloc": collections.Counter()}
    orig_guarded = F.guarded

    def guarded(f, name, fn, **kw):
        inner = orig_guarded(f, name, fn, **kw)

        def timed(*a):
            t = pc()
            try:
                return inner(*a)
            finally:
                d = pc() - t
                host_total[0] += d
                stats["host"][(f.name, name)] += d
                stats["n_host"][(f.name, name)] += 1
        return timed

    orig_init = F.Filter.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        orig_funcs = self.__dict__.get("_funcs")
        fname = self.name

        class TimedFuncs(dict):
            def __setitem__(d, key, fn):
                def timed(*args):
                    h0, t = host_total[0], pc()
                    try:
                        return fn(*args)
                    finally:
                        stats["guest"][(fname, key)] += (pc() - t) - (host_total[0] - h0)
                        stats["n_guest"][(fname, key)] += 1
                dict.__setitem__(d, key, timed)
        def timed_alloc(fn):
            if fn is None:
                return None

            def alloc(size):
                t = pc()
                try:
                    return fn(size)
                finally:
                    stats["alloc"][(fname, "allocator (inside host functions)")] += pc() - t
                    stats["n_alloc"][(fname, "allocator (inside host functions)")] += 1
            return alloc
        orig_alloc = self.__dict__.get("_alloc")
        self.__class__ = type("TimedFilter", (self.__class__,), {
            "_funcs": property(lambda s: s.__dict__["_tf"],
                               lambda s, v: s.__dict__.__setitem__("_tf", TimedFuncs(v))),
            "_alloc": property(lambda s: s.__dict__["_ta"],
                               lambda s, v: s.__dict__.__setitem__("_ta", timed_alloc(v)))})
        self._funcs = orig_funcs or {}
        self._alloc = orig_alloc

    F.guarded = guarded
    F.Filter.__init__ = init
    return stats


def print_breakdown(stats, n: int) -> None:
    for kind, label in (("guest", "guest callback (own time, host calls excluded)"),
                        ("host", "host function (incl. nested allocator calls)"),
                        ("alloc", "of which the guest allocator (returned buffers)")):
        total = sum(stats[kind].values()) / n * 1e6
        print(f"  {label}: {total:.1f} µs/request")
        for (fname, name), t in sorted(stats[kind].items(), key=lambda kv: -kv[1]):
            print(f"    {fname:10s} {name:36s} {stats['n_' + kind][(fname, name)] / n:4.1f}/req"
                  f"  {t / n * 1e6:6.2f} µs")


async def main_async(args) -> None:
    extra = [wasm_spec(Path(args.wasm), args.config, args.root_id)] if args.wasm else []
    names = args.filters.split(",") if args.filters else ([] if extra else list(CHAIN))
    stats = instrument() if args.breakdown else None
    host = await load(names, Path(args.dist), extra)
    loaded = list(names)                    # the bench filters; then the --wasm module's name
    names += [s.name for s in extra]
    expect = args.expect_header
    empty = await load([])
    try:
        await run(host, names, min(2000, args.n), expect_request=expect)   # warm up (allocator, caches)
        if args.trace:
            await trace_cost(host, names, args)
            return
        if args.store == "shm":
            await store_cost(loaded, extra, names, args)
            return
        if args.against:
            await against_cost(host, empty, loaded, names, args)
            return
        if args.against_dist:
            await dist_cost(host, loaded, extra, names, args)
            return
        base = [await run(empty, [], args.n) for _ in range(args.repeats)]
        chain = [await run(host, names, args.n, expect_request=expect) for _ in range(args.repeats)]
        if stats is not None:
            for c in stats.values():
                c.clear()
            t = await run(host, names, args.n, expect_request=expect)
            print(f"breakdown (instrumented run: {t:.1f} µs/request CPU; parts below are wall clock, timers included)")
            print_breakdown(stats, args.n)
            return                  # everything in this process is instrumented now
        b, c = min(base), min(chain)
        print(f"filters: {' -> '.join(names) or '(none)'}   {args.n} requests x {args.repeats} runs")
        print(f"  chain:       best {c:7.1f} µs/request   median {statistics.median(chain):7.1f}")
        print(f"  empty chain: best {b:7.1f} µs/request   median {statistics.median(base):7.1f}")
        print(f"  filters add: {c - b:7.1f} µs/request")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            await run(host, names, args.n, expect_request=expect)
            prof.disable()
            out = io.StringIO()
            st = pstats.Stats(prof, stream=out).sort_stats(args.sort)
            st.print_stats(args.top)
            print(out.getvalue())
    finally:
        await host.close()
        await empty.close()


async def trace_cost(host, names: list[str], args) -> None:
    """Trace off / on in paired runs of one process: what recording and formatting the
    per-request filter trace adds to the chain, per request."""
    off, on = [], []
    for r in range(args.repeats):
        # Which of the pair runs first alternates, so a drift (allocator, caches) favours neither.
        if r % 2:
            on.append(await run(host, names, args.n, trace=True))
            off.append(await run(host, names, args.n))
        else:
            off.append(await run(host, names, args.n))
            on.append(await run(host, names, args.n, trace=True))
    added = statistics.median(b - a for a, b in zip(off, on))
    print(f"filters: {' -> '.join(names)}   {args.n} requests x {args.repeats} run pairs (off/on)")
    print(f"  trace off: best {min(off):7.1f} µs/request   median {statistics.median(off):7.1f}")
    print(f"  trace on:  best {min(on):7.1f} µs/request   median {statistics.median(on):7.1f}")
    print(f"  the trace adds {added:.1f} µs/request (median of pair differences), "
          f"{added / statistics.median(off):.1%} of the chain's")


async def against_cost(host, empty, loaded: list[str], names: list[str], args) -> None:
    """This tree's abi/ (b) against another tree's (a), both in this process, runs alternating
    (which goes first alternates too): "filters add" of each and the paired difference."""
    api = import_abi(Path(args.against))
    extra = [wasm_spec(Path(args.wasm), args.config, args.root_id, api)] if args.wasm else []
    other = await load(loaded, Path(args.dist), extra, api=api)
    other_empty = await load([], api=api)
    try:
        expect = args.expect_header
        await run(other, names, min(2000, args.n), expect_request=expect, api=api)   # warm up
        a, b = [], []
        for r in range(args.repeats):
            pair = [(a, other, other_empty, api), (b, host, empty, None)]
            for out, h, e, which in (pair[::-1] if r % 2 else pair):
                base = await run(e, [], args.n // 4, api=which)
                out.append(await run(h, names, args.n, expect_request=expect, api=which) - base)
    finally:
        await other.close()
        await other_empty.close()
    print_pairs(names, args, "filters add", (str(args.against), a), ("this tree", b))


def print_pairs(names: list[str], args, what: str, a: tuple[str, list[float]],
                b: tuple[str, list[float]]) -> None:
    """Paired runs (label, µs per request): each side's best and median, the median of the
    pair differences, how many pairs b won."""
    (la, a), (lb, b) = a, b
    diff = [y - x for x, y in zip(a, b)]
    print(f"filters: {' -> '.join(names)}   {args.n} requests x {args.repeats} run pairs")
    print(f"  a ({la}): {what}  best {min(a):7.1f}  median {statistics.median(a):7.1f} µs/request")
    print(f"  b ({lb}): {what}  best {min(b):7.1f}  median {statistics.median(b):7.1f} µs/request")
    print(f"  b - a: median of pair differences {statistics.median(diff):+.1f} µs/request, "
          f"ratio of medians {statistics.median(b) / statistics.median(a):.3f}; "
          f"b faster in {sum(d < 0 for d in diff)} of {len(diff)} pairs")
    print("  pairs a/b: " + ", ".join(f"{x:.1f}/{y:.1f}" for x, y in zip(a, b)))


async def paired_runs(host_a, host_b, names: list[str], args) -> tuple[list[float], list[float]]:
    """args.repeats runs of the chain on each host, in pairs; which of a pair runs first
    alternates, so a drift (allocator, caches, the machine) favours neither."""
    a, b = [], []
    for r in range(args.repeats):
        pair = [(a, host_a), (b, host_b)]
        for out, h in (pair[::-1] if r % 2 else pair):
            out.append(await run(h, names, args.n, expect_request=args.expect_header))
    return a, b


async def dist_cost(host, loaded: list[str], extra: list[FilterSpec], names: list[str], args) -> None:
    """The filters of --against-dist (a) and of --dist (b), paired runs in one process: what a
    rebuild of the guest code (compiler options, SDK or filter changes) buys per request."""
    base_host = await load(loaded, Path(args.against_dist), extra)
    try:
        await run(base_host, names, min(2000, args.n), expect_request=args.expect_header)  # warm up
        a, b = await paired_runs(base_host, host, names, args)
    finally:
        await base_host.close()
    print_pairs(names, args, "chain", (str(args.against_dist), a), (str(args.dist), b))


async def store_cost(loaded: list[str], extra: list[FilterSpec], names: list[str], args) -> None:
    """The same chain on a LocalStore and on an ShmStore (LMDB on /dev/shm, as 2+ workers
    share), paired runs in one process: what the gateway-wide store adds per request."""
    name = f"chain-profile-{os.getpid()}"
    shm = create_shared_store(name, SHARED_DATA_MAX_BYTES)
    local_host = await load(loaded, Path(args.dist), extra)
    shm_host = await load(loaded, Path(args.dist), extra, shared_store=shm)
    try:
        expect = args.expect_header
        for h in (local_host, shm_host):                   # warm up (allocator, caches)
            await run(h, names, min(2000, args.n), expect_request=expect)
        local, on_shm = await paired_runs(local_host, shm_host, names, args)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            await run(shm_host, names, args.n)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(out.getvalue())
    finally:
        await shm_host.close()
        await local_host.close()
        shm.close()
        remove_shared_store(name)
    added = statistics.median(b - a for a, b in zip(local, on_shm))
    print(f"filters: {' -> '.join(names)}   {args.n} requests x {args.repeats} run pairs (local/shm)")
    print(f"  LocalStore: best {min(local):7.1f} µs/request   median {statistics.median(local):7.1f}")
    print(f"  ShmStore:   best {min(on_shm):7.1f} µs/request   median {statistics.median(on_shm):7.1f}")
    print(f"  the shm store adds {added:.1f} µs/request (median of pair differences), "
          f"ratio {statistics.median(on_shm) / statistics.median(local):.3f}")


def measure(n: int = 2000, repeats: int = 7) -> dict[str, float]:
    """What `./dev bench` reports (scenario ``chain_profile``): the bench chain's "filters add"
    in this process, best of `repeats` runs each paired with an empty chain's (µs/request)."""
    async def go() -> dict[str, float]:
        host = await load(list(CHAIN), DIST, [])
        empty = await load([])
        try:
            await run(host, list(CHAIN), n)             # warm up (allocator, caches)
            chain, base = [], []
            for _ in range(repeats):
                base.append(await run(empty, [], n // 4))
                chain.append(await run(host, list(CHAIN), n))
        finally:
            await host.close()
            await empty.close()
        return {"filters_add_us": min(chain) - min(base), "chain_us": min(chain), "empty_us": min(base)}
    return asyncio.run(go())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10000, help="requests per run")
    p.add_argument("-r", "--repeats", type=int, default=5)
    p.add_argument("--filters", default="", help="comma-separated, default auth,ratelimit,headers")
    p.add_argument("--dist", default=str(DIST), help="directory of the .wasm files (default filters/dist)")
    p.add_argument("--wasm", help="profile this module (after any --filters), e.g. a filters/examples build")
    p.add_argument("--config", default="", help="--wasm's plugin configuration, sent as is")
    p.add_argument("--root-id", default="", help="--wasm's root_id (AssemblyScript/C++ SDKs)")
    p.add_argument("--expect-header", action="append", default=[],
                   help="a request header the upstream must receive (proves the module ran)")
    p.add_argument("--breakdown", action="store_true",
                   help="per guest callback / host function times (instrumented)")
    p.add_argument("--profile", action="store_true", help="cProfile one more run")
    p.add_argument("--trace", action="store_true", help="the per-request filter trace: off vs on")
    p.add_argument("--store", choices=("local", "shm"), default="local",
                   help="shm: the chain on the gateway-wide ShmStore vs the LocalStore, interleaved")
    p.add_argument("--against-dist", metavar="DIR",
                   help="these .wasm files (a) vs --dist's (b), runs interleaved (paired)")
    p.add_argument("--against", metavar="TREE",
                   help="another source tree whose abi/ runs interleaved with this one's (paired)")
    p.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative...)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
