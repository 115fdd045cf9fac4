"""TLS on Python's ssl module: listeners (server side), clusters (client side), and the checks
``wasmgate check`` runs on certificate, key and CA files.

Listener side. asyncio.start_server(ssl=...) takes one SSLContext for the life of the server, but a
reload must give new connections new certificates while old connections keep theirs. So a TLS
listener is served with a ListenerContext: a switch whose ``wrap_bio`` takes each new
connection's SSL object from the ServerTls of the *current* config generation. Within one ServerTls
every context has the same settings (versions, ciphers, ALPN, client-certificate policy) and only
the certificate differs; the SNI callback moves a connection to the context of its server name.

``cryptography`` is imported only where certificates are parsed (config checks, building a
listener's contexts, the peer certificate's subject when a filter first asks for it, the demo's
self-signed certificate), never on a request's path.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import ListenerTls, UpstreamTls

# What ALPN offers: "h2" first (the server's order wins) on a listener with http2 on; Gateway's
# ALPN handlers map each protocol to its front-end.
ALPN_PROTOCOLS = ("h2", "http/1.1")
ALPN_HTTP1 = ("http/1.1",)

from .tls_files import (DEFAULT_CIPHERS, DEFAULT_HANDSHAKE_TIMEOUT_S, MIN_VERSIONS, TlsError,  # noqa: F401
                        check_ca, check_ciphers, check_pair, digest, read_file, ssl_reason)

_SHORT_NAMES = {
    "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C", "2.5.4.7": "L",
    "2.5.4.8": "ST", "2.5.4.9": "street", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.12": "title",
    "2.5.4.15": "businessCategory", "2.5.4.17": "postalCode", "2.5.4.42": "GN",
    "2.5.4.43": "initials", "2.5.4.44": "generationQualifier", "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym", "2.5.4.97": "organizationIdentifier",
    "1.2.840.113549.1.9.1": "emailAddress", "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}
_RFC2253_SPECIAL = frozenset(b',+"\\<>;')


def _escape(value: str) -> str:
    """RFC 2253 escaping as OpenSSL's ASN1_STRFLGS_RFC2253: specials with a backslash, control
    characters and every non-ASCII UTF-8 byte as \\XX, '#' or ' ' first and ' ' last escaped."""
    data = value.encode("utf-8")
    out = []
    last = len(data) - 1
    for i, b in enumerate(data):
        if b < 0x20 or b >= 0x7F:
            out.append("\\%02X" % b)
        elif b in _RFC2253_SPECIAL or (i == 0 and b in b"# ") or (i == last and b == 0x20):
            out.append("\\" + chr(b))
        else:
            out.append(chr(b))
    return "".join(out)


def rfc2253(name) -> str:
    """A cryptography ``x509.Name`` as Envoy prints it: RDNs last-first, joined by ","."""
    rdns = []
    for rdn in reversed(name.rdns):
        # Attributes of an unknown type print as their dotted OID (OpenSSL dumps them as #hex).
        rdns.append("+".join(f"{_SHORT_NAMES.get(a.oid.dotted_string, a.oid.dotted_string)}="
                             f"{_escape(a.value if isinstance(a.value, str) else a.value.hex())}"
                             for a in rdn))
    return ",".join(rdns)


@dataclass(frozen=True)
class CertFacts:
    subject: str                      # RFC 2253
    dns_sans: tuple[str, ...]
    uri_sans: tuple[str, ...]


def cert_facts(cert) -> CertFacts:
    """Subject and SANs of a cryptography ``x509.Certificate``."""
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, uri = tuple(san.get_values_for_type(x509.DNSName)), tuple(
            san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, uri = (), ()
    return CertFacts(rfc2253(cert.subject), dns, uri)


class TlsConnection:
    """One downstream TLS connection (abi.api.TlsFacts). Read once after the handshake; the peer
    certificate is parsed only when a filter first asks for one of its fields."""
    __slots__ = ("version", "alpn", "requested_server_name", "mtls", "_local", "_peer_der", "_peer")

    def __init__(self, conn: ssl.SSLObject):
        self.version: str = conn.version() or ""
        self.alpn: str | None = conn.selected_alpn_protocol()
        self.requested_server_name: str = getattr(conn, "requested_server_name", "")
        self._local: CertFacts | None = getattr(conn.context, "local", None)
        self._peer_der: bytes | None = conn.getpeercert(binary_form=True)
        self.mtls = self._peer_der is not None    # presented, hence verified against client_ca
        self._peer: CertFacts | None = None

    def _peer_facts(self) -> CertFacts | None:
        if self._peer is None and self._peer_der is not None:
            from cryptography import x509
            self._peer = cert_facts(x509.load_der_x509_certificate(self._peer_der))
        return self._peer

    @property
    def subject_local_certificate(self) -> str:
        return self._local.subject if self._local else ""

    @property
    def dns_san_local_certificate(self) -> str:
        return self._local.dns_sans[0] if self._local and self._local.dns_sans else ""

    @property
    def uri_san_local_certificate(self) -> str:
        return self._local.uri_sans[0] if self._local and self._local.uri_sans else ""

    @property
    def subject_peer_certificate(self) -> str:
        peer = self._peer_facts()
        return peer.subject if peer else ""

    @property
    def dns_san_peer_certificate(self) -> str:
        peer = self._peer_facts()
        return peer.dns_sans[0] if peer and peer.dns_sans else ""

    @property
    def uri_san_peer_certificate(self) -> str:
        peer = self._peer_facts()
        return peer.uri_sans[0] if peer and peer.uri_sans else ""

    @property
    def sha256_peer_certificate_digest(self) -> str:
        return hashlib.sha256(self._peer_der).hexdigest() if self._peer_der is not None else ""


# -- listeners ------------------------------------------------------------------------------------

class ServerConnection(ssl.SSLObject):
    """The SSL object of one accepted connection: remembers the SNI name and reports a failed
    handshake (garbage instead of a ClientHello, a refused version, a bad client certificate)."""
    requested_server_name = ""
    on_failure: Callable[[str], None] | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except OSError as e:                 # ssl.SSLError is an OSError
            if self.on_failure is not None:
                self.on_failure(ssl_reason(e))
            raise


class _ServerContext(ssl.SSLContext):
    local: CertFacts | None = None           # the certificate this context serves


class ServerTls:
    """One TLS listener's contexts for one config generation: the default certificate (a client
    without SNI, or with a name no certificate lists) and one context per other certificate."""

    def __init__(self, spec: "ListenerTls", http2: bool = True):
        alpn = ALPN_PROTOCOLS if http2 else ALPN_HTTP1
        self.contexts = [self._context(spec, c.cert, c.key, alpn) for c in spec.certificates]
        self.default = self.contexts[0]
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}     # "*.example.com" under "example.com"
        for c, ctx in zip(spec.certificates, self.contexts):
            for name in c.server_names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], ctx)
                else:
                    self._exact.setdefault(name, ctx)
            ctx.sni_callback = self._select

    @staticmethod
    def _context(spec: "ListenerTls", cert: Path, key: Path, alpn: tuple[str, ...]) -> _ServerContext:
        from cryptography import x509
        ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSIONS[spec.min_version]
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_ciphers(spec.ciphers or DEFAULT_CIPHERS)
        ctx.set_alpn_protocols(list(alpn))
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise TlsError("cert", f"{cert}: {ssl_reason(e)}") from None
        if spec.client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(spec.client_ca))
            except (ssl.SSLError, OSError) as e:
                raise TlsError("client_ca", f"{spec.client_ca}: {ssl_reason(e)}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED if spec.require_client_cert else ssl.CERT_OPTIONAL
        ctx.sslobject_class = ServerConnection
        ctx.local = cert_facts(x509.load_pem_x509_certificates(read_file(cert, "cert"))[0])
        return ctx

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, with None when the client sent no SNI.
        if not server_name:
            return
        conn.requested_server_name = server_name   # type: ignore[attr-defined]
        name = server_name.lower().rstrip(".")
        ctx = self._exact.get(name)
        if ctx is None:
            dot = name.find(".")
            ctx = self._wildcard.get(name[dot + 1:]) if dot > 0 else None
        if ctx is not None and ctx is not conn.context:
            conn.context = ctx


def build_listener_tls(listeners) -> dict[str, ServerTls]:
    """ServerTls for every listener with ``tls:`` (raises TlsError naming the file at fault)."""
    return {lst.name: ServerTls(lst.tls, lst.http2) for lst in listeners if lst.tls is not None}


class ListenerContext(ssl.SSLContext):
    """What a TLS listener's server holds: each accepted connection gets its SSL object from the
    ServerTls ``current()`` returns at that moment (the serving config generation's)."""

    def __new__(cls, current: Callable[[], ServerTls], on_failure: Callable[[str], None]):
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, current: Callable[[], ServerTls], on_failure: Callable[[str], None]):
        super().__init__()
        self.current = current
        self.on_failure = on_failure

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        conn = self.current().default.wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        conn.on_failure = self.on_failure
        return conn


