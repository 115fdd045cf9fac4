"""One client pipelining requests the gateway answers itself, against everyone else.

    python -m bench.pipeline_flood [--seconds 6] [--cycles 1,8,32,100000] [--rate 200]

An nginx upstream on 127.0.0.1; the gateway runs the bench chain (auth → ratelimit → headers,
bench/gateway_cfg.py) pinned to CPU 1, the clients to CPU 0. For each
``limits.max_requests_per_io_cycle`` in ``--cycles`` (a fresh gateway each):

- the flooder sends batches of ``--batch`` pipelined `GET /x` without an API key on one
  connection (auth answers each with a 401, no upstream involved) and reads all the answers
  before the next batch;
- meanwhile ``bench.paced`` sends ``--rate`` proper requests per second on 8 other
  connections (each goes through the chain to the upstream).

Printed per value: the paced client's p50/p99/max and the flooder's answers per second; first
the paced client alone, as the reference. Bounded: loopback only, ``--seconds`` per run.
"""
from __future__ import annotations

import argparse
import json
import os
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


def paced(port: int, rate: float, seconds: float) -> dict:
    argv = ["taskset", "-c", "0", sys.executable, "-m", "bench.paced", "--url", f"http://127.0.0.1:{port}/",
            "--rate", str(rate), "--duration", str(seconds), "--warmup", "0", "--connections", "8",
            "-H", f"{gcfg.API_KEY_HEADER}: {gcfg.API_KEY}"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 60)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: round(d[k], 2) for k in ("completed", "p50_ms", "p99_ms", "max_ms") if k in d}


def run_gateway(scratch: Path, upstream_port: int, cycle: int | None) -> tuple[Proc, int]:
    port, admin = free_port(), free_port()
    cfg = gcfg.gateway_config(port=port, admin_port=admin, upstream_port=upstream_port,
                              filters=gcfg.CHAIN_FILTERS)
    if cycle is not None:
        cfg["limits"]["max_requests_per_io_cycle"] = cycle
    path = gcfg.write_config(scratch / f"gateway-{cycle}.yaml", cfg)
    proc = Proc(f"gateway-{cycle}", ["taskset", "-c", "1", sys.executable, "-m", "gateway.cli", "run", "-c",
                                     str(path)], cwd=ROOT, log_path=scratch / f"gateway-{cycle}.log")
    wait_ready(f"http://127.0.0.1:{admin}/ready", proc, timeout=60)
    return proc, port


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline_flood", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per run (≤ 30)")
    ap.add_argument("--cycles", default=f"1,8,32,{UNBOUNDED}", help="max_requests_per_io_cycle values")
    ap.add_argument("--rate", type=float, default=200.0, help="the paced client's requests per second")
    ap.add_argument("--batch", type=int, default=4000, help="pipelined requests per flood batch")
    args = ap.parse_args(argv)
    seconds = min(args.seconds, 30.0)
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
            proc, port = run_gateway(scratch, up_port, None)
            try:
                results["alone"] = {"paced": paced(port, args.rate, seconds)}
            finally:
                proc.stop()
            print(f"{'alone':>22}: paced {json.dumps(results['alone']['paced'])}", flush=True)
            for cycle in (int(c) for c in args.cycles.split(",")):
                proc, port = run_gateway(scratch, up_port, cycle)
                try:
                    fl: dict = {}
                    t = threading.Thread(target=flood, args=(port, args.batch, seconds + 1, fl), daemon=True)
                    t.start()
                    time.sleep(0.5)         # the flood under way before the paced client starts
                    res = {"paced": paced(port, args.rate, seconds)}
                    t.join(seconds + 60)
                    res["flood"] = fl
                finally:
                    proc.stop()
                results[f"max_requests_per_io_cycle={cycle}"] = res
                print(f"{'cycle ' + str(cycle):>22}: paced {json.dumps(res['paced'])}  flood {json.dumps(fl)}",
                      flush=True)
        finally:
            stop_all()
    print(json.dumps({"pipeline_flood": results, "rate": args.rate, "batch": args.batch, "seconds": seconds},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
