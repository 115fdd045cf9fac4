"""filters/README.md's "from zero to a filter in the gateway in five minutes", run as written
(ports moved to free ones): new → build → the generated pytest → try → config.yaml → the gateway
with its echo upstream → curl. The response through the header-only filter keeps Content-Length."""
from __future__ import annotations

import os
import re
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import wasmtime

from tests.authoring.conftest import ROOT

CARGO = "/usr/bin/cargo"


def readme_block() -> str:
    text = (ROOT / "filters" / "README.md").read_text()
    section = text.split("## From zero to a filter in the gateway in five minutes", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc: subprocess.Popen, needle: str, within_s: float) -> str:
    """Read the process's output on a thread until a line holds ``needle`` (or it exits)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = ""
    deadline = time.monotonic() + within_s
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {needle!r} from the gateway:\n{seen}"
        try:
            seen += lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            pass
    return seen


def test_readme_five_minute_path(tmp_path, cargo_target_dir):
    if not os.access(CARGO, os.X_OK) or shutil.which("curl") is None:
        pytest.skip("Debian's cargo or curl not installed (./dev test installs them)")
    gw_port, up_port = free_port(), free_port()
    block = readme_block().replace("8080", str(gw_port)).replace("9000", str(up_port))
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m gateway.demo"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CARGO_TARGET_DIR": str(cargo_target_dir)}
    r = subprocess.run(["bash", "-euc", "\n".join(lines[:start])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 passed" in r.stdout                                   # the generated tests
    assert "upstream request: GET /hi" in r.stdout and "x-greeting: hi" in r.stdout   # wasmgate try
    project = tmp_path / "hello"
    exports = {e.name for e in wasmtime.Module.from_file(wasmtime.Engine(), str(project / "dist" / "hello.wasm")).exports}
    assert "proxy_on_request_headers" in exports and not any("body" in e for e in exports)

    demo = lines[start].split("&")[0]
    proc = subprocess.Popen(["bash", "-c", f"exec {demo}"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(proc, "gateway ready", 60)
        curl = lines[start + 1].split("#")[0]
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30).stdout
        assert '"x-greeting": "hi"' in out, out
        with urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/hi", timeout=10) as resp:
            assert resp.headers["content-length"] == str(len(resp.read()))   # not turned chunked
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
