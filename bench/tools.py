"""External tools the benchmark needs (nginx, wrk, h2load, taskset) and the machine description."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APT_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client"}


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def find_wrk() -> str | None:
    return shutil.which("wrk")


def _find(tool: str) -> str | None:
    return find_nginx() if tool == "nginx" else shutil.which(tool)


def ensure_tools(log=print) -> dict[str, str]:
    """Install nginx-light, wrk and h2load (nghttp2-client) from Debian if missing; return their paths."""
    missing = [pkg for tool, pkg in APT_PACKAGES.items() if _find(tool) is None]
    if missing:
        prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if prefix is None:
            raise RuntimeError(f"missing {missing} and not root (no sudo): "
                               f"apt-get install -y {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log(f"bench: installing {' '.join(missing)} (apt-get)")
        subprocess.run(prefix + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(prefix + ["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    paths = {tool: _find(tool) for tool in APT_PACKAGES}
    if not all(paths.values()):
        raise RuntimeError(f"{paths} still missing after apt-get install")
    return {**paths, "taskset": shutil.which("taskset") or ""}


def _cmd_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0].strip() if text else None


def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(tools: dict[str, str]) -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "wasmtime": _pkg_version("wasmtime"),
        "aiohttp": _pkg_version("aiohttp"),
        "uvloop": _pkg_version("uvloop"),
        "nginx": _cmd_version([tools["nginx"], "-v"]),
        "wrk": _cmd_version([tools["wrk"], "-v"]),
        "h2load": _cmd_version([tools["h2load"], "--version"]),
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
