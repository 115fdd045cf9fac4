"""`python -m gateway.demo`: echo upstream + gateway in one command, as a newcomer runs it."""
import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_demo_starts_upstream_and_gateway(tmp_path):
    up, gw, tls = free_port(), free_port(), free_port()
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"""
listeners:
  - {{name: main, address: 127.0.0.1, port: {gw}}}
  - {{name: tls, address: 127.0.0.1, port: {tls}, tls: {{cert: .demo-tls/cert.pem, key: .demo-tls/key.pem}}}}
access_log: {{path: null}}
clusters: [{{name: backend, endpoints: ["127.0.0.1:{up}"]}}]
routes: [{{name: api, match: {{prefix: /api}}, cluster: backend}}]
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.demo", "-c", str(cfg), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines = []
    try:
        async with asyncio.timeout(20):
            while not any("curl -ik" in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited:\n" + "".join(lines)
                lines.append(line)
        assert any(f"curl -i http://127.0.0.1:{gw}/api/hello" in line for line in lines), lines
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{gw}/api/hello", data=b"12345") as r:
                echo = await r.json()
        assert echo["method"] == "POST" and echo["path"] == "/api/hello" and echo["body_length"] == 5
        assert echo["headers"]["X-Forwarded-For"] == "127.0.0.1"
        # The TLS listener, on the self-signed certificate the demo wrote at start (curl -k).
        assert (tmp_path / ".demo-tls" / "cert.pem").is_file()
        assert any(f"curl -ik https://127.0.0.1:{tls}/api/hello" in line for line in lines), lines
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{tls}/api/hello", ssl=False) as r:
                echo = await r.json()
        assert echo["path"] == "/api/hello" and echo["headers"]["X-Forwarded-Proto"] == "https"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
