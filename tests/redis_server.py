"""A real redis-server for tests: a free loopback port, a throwaway directory, nothing persisted.

    with RedisServer(tmp_path) as r:          # or: r = RedisServer(tmp_path); r.start() ... r.stop()
        r.port, r.endpoint                    # "127.0.0.1:<port>"
        r.command("GET", "k")                 # a raw RESP round trip (bytes of the reply)
        r.kill()                              # SIGKILL, as a crash; r.start() brings it back on the same port

redis-server comes from Debian (``./dev test`` installs it); without it the test fails with a
message saying so, it is never skipped.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.redis_client import command

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


resp = command          # one command as a RESP array of bulk strings


class LocalServer:
    """A server process a test starts and stops (``with Server(...) as s:``)."""
    proc: subprocess.Popen | None = None

    def start(self) -> "LocalServer":
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(LocalServer):
    def __init__(self, workdir: Path, *, password: str | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./dev test (it installs the "
                               "Debian package redis-server), or apt-get install redis-server")
        self.binary = binary
        self.dir = Path(workdir) / f"redis-{id(self)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.command("PING").startswith((b"+PONG", b"-NOAUTH")):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log")
                text = log.read_text() if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {text[-2000:]}")
            time.sleep(0.02)

    def command(self, *args: str | bytes, auth: bool = True) -> bytes:
        """Send one command on a fresh connection; the raw reply (one read suffices for the
        small replies tests look at)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if auth and self.password:
                s.sendall(resp("AUTH", self.password))
                s.recv(65536)
            s.sendall(resp(*args))
            return s.recv(1 << 20)

    def kill(self) -> None:
        """Crash it (SIGKILL): connections drop, new ones are refused."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
