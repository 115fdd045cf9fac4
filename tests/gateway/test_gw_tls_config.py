"""TLS config: what `wasmgate check` says about certificate, key and CA files (file:line field:
message naming the file), the schema's other checks, the RFC 2253 subject form, and the
connection.* properties with Envoy's encodings."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from abi.api import StreamInfo
from abi.properties import PropertySource, RootFacts, get_property
from gateway.config import ConfigError, load_config
from gateway.tls import rfc2253

ROOT = Path(__file__).resolve().parents[2]


def config_with(tls_listener: str, cluster_tls: str = "") -> str:
    return (
        "listeners:\n"
        "  - name: main\n"
        "    port: 0\n"
        "    tls:\n" + "".join(f"      {line}\n" for line in tls_listener.strip("\n").split("\n")) +
        "clusters:\n"
        "  - name: backend\n"
        "    endpoints: [\"127.0.0.1:9000\"]\n" +
        ("    tls:\n" + "".join(f"      {line}\n" for line in cluster_tls.strip("\n").split("\n"))
         if cluster_tls else "") +
        "routes: [{name: all, cluster: backend}]\n"
    )


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path}:"
    assert all(e.startswith(prefix) for e in info.value.errors), info.value.errors
    return [e[len(prefix):] for e in info.value.errors]


def test_a_good_tls_config_builds(tmp_path, pki):
    path = tmp_path / "config.yaml"
    path.write_text(config_with(
        f"cert: {pki.path('default.pem')}\nkey: {pki.path('default.key')}\n"
        f"certificates:\n  - {{server_names: [A.Test., '*.b.test'], cert: {pki.path('a.pem')}, key: {pki.path('a.key')}}}\n"
        f"client_ca: {pki.path('client_ca.pem')}\nrequire_client_cert: true\nmin_version: TLSv1.3\n"
        "handshake_timeout_s: 2.5",
        f"sni: Upstream.Test\nca: {pki.path('ca.pem')}\ncert: {pki.path('alice.pem')}\nkey: {pki.path('alice.key')}"))
    config = load_config(path)
    tls = config.listeners[0].tls
    assert [c.server_names for c in tls.certificates] == [(), ("a.test", "*.b.test")]
    assert tls.require_client_cert and tls.min_version == "TLSv1.3" and tls.handshake_timeout_s == 2.5
    up = config.clusters[0].tls
    assert up.sni == "upstream.test" and up.verify and up.cert == Path(pki.path("alice.pem"))
    assert len(config.tls_files()) == 8
    # `enabled: false` keeps the block but turns TLS off.
    path.write_text(config_with(f"cert: {pki.path('default.pem')}\nkey: {pki.path('default.key')}",
                                "enabled: false"))
    assert load_config(path).clusters[0].tls is None


def test_file_errors_name_the_file_and_the_field_line(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    errs = errors_of(tmp_path, config_with(
        f"cert: missing.pem\nkey: missing.key\n"
        "certificates:\n"
        f"  - server_names: [a.test]\n    cert: {pki.path('a.pem')}\n    key: {pki.path('b.key')}\n"
        f"  - server_names: [b.test]\n    cert: {garbage}\n    key: {pki.path('b.key')}\n"
        f"  - server_names: [c.test]\n    cert: {pki.path('b.pem')}\n    key: {encrypted}\n"
        f"client_ca: {pki.path('a.key')}",
        f"ca: {garbage}\ncert: {pki.path('alice.pem')}"))
    assert errs == [
        f"5 listeners[0].tls.cert: file not found: {tmp_path / 'missing.pem'}",
        f"6 listeners[0].tls.key: file not found: {tmp_path / 'missing.key'}",
        f"10 listeners[0].tls.certificates[0].key: {pki.path('b.key')} does not match the certificate in "
        f"{pki.path('a.pem')}",
        f"12 listeners[0].tls.certificates[1].cert: {garbage}: no PEM certificate in it "
        f"(expected -----BEGIN CERTIFICATE-----)",
        f"16 listeners[0].tls.certificates[2].key: {encrypted}: the key is encrypted; wasmgate needs an "
        f"unencrypted PEM key",
        f"17 listeners[0].tls.client_ca: {pki.path('a.key')}: no PEM certificate in it "
        f"(expected -----BEGIN CERTIFICATE-----)",
        f"22 clusters[0].tls.ca: {garbage}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
        "23 clusters[0].tls.key: required with cert",
    ]


def test_schema_errors(tmp_path, pki):
    pair = f"cert: {pki.path('a.pem')}, key: {pki.path('a.key')}"
    errs = errors_of(tmp_path, config_with(
        "certificates:\n"
        f"  - {{server_names: [a.test, 'bad name'], {pair}}}\n"
        f"  - {{server_names: [A.TEST], {pair}}}\n"
        f"  - {{server_names: [], {pair}}}\n"
        "require_client_cert: true\nmin_version: TLSv1.1\nciphers: NOT-A-CIPHER\nhandshake_timeout_s: 0",
        "sni: 'not a host'\nverify: yes please"))
    assert errs == [
        '6 listeners[0].tls.certificates[0].server_names[1]: "bad name" is not a host name (or *.domain)',
        '7 listeners[0].tls.certificates[1].server_names[0]: "a.test" is also listed by '
        'listeners[0].tls.certificates[0]',
        "8 listeners[0].tls.certificates[2].server_names: must list at least one name",
        "9 listeners[0].tls.require_client_cert: needs client_ca (the CAs that sign accepted client certificates)",
        '10 listeners[0].tls.min_version: must be TLSv1.2 or TLSv1.3, got "TLSv1.1"',
        '11 listeners[0].tls.ciphers: no cipher in "NOT-A-CIPHER" is available to OpenSSL',
        "12 listeners[0].tls.handshake_timeout_s: must be >= 0.001, got 0",
        '17 clusters[0].tls.sni: "not a host" is not a host name',
        "18 clusters[0].tls.verify: expected true or false, got 'yes please'",
    ]
    assert errors_of(tmp_path, config_with("min_version: TLSv1.2")) == [
        "5 listeners[0].tls: needs cert and key, or certificates"]


def test_wasmgate_check_prints_the_key_mismatch(tmp_path, pki):
    path = tmp_path / "config.yaml"
    path.write_text(config_with(f"cert: {pki.path('a.pem')}\nkey: {pki.path('default.key')}"))
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (f"{path}:6 listeners[0].tls.key: {pki.path('default.key')} does not "
                                        f"match the certificate in {pki.path('a.pem')}")


def test_subject_in_rfc2253_as_openssl_prints_it():
    # The expected string is what `openssl x509 -noout -subject -nameopt RFC2253` printed for this
    # certificate (OpenSSL 3.0): specials and a leading '#' / trailing ' ' escaped, non-ASCII UTF-8
    # bytes as \XX, OpenSSL's short names, most specific RDN first.
    attrs = [(NameOID.COUNTRY_NAME, "DE"), (NameOID.ORGANIZATION_NAME, "Müller & Söhne"),
             (NameOID.ORGANIZATIONAL_UNIT_NAME, "#ops "), (NameOID.EMAIL_ADDRESS, "a@b.c"),
             (NameOID.DOMAIN_COMPONENT, "example"), (NameOID.COMMON_NAME, 'x;y<z>"q\\'),
             (NameOID.SERIAL_NUMBER, "42"), (NameOID.STREET_ADDRESS, "Main St 1"), (NameOID.USER_ID, "u1"),
             (NameOID.GIVEN_NAME, "G"), (NameOID.SURNAME, "S"), (NameOID.TITLE, "T"),
             (NameOID.POSTAL_CODE, "123"), (NameOID.LOCALITY_NAME, "Köln"),
             (NameOID.STATE_OR_PROVINCE_NAME, "NRW")]
    name = x509.Name([x509.NameAttribute(oid, v) for oid, v in attrs])
    assert rfc2253(name) == (
        r'ST=NRW,L=K\C3\B6ln,postalCode=123,title=T,SN=S,GN=G,UID=u1,street=Main St 1,serialNumber=42,'
        r'CN=x\;y\<z\>\"q\\,DC=example,emailAddress=a@b.c,OU=\#ops\ ,O=M\C3\BCller & S\C3\B6hne,C=DE')
    multi = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                                                       x509.NameAttribute(NameOID.USER_ID, "b")])])
    assert rfc2253(multi) in ("CN=a+UID=b", "UID=b+CN=a")


class Facts:
    """A TLS connection's facts as gateway.tls.TlsConnection offers them (abi.api.TlsFacts)."""
    version = "TLSv1.3"
    requested_server_name = "api.example.com"
    mtls = True
    subject_local_certificate = "CN=gateway"
    subject_peer_certificate = "CN=alice,O=Example"
    dns_san_local_certificate = "api.example.com"
    dns_san_peer_certificate = ""
    uri_san_local_certificate = ""
    uri_san_peer_certificate = "spiffe://example.org/alice"
    sha256_peer_certificate_digest = "ab" * 32


