"""A real OCI registry for tests: Debian's docker-registry (the CNCF distribution registry) on a
free loopback port, with its storage in a throwaway directory.

    with RegistryServer(tmp_path) as reg:                       # anonymous push and pull
    with RegistryServer(tmp_path, users={"ci": "s3cret"}):      # htpasswd (bcrypt) basic auth
        reg.address                                             # "127.0.0.1:<port>"
        reg.stop(); reg.start()                                 # down, then back on the same port

docker-registry and htpasswd (apache2-utils) come from Debian (``./dev test`` installs them);
without them the test fails saying so, it is never skipped.
"""
from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.redis_server import LocalServer, free_port

START_TIMEOUT_S = 15.0


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run ./dev test (it installs the Debian "
                           f"package {package}), or apt-get install {package}")
    return path


class RegistryServer(LocalServer):
    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None):
        self.binary = _need("docker-registry", "docker-registry")
        self.dir = Path(workdir) / f"registry-{id(self)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        auth = ""
        if users:
            htpasswd = _need("htpasswd", "apache2-utils")
            lines = [subprocess.run([htpasswd, "-Bbn", u, p], check=True, capture_output=True,
                                    text=True).stdout.strip() for u, p in users.items()]
            (self.dir / "htpasswd").write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd: {{realm: wasmgate-test, path: {self.dir / 'htpasswd'}}}\n"
        self.config = self.dir / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage:\n  filesystem: {{rootdirectory: {self.dir / 'data'}}}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: wasmgate-test-secret\n" + auth)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RegistryServer":
        log = open(self.dir / "registry.log", "ab")
        self.proc = subprocess.Popen([self.binary, "serve", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2).close()
                return self
            except urllib.error.HTTPError as e:      # 401: up, asking for credentials
                if e.code == 401:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.dir / "registry.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"docker-registry on port {self.port} did not start: {text[-2000:]}")
            time.sleep(0.05)