# -- clusters -------------------------------------------------------------------------------------

def client_context(spec: "UpstreamTls") -> ssl.SSLContext:
    """The client context for a cluster's connections: CA (default: the system's trust store),
    hostname verification unless ``verify: false``, optional client certificate, ALPN http/1.1."""
    try:
        ctx = ssl.create_default_context(cafile=str(spec.ca) if spec.ca else None)
    except (ssl.SSLError, OSError) as e:
        raise TlsError("ca", f"{spec.ca}: {ssl_reason(e)}") from None
    if not spec.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert is not None and spec.key is not None:
        try:
            ctx.load_cert_chain(spec.cert, spec.key)
        except (ssl.SSLError, OSError) as e:
            raise TlsError("cert", f"{spec.cert}: {ssl_reason(e)}") from None
    ctx.set_alpn_protocols(["http/1.1"])     # the upstream side speaks HTTP/1.1 only
    return ctx


# -- self-signed certificates (the demo, the benchmark) -------------------------------------------

def write_self_signed(cert_path: Path, key_path: Path,
                      names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), days: int = 30) -> None:
    """A fresh ECDSA P-256 key and a self-signed certificate for ``names`` (DNS names or IPs)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wasmgate demo"),
                         x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256()))
    Path(cert_path).parent.mkdir(parents=True, exist_ok=True)
    Path(key_path).parent.mkdir(parents=True, exist_ok=True)
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