def prop(tls, path: str) -> bytes | None:
    info = StreamInfo("rid", "route", "cluster", ("10.0.0.1", 5555), ("10.0.0.2", 443), 7, tls=tls)
    return get_property(PropertySource("f", RootFacts(info=info)), path.replace(".", "\0").encode())


def test_connection_properties_in_envoys_encoding():
    assert prop(Facts(), "connection.mtls") == b"\x01"
    assert prop(Facts(), "connection.tls_version") == b"TLSv1.3"
    assert prop(Facts(), "connection.requested_server_name") == b"api.example.com"
    assert prop(Facts(), "connection.subject_peer_certificate") == b"CN=alice,O=Example"
    assert prop(Facts(), "connection.subject_local_certificate") == b"CN=gateway"
    assert prop(Facts(), "connection.uri_san_peer_certificate") == b"spiffe://example.org/alice"
    assert prop(Facts(), "connection.dns_san_local_certificate") == b"api.example.com"
    assert prop(Facts(), "connection.dns_san_peer_certificate") is None        # none: NOT_FOUND
    assert prop(Facts(), "connection.sha256_peer_certificate_digest") == b"ab" * 32
    # A plain connection: Envoy still answers mtls (false) and requested_server_name (""); the
    # TLS-only attributes are NOT_FOUND.
    assert prop(None, "connection.mtls") == b"\x00"
    assert prop(None, "connection.requested_server_name") == b""
    for name in ("tls_version", "subject_peer_certificate", "subject_local_certificate",
                 "sha256_peer_certificate_digest"):
        assert prop(None, f"connection.{name}") is None


def test_self_signed_certificate_for_the_demo(tmp_path):
    from gateway.tls import check_pair, write_self_signed
    write_self_signed(tmp_path / "c.pem", tmp_path / "k.pem")
    check_pair(tmp_path / "c.pem", tmp_path / "k.pem")
    cert = x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)
    assert cert.signature_hash_algorithm.name == hashes.SHA256.name
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0                    # key readable by us only


def test_watch_notices_a_replaced_certificate(tmp_path, pki):
    from gateway.watch import Watcher
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(pki.path("a.pem")).read_bytes())
    key.write_bytes(Path(pki.path("a.key")).read_bytes())
    path = tmp_path / "config.yaml"
    path.write_text(config_with("cert: cert.pem\nkey: key.pem"))
    w = Watcher(path)
    assert w.files == [cert, key] and w.poll() is None
    key.write_bytes(Path(pki.path("b.key")).read_bytes())          # a new key (and, below, its cert)
    assert w.poll() is None and w.poll() == "key.pem"               # reported once it settled
    cert.write_bytes(Path(pki.path("b.pem")).read_bytes())
    assert w.poll() is None and w.poll() == "cert.pem"
