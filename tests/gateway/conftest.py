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


class Pki:
    """Test CAs and certificates (trustme) as PEM files in ``dir``: ``<name>.pem`` (chain) and
    ``<name>.key``. Servers: ``default`` (127.0.0.1, localhost), ``a`` (a.test), ``b`` (*.b.test),
    all from ``ca``, and ``upstream`` (upstream.test only); clients: ``alice`` from ``client_ca``, ``mallory`` from ``ca`` (not a client CA)."""

    def __init__(self, directory):
        import trustme
        self.dir = directory
        self.ca, self.client_ca = trustme.CA(), trustme.CA()
        self.ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        self.client_ca.cert_pem.write_to_path(str(directory / "client_ca.pem"))
        self.certs = {}
        self.issue("default", self.ca, "127.0.0.1", "localhost", common_name="gateway-default")
        self.issue("a", self.ca, "a.test", common_name="a.test")
        self.issue("b", self.ca, "*.b.test", common_name="b wildcard")
        self.issue("alice", self.client_ca, "alice.test", common_name="alice", organization_name="Example, Inc.",
                   organization_unit_name="payments+ops")
        self.issue("mallory", self.ca, "mallory.test", common_name="mallory")
        self.issue("upstream", self.ca, "upstream.test", common_name="upstream.test")

    def issue(self, name, ca, *identities, **subject):
        cert = ca.issue_cert(*identities, **subject)
        (self.dir / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.dir / f"{name}.key"))
        self.certs[name] = cert

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def der(self, name: str) -> bytes:
        import ssl
        return ssl.PEM_cert_to_DER_cert(self.certs[name].cert_chain_pems[0].bytes().decode())

    def server(self, cert: str, client_ca: str | None = None):
        """A server context serving ``cert``, requiring client certificates signed by ``client_ca``."""
        import ssl
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        if client_ca is not None:
            ctx.load_verify_locations(self.path(f"{client_ca}.pem"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client(self, cert: str | None = None):
        """A client context trusting ``ca``, presenting ``cert`` if given."""
        import ssl
        ctx = ssl.create_default_context(cafile=self.path("ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))
