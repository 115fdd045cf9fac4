"""Process bookkeeping for the benchmark: start, stop (always), ports, readiness, CPU time.

Everything the benchmark starts goes through `start()`, lands in its own process group, and is
stopped by `stop_all()` — called from `finally:` blocks and from the SIGINT/SIGTERM handlers.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_RUNNING: list["Proc"] = []


class Proc:
    def __init__(self, name: str, argv: list[str], *, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        if log_path:
            out.close()
        self.pid = self.popen.pid
        _RUNNING.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 25) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM the whole process group, SIGKILL it if it lingers."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        try:
            pgid = os.getpgid(self.pid)
        except ProcessLookupError:
            pgid = None
        if self.popen.poll() is None or pgid is not None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            # Children of the group (e.g. gateway workers, nginx workers) may outlive the leader.
            deadline = time.monotonic() + 2.0
            while _group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(self.pid, signal.SIGKILL)
            try:
                self.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_all() -> None:
    for p in list(reversed(_RUNNING)):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - cleanup must go on
            pass


def install_signal_handlers() -> None:
    """Ctrl-C / SIGTERM: turn into KeyboardInterrupt so `finally:` blocks stop everything."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0,
             cafile: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET; an https URL is verified against ``cafile`` (the bench's self-signed certificate)."""
    req = urllib.request.Request(url, headers=headers or {})
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_ready(url: str, proc: Proc | None, timeout: float, interval: float = 0.005,
               headers: dict[str, str] | None = None, cafile: str | None = None) -> float:
    """Poll `url` until it answers 200; return the monotonic time it did. Raises on timeout/exit."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before ready "
                               f"({url}); log tail:\n{proc.log_tail()}")
        try:
            status, _, _ = http_get(url, headers, timeout=1.0, cafile=cafile)
            if status == 200:
                return time.monotonic()
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(interval)
    tail = proc.log_tail() if proc else ""
    raise RuntimeError(f"{url} not ready after {timeout}s ({last}); log tail:\n{tail}")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = _read_stat(int(d))
        except OSError:
            continue
        kids.setdefault(st[1], []).append(int(d))
    return kids


def _read_stat(pid: int) -> tuple[int, int, int]:
    """(pid, ppid, utime+stime+cutime+cstime in ticks) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N-3]
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return pid, ppid, ticks


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user+system) of `root` and all its live descendants, plus what their
    already-reaped children used (cutime/cstime) — a child counts once either way."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += _read_stat(pid)[2]
        except (OSError, ValueError):
            pass
    return total / CLK_TCK


def wait_seconds(pid: int | str = "self") -> float:
    """Seconds the main thread of a process (the event loop's, nginx's worker's) spent runnable but
    waiting for a CPU (the second field of /proc/<pid>/schedstat): what other work on its core
    cost it. Helper threads (the gateway's epoch ticker) are left out: their waits delay no
    request. 0.0 where the kernel keeps no schedstat."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_wait_seconds(root: int) -> float:
    """wait_seconds() of `root` and all its live descendants (each worker's main thread)."""
    return sum(wait_seconds(pid) for pid in tree_pids(root))


def system_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat: everything but idle
    and iowait."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts[:8]]  # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (wrk, the paced client)."""
    import resource
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])
