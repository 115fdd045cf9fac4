"""One client pipelining requests the gateway answers itself, against everyone else.

    python -m bench.pipeline_flood [--seconds 6] [--cycles 1,8,32,100000] [--rate 200]
    python -m bench.pipeline_flood --h2 100 --cycles 1,4,8,16,100000
                                        # the flood on one HTTP/2 connection instead, for
                                        # limits.http2_max_streams_per_io_cycle

An nginx upstream on 127.0.0.1; the gateway runs the bench chain (auth → ratelimit → headers,
bench/gateway_cfg.py) pinned to CPU 1, the clients to CPU 0. For each
``limits.max_requests_per_io_cycle`` in ``--cycles`` (a fresh gateway each):

- the flooder sends batches of ``--batch`` pipelined `GET /x` without an API key on one
  connection (auth answers each with a 401, no upstream involved) and reads all the answers
  before the next batch; with ``--h2 M``, ``h2load -c1 -mM`` keeps M such streams in flight on
  one h2c connection (prior knowledge) instead;
- meanwhile ``bench.paced`` sends ``--rate`` proper requests per second on 8 other
  connections (each goes through the chain to the upstream).

Printed per value: the paced client's p50/p99/max and the flooder's answers per second; first
the paced client alone, as the reference. Bounded: loopback only, ``--seconds`` per run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import gateway_cfg as gcfg
from bench.procs import Proc, free_port, stop_all, wait_ready
from bench.slow_clients import _UPSTREAM, start_nginx
from bench.tools import ROOT, ensure_tools

UNBOUNDED = 100000          # more than a batch: one connection's whole batch in one go
_ANSWER = b"HTTP/1.1 401"


def flood(port: int, batch: int, seconds: float, out: dict) -> None:
    """Pipelined batches on one connection until ``seconds`` pass; answers counted into out."""
    request = b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n" * batch
    answered = 0
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        while time.monotonic() - t0 < seconds:
            s.sendall(request)
            got, tail = 0, b""
            while got < batch:
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError("the gateway closed the flooding connection")
                chunk = tail + data
                got += chunk.count(_ANSWER)
                tail = chunk[1 - len(_ANSWER):]     # a status line split across reads, never a whole one
            answered += got
    out["answers_per_s"] = round(answered / (time.monotonic() - t0))


def flood_h2(h2load: str, port: int, streams: int, seconds: float, out: dict) -> None:
    """One HTTP/2 connection keeping ``streams`` requests without the API key in flight."""
    argv = ["taskset", "-c", "0", h2load, "-t1", "-c1", f"-m{streams}", f"-D{max(1, round(seconds))}",
            f"http://127.0.0.1:{port}/x"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx", r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"h2load failed (rc={r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
    out["answers_per_s"] = round(int(m.group(1)) / max(1, round(seconds)))


def paced(port: int, rate: float, seconds: float) -> dict:
    argv = ["taskset", "-c", "0", sys.executable, "-m", "bench.paced", "--url", f"http://127.0.0.1:{port}/",
            "--rate", str(rate), "--duration", str(seconds), "--warmup", "0", "--connections", "8",
            "-H", f"{gcfg.API_KEY_HEADER}: {gcfg.API_KEY}"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 60)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: round(d[k], 2) for k in ("completed", "p50_ms", "p99_ms", "max_ms") if k in d}


def run_gateway(scratch: Path, upstream_port: int, cycle: int | None, knob: str) -> tuple[Proc, int]:
    port, admin = free_port(), free_port()
    cfg = gcfg.gateway_config(port=port, admin_port=admin, upstream_port=upstream_port,
                              filters=gcfg.CHAIN_FILTERS)
    if cycle is not None:
        cfg["limits"][knob] = cycle
    path = gcfg.write_config(scratch / f"gateway-{cycle}.yaml", cfg)
    proc = Proc(f"gateway-{cycle}", ["taskset", "-c", "1", sys.executable, "-m", "gateway.cli", "run", "-c",
                                     str(path)], cwd=ROOT, log_path=scratch / f"gateway-{cycle}.log")
    wait_ready(f"http://127.0.0.1:{admin}/ready", proc, timeout=60)
    return proc, port


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline_flood", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per run (≤ 30)")
    ap.add_argument("--cycles", default=f"1,8,32,{UNBOUNDED}",
                    help="values of max_requests_per_io_cycle (with --h2: http2_max_streams_per_io_cycle)")
    ap.add_argument("--rate", type=float, default=200.0, help="the paced client's requests per second")
    ap.add_argument("--batch", type=int, default=4000, help="pipelined requests per flood batch")
    ap.add_argument("--h2", type=int, metavar="M", help="flood with M streams in flight on one HTTP/2 connection")
    args = ap.parse_args(argv)
    seconds = min(args.seconds, 30.0)
    knob = "http2_max_streams_per_io_cycle" if args.h2 else "max_requests_per_io_cycle"
    os.sched_setaffinity(0, {0})    # the flooder and the upstream on CPU 0, as the bench's load
    if gcfg.missing_wasm():
        print(f"filters not built: {', '.join(gcfg.missing_wasm())} (./dev build-filters)")
        return 1
    tools = ensure_tools()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="wasmgate-flood-") as tmp:
        scratch = Path(tmp)
        (scratch / "big").write_bytes(b"b")
        try:
            up_port = free_port()
            start_nginx(tools["nginx"], scratch / "upstream", "upstream",
                        _UPSTREAM.format(port=up_port, big=scratch / "big"), up_port)
            proc, port = run_gateway(scratch, up_port, None, knob)
            try:
                results["alone"] = {"paced": paced(port, args.rate, seconds)}
            finally:
                proc.stop()
            print(f"{'alone':>22}: paced {json.dumps(results['alone']['paced'])}", flush=True)
            for cycle in (int(c) for c in args.cycles.split(",")):
                proc, port = run_gateway(scratch, up_port, cycle, knob)
                try:
                    fl: dict = {}
                    target, fargs = (flood_h2, (tools["h2load"], port, args.h2)) if args.h2 else \
                        (flood, (port, args.batch))
                    t = threading.Thread(target=target, args=(*fargs, seconds + 1, fl), daemon=True)
                    t.start()
                    time.sleep(0.5)         # the flood under way before the paced client starts
                    res = {"paced": paced(port, args.rate, seconds)}
                    t.join(seconds + 60)
                    res["flood"] = fl
                finally:
                    proc.stop()
                results[f"{knob}={cycle}"] = res
                print(f"{'cycle ' + str(cycle):>22}: paced {json.dumps(res['paced'])}  flood {json.dumps(fl)}",
                      flush=True)
        finally:
            stop_all()
    flooder = f"h2load -c1 -m{args.h2} (h2c)" if args.h2 else f"HTTP/1.1, batches of {args.batch}"
    print(json.dumps({"pipeline_flood": results, "rate": args.rate, "flooder": flooder, "seconds": seconds},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
