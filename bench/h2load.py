"""Run h2load (nghttp2's HTTP/2 load generator, one thread) and read its results: totals from
its summary, latency percentiles from its per-request log (``--log-file``), as WrkResult."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench.wrk import WrkResult

_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def _percentile(sorted_us: list[int], p: float) -> float:
    if not sorted_us:
        return float("nan")
    return sorted_us[min(len(sorted_us) - 1, int(len(sorted_us) * p / 100))] / 1000


def run_h2load(h2load_bin: str, url: str, *, duration_s: float, connections: int, streams: int,
               headers: dict[str, str] | None = None, cpus: str | None = None, workdir: Path,
               warmup_s: float = 0.0) -> WrkResult:
    """``connections`` × ``streams`` requests in flight (h2c prior knowledge for http:// URLs)."""
    log = workdir / "h2load.log"
    argv = [h2load_bin, "-t1", f"-c{connections}", f"-m{streams}", f"-D{max(1, round(duration_s))}",
            f"--log-file={log}"]
    if warmup_s > 0:
        argv.append(f"--warm-up-time={max(1, round(warmup_s))}")
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    if cpus:
        argv = ["taskset", "-c", cpus] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + warmup_s + 60)
    fin, req, st = _FINISHED.search(r.stdout), _REQUESTS.search(r.stdout), _STATUS.search(r.stdout)
    if r.returncode != 0 or not (fin and req and st):
        raise RuntimeError(f"h2load failed (rc={r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
    latencies = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit():
            latencies.append(int(parts[2]))
    latencies.sort()
    done = int(req.group(3))
    dur = float(fin.group(1))
    return WrkResult(
        requests=done, duration_s=dur, rps=done / dur if dur else 0.0,
        p50_ms=_percentile(latencies, 50), p90_ms=_percentile(latencies, 90),
        p99_ms=_percentile(latencies, 99), max_ms=latencies[-1] / 1000 if latencies else float("nan"),
        # From the status counts: at the end of a timed run the last requests in flight can be
        # counted there but not as "done".
        non_2xx=int(st.group(2)) + int(st.group(3)) + int(st.group(4)),
        socket_errors=int(req.group(5)) + int(req.group(6)) + int(req.group(7)),
        raw={"stdout_tail": r.stdout[-600:], "connections": connections, "streams": streams})
