"""Certificate, key and CA files as the config names them: read and checked (``wasmgate check``
and every load), with errors that name the field and the file. The bottom of gateway/'s TLS:
config.py checks with it, tls.py builds contexts on top of it.
"""
from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

# TLS 1.2 suites: ECDHE key exchange and AEAD ciphers only (Mozilla's "intermediate" list without
# the DHE suites, which need DH parameters). TLS 1.3 suites are OpenSSL's defaults, all AEAD.
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


class TlsError(Exception):
    """A certificate, key or CA file is unusable. ``field`` names the config key at fault
    (cert, key, ca, client_ca, ciphers); the message names the file."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


# -- file checks (wasmgate check, and every load) ----------------------------------------------

def read_file(path: Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(field, f"file not found: {path}") from None
    except IsADirectoryError:
        raise TlsError(field, f"{path} is a directory, not a PEM file") from None
    except OSError as e:
        raise TlsError(field, f"cannot read {path}: {e.strerror or e}") from None


def _certificates(data: bytes, path: Path, field: str) -> list:
    from cryptography import x509
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(field, f"{path}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(field, f"{path}: not a valid PEM certificate: {e}") from None


def check_pair(cert: Path, key: Path, cert_field: str = "cert", key_field: str = "key") -> bytes:
    """Read and check a certificate chain and its private key; return both files' bytes.

    Raises TlsError for a missing or unreadable file, bad PEM, an encrypted key, a key that does
    not belong to the (first) certificate, or anything OpenSSL itself refuses (e.g. a key below
    its security level)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    cert_data, key_data = read_file(cert, cert_field), read_file(key, key_field)
    leaf = _certificates(cert_data, cert, cert_field)[0]
    if b"PRIVATE KEY-----" not in key_data:
        raise TlsError(key_field, f"{key}: no PEM private key in it (expected -----BEGIN ... PRIVATE KEY-----)")
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TlsError(key_field, f"{key}: the key is encrypted; wasmgate needs an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TlsError(key_field, f"{key}: not a valid PEM private key: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TlsError(key_field, f"{key} does not match the certificate in {cert}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TlsError(cert_field, f"{cert}: OpenSSL refused it: {ssl_reason(e)}") from None
    return cert_data + key_data


def check_ca(path: Path, field: str = "ca") -> bytes:
    """Read and check a PEM bundle of CA certificates; return its bytes."""
    data = read_file(path, field)
    _certificates(data, path, field)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as e:
        raise TlsError(field, f"{path}: OpenSSL refused it: {ssl_reason(e)}") from None
    return data


def check_ciphers(ciphers: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        raise TlsError("ciphers", f'no cipher in "{ciphers}" is available to OpenSSL') from None


def digest(*parts: bytes) -> str:
    """Identifies the file contents a TLS block was built from (a reload notices new files)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def ssl_reason(e: BaseException) -> str:
    """Short words for an ssl error: "certificate verify failed: unable to get local issuer
    certificate", "unsupported protocol", "peer did not return a certificate", ..."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    reason = getattr(e, "reason", None)
    if isinstance(e, ssl.SSLError) and reason:
        return reason.lower().replace("_", " ")
    return str(e) or type(e).__name__


# -- certificate facts for the connection.* properties -----------------------------------------

# OpenSSL's short names, as X509_NAME_print_ex(XN_FLAG_RFC2253) prints them (Envoy's subject form).
