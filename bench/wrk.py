"""Run wrk (1 thread) and read its results from a Lua done() hook as JSON (exact percentiles
from wrk's histogram, in µs), not from the human-readable text."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int          # wrk counts status >= 400 (non-2xx/3xx) as "status errors"
    socket_errors: int
    raw: dict

    def ok(self) -> bool:
        return self.non_2xx == 0 and self.socket_errors == 0 and self.requests > 0


def run_wrk(wrk_bin: str, url: str, *, duration_s: float, connections: int,
            headers: dict[str, str] | None = None, cpus: str | None = None,
            workdir: Path, timeout_s: str = "5s") -> WrkResult:
    script = workdir / "wrk_done.lua"
    if not script.exists():
        script.write_text(_LUA)
    argv = [wrk_bin, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={timeout_s}", "--latency", "-s", str(script)]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    if cpus:
        argv = ["taskset", "-c", cpus] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc={r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
    d = json.loads(line[len("WRKJSON "):])
    dur = d["duration_us"] / 1e6
    return WrkResult(
        requests=d["requests"], duration_s=dur,
        rps=d["requests"] / dur if dur else 0.0,
        p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000, non_2xx=d["status_errors"],
        socket_errors=d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"],
        raw=d)
