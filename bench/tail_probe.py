"""Where the slow 1 % of a paced run goes: `python -m bench.tail_probe [--rate 1100] [--duration 8]`.

Starts an upstream nginx and a gateway (the bench's gateway_chain config, or --plain) pinned as the
bench pins them (gateway on CPU 1; nginx and the paced client on CPU 0), the gateway with two
probes installed before it starts: ``gc.callbacks`` timing every collection, and an event-loop
stall monitor (a callback every 2 ms noting how late it ran, by ``time.perf_counter``). Then one
``bench.paced`` run records every request's issue time and latency; the gateway hands over its
probe records (SIGUSR2) and the probe prints, for the requests at or above the p99, how many
overlapped a collection, how many a loop stall with no collection under it, and how long the
gateway's main thread and the client waited for a CPU (other work on their cores) — the tail's
causes side by side. Both processes read the same clock (CLOCK_MONOTONIC).

The gateway side runs as ``python -m bench.tail_probe --serve OUT -- <wasmgate run args>``.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gateway_cfg as gcfg
from bench.nginx import start_nginx
from bench.procs import Proc, free_port, stop_all, tree_wait_seconds, wait_ready
from bench.tools import ROOT, find_nginx

STALL_PERIOD_S = 0.002
STALL_MIN_S = 0.0015        # uvloop timers have 1 ms granularity: later than that is a stall


def serve(out: str, argv: list[str]) -> int:
    """The gateway with the probes (runs in the gateway's process)."""
    now = time.perf_counter
    collections: list[tuple[float, int, float]] = []     # (start, generation, seconds)
    stalls: list[tuple[float, float]] = []               # (noticed at, seconds late)
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = now()
        else:
            collections.append((started[0], info["generation"], now() - started[0]))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        with open(out + ".tmp", "w") as f:
            json.dump({"gc": collections, "stalls": stalls}, f)
        os.replace(out + ".tmp", out)
        collections.clear()
        stalls.clear()

    def install() -> None:
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            t = now()
            if t - due > STALL_MIN_S:
                stalls.append((t, t - due))
            loop.call_later(STALL_PERIOD_S, tick, t + STALL_PERIOD_S)

        loop.call_later(STALL_PERIOD_S, tick, now() + STALL_PERIOD_S)
        loop.add_signal_handler(signal.SIGUSR2, dump)

    from gateway import cli, gc_tuning
    settle = gc_tuning.settle

    def settle_then_probe() -> None:    # called once the gateway runs: the loop exists
        settle()
        install()

    gc_tuning.settle = settle_then_probe
    return cli.main(argv)


def _overlaps(t0: float, lat: float, spans: list[tuple[float, float]]) -> bool:
    return any(s < t0 + lat and s + d > t0 for s, d in spans)


def analyse(requests: list[list[float]], probes: dict) -> dict:
    lat = sorted(x[1] for x in requests)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    slow = [(t0, x) for t0, x in requests if x >= p99]
    first, last = min(t0 for t0, _ in requests), max(t0 + x for t0, x in requests)
    gcs = [(s, d) for s, _, d in probes["gc"]]
    stalls = [(t - d, d) for t, d in probes["stalls"]]
    bare_stalls = [(s, d) for s, d in stalls if not _overlaps(s, d, gcs) and first <= s <= last]
    by_gc = sum(1 for t0, x in slow if _overlaps(t0, x, gcs))
    by_stall = sum(1 for t0, x in slow if not _overlaps(t0, x, gcs) and _overlaps(t0, x, bare_stalls))
    recorded = [(g, d) for s, g, d in probes["gc"] if first <= s <= last]   # not the warm-up's
    young = [d for g, d in recorded if g == 0]
    older = [d for g, d in recorded if g > 0]
    return {
        "requests": len(lat), "p50_ms": round(lat[len(lat) // 2] * 1e3, 3),
        "p99_ms": round(p99 * 1e3, 3),
        "slow": len(slow), "slow_in_gc": by_gc, "slow_in_other_stall": by_stall,
        "slow_unexplained": len(slow) - by_gc - by_stall,
        "young_gcs": len(young), "young_gc_ms": [round(d * 1e3, 2) for d in young],
        "older_gcs": len(older), "older_gc_ms": [round(d * 1e3, 2) for d in older],
        "stalls_over_1_5ms_without_gc": len(bare_stalls),
        "stall_ms_without_gc": round(sum(d for _, d in bare_stalls) * 1e3, 1),   # vs the CPU wait
        "worst_stalls_without_gc_ms": sorted(round(d * 1e3, 1) for _, d in bare_stalls)[-8:],
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(prog="python -m bench.tail_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1100.0, help="req/s (default 1100: about half "
                    "gateway_chain's peak here)")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--plain", action="store_true", help="no filters (gateway_plain's config)")
    args = ap.parse_args()
    nginx = find_nginx()
    if nginx is None:
        print("tail_probe: nginx not found (./dev bench installs it)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="wasmgate-tail-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        up_port = free_port()
        upstream = start_nginx(nginx, tmp / "upstream", "upstream", up_port, cpus="0")
        wait_ready(f"http://127.0.0.1:{up_port}/", upstream, 15)
        filters = None if args.plain else gcfg.CHAIN_FILTERS
        cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(), upstream_port=up_port,
                                  filters=filters)
        path = gcfg.write_config(tmp / "gateway.yaml", cfg)
        out = str(tmp / "probes.json")
        gw = Proc("gateway", ["taskset", "-c", "1", sys.executable, "-m", "bench.tail_probe", "--serve", out,
                              "--", "run", "-c", str(path)], cwd=ROOT, env=env, log_path=tmp / "gateway.log")
        wait_ready(f"http://127.0.0.1:{cfg['admin']['port']}/ready", gw, 60)
        url = f"http://127.0.0.1:{cfg['listeners'][0]['port']}/bench"
        record = tmp / "requests.json"
        argv = ["taskset", "-c", "0", sys.executable, "-m", "bench.paced", "--url", url,
                "--rate", str(args.rate), "--duration", str(args.duration), "--record", str(record)]
        for k, v in (gcfg.AUTH_HEADERS if filters else {}).items():
            argv += ["-H", f"{k}: {v}"]
        os.kill(gw.pid, signal.SIGUSR2)      # start-up's records out of the way
        wait0, t0 = tree_wait_seconds(gw.pid), time.monotonic()
        run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=args.duration + 60)
        wait1, t1 = tree_wait_seconds(gw.pid), time.monotonic()
        if run.returncode != 0:
            print(f"tail_probe: paced client failed: {run.stderr[-2000:]}", file=sys.stderr)
            return 1
        paced = json.loads(run.stdout.strip().splitlines()[-1])
        Path(out).unlink(missing_ok=True)
        os.kill(gw.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not Path(out).exists():
            if time.monotonic() > deadline:
                print(f"tail_probe: the gateway wrote no probe records:\n{gw.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.02)
        result = analyse(json.loads(record.read_text()), json.loads(Path(out).read_text()))
        result.update({"rate": args.rate, "route": "plain" if args.plain else "chain",
                       "statuses": paced["statuses"], "client_lag_p99_ms": round(paced["lag_p99_ms"], 3),
                       "client_wait_ms_per_s": round(paced["client_wait_ms_per_s"], 1),
                       "gateway_wait_ms_per_s": round((wait1 - wait0) / (t1 - t0) * 1e3, 1),
                       "gateway_wait_ms": round((wait1 - wait0) * 1e3, 1)})
        print(json.dumps(result, indent=1))
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
