"""Fixtures for gateway tests: a running echo upstream and a YAML template around it."""
import pytest

from tests.helpers import echo_upstream


@pytest.fixture
async def upstream():
    async with echo_upstream() as up:
        yield up


def basic_yaml(up_port: int, *, routes: str | None = None, extra: str = "", cluster_extra: str = "") -> str:
    """A one-listener config pointing at the echo upstream; ``routes`` replaces the catch-all."""
    routes = routes or "  - {name: all, cluster: backend}\n"
    return (
        "listeners: [{name: main, address: 127.0.0.1, port: 0}]\n"
        "admin: {address: 127.0.0.1, port: 0}\n"
        "access_log: {path: null}\n"
        "clusters:\n"
        f"  - {{name: backend, endpoints: [\"127.0.0.1:{up_port}\"]{cluster_extra}}}\n"
        "routes:\n" + routes + extra
    )
