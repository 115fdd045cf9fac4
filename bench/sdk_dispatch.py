"""What the Rust SDK's dispatch costs per guest callback, two filter builds side by side (not a test).

    python -m bench.sdk_dispatch A_DIR B_DIR [-n 20000] [-r 8]

Loads auth.wasm of each build (filters/dist layout) through the ABI host and times, through
``Filter.call`` as the chain calls a guest, CPU µs per call of: the empty export
``proxy_abi_version_0_2_1`` (the crossing alone), ``proxy_on_response_headers`` of an HTTP
context (auth keeps it at the SDK's default ``Continue``: the SDK's dispatch alone), and a
``proxy_on_context_create`` + ``proxy_on_delete`` pair. Rounds alternate which build goes
first; the table shows medians and the median of the paired differences (B − A).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench.chain_profile import load

CONTEXT_ID = 1_000_000          # an HTTP context the guest creates for the calls below


def _time(f, n: int, calls) -> float:
    t0 = time.process_time()
    for i in range(n):
        calls(f, i)
    return (time.process_time() - t0) / n * 1e6


CASES = {
    "empty export": lambda f, i: f.call(f.root, "proxy_abi_version_0_2_1"),
    "do-nothing response_headers": lambda f, i: f.call(f.root, "proxy_on_response_headers", CONTEXT_ID, 0, 1),
    "context create + delete": lambda f, i: (f.call(f.root, "proxy_on_context_create", 2 * CONTEXT_ID + i, f.root.id),
                                             f.call(f.root, "proxy_on_delete", 2 * CONTEXT_ID + i)),
}


async def main_async(args) -> None:
    hosts = [await load(["auth"], Path(d)) for d in (args.a, args.b)]
    try:
        fs = [h.filters["auth"] for h in hosts]
        for f in fs:
            f.call(f.root, "proxy_on_context_create", CONTEXT_ID, f.root.id)
        res = {(k, w): [] for k in CASES for w in (0, 1)}
        for r in range(args.repeats):
            for w in ((1, 0) if r % 2 else (0, 1)):      # which build goes first alternates
                for k, calls in CASES.items():
                    res[(k, w)].append(_time(fs[w], args.n, calls))
        print(f"A {args.a}   B {args.b}   {args.n} calls x {args.repeats} rounds, CPU µs per call")
        for k in CASES:
            a, b = res[(k, 0)], res[(k, 1)]
            d = statistics.median(y - x for x, y in zip(a, b))
            print(f"  {k:30s} A {statistics.median(a):6.3f}   B {statistics.median(b):6.3f}   B - A {d:+.3f}")
    finally:
        for h in hosts:
            await h.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-r", "--repeats", type=int, default=8)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
