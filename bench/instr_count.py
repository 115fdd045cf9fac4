"""Requests through the in-process chain, to count the instructions they execute: a figure the
machine's load does not move (CPU time on this shared 2-core box varies ±20 % run to run).

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.instr_count N [--filters auth,ratelimit,headers] [--wasm X.wat --copies K]

Run it for two N (e.g. 100 and 600) and divide the difference of valgrind's "Collected" totals
by the difference of the N: instructions per request, loading and the 200-request warm-up
cancelled out. Same hosts and requests as ``bench.chain_profile`` (its ``load`` and ``run``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

from bench.chain_profile import load, run, wasm_spec

WARM_UP = 200


async def main_async(args) -> None:
    names = args.filters.split(",") if args.filters else []
    extra = []
    if args.wasm:
        spec = wasm_spec(Path(args.wasm), args.config, args.root_id)
        extra = [dataclasses.replace(spec, name=f"{spec.name}{i}") for i in range(args.copies)]
    host = await load(names, extra=extra)
    chain = names + [s.name for s in extra]
    try:
        await run(host, chain, WARM_UP)
        await run(host, chain, args.n)
    finally:
        await host.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int, help="requests after the warm-up")
    p.add_argument("--filters", default="", help="bench filters, comma-separated (default none)")
    p.add_argument("--wasm", help="a module of your own on the route too, e.g. a no-op .wat")
    p.add_argument("--copies", type=int, default=1, help="--wasm this many times (K filters)")
    p.add_argument("--config", default="", help="--wasm's plugin configuration")
    p.add_argument("--root-id", default="", help="--wasm's root_id")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
