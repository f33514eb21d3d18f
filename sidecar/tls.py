"""TLS policy for the mTLS leg between sidecars: TLS 1.3 only, both sides verified.

For: building the server (inbound) and client (outbound) contexts from a workload
certificate chain, its key and the mesh's trust bundle; and naming why a handshake
failed (``handshake_reason``), with a hint for the user. Identity (which SPIFFE ID is
acceptable) is checked by the caller on the peer certificate, not here, so the client
does not check host names.

Must never: be called per connection (build once per certificate or bundle change and
reuse the context), lower the protocol below TLS 1.3, or turn verification off.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from meshlet.errors import CertificateError

# Each server handshake ends with a session ticket: a TlsLeg client takes that first
# post-handshake record as proof that the server accepted its certificate. OpenSSL sends
# one after a resumed handshake too, so resumption keeps that proof. The ticket keys are
# made per context: a new context (a new leaf or trust bundle) refuses every ticket
# issued before it, so no session outlives the bundle that verified its peer.
SERVER_TICKETS = 1


def _base(
    *,
    server: bool,
    cert_path: str | Path,
    key_path: str | Path,
    bundle_pem: bytes,
    alpn: Sequence[str],
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as e:
        raise CertificateError(
            f"cannot use certificate {cert_path} with key {key_path}: {e}; "
            "issue them again with `meshlet certs issue`"
        ) from e
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ValueError, ssl.SSLError) as e:
        raise CertificateError(
            f"the trust bundle is not usable PEM: {e}; copy bundle.pem from the CA directory"
        ) from e
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(
    cert_pem_path: str | Path,
    key_path: str | Path,
    bundle_pem: bytes,
    *,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """The inbound side: presents our SVID chain, requires and verifies the caller's."""
    ctx = _base(
        server=True, cert_path=cert_pem_path, key_path=key_path, bundle_pem=bundle_pem, alpn=alpn
    )
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = SERVER_TICKETS
    return ctx


def client_context(
    cert_path: str | Path,
    key_path: str | Path,
    bundle_pem: bytes,
    *,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """The outbound side: presents our SVID chain, verifies the server's chain (not its name)."""
    ctx = _base(
        server=False, cert_path=cert_path, key_path=key_path, bundle_pem=bundle_pem, alpn=alpn
    )
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# X509_V_ERR_* codes (openssl/x509_vfy.h) → reason.
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    9: "not_yet_valid",
    10: "expired",
    23: "revoked",
}
# OpenSSL reason strings (ssl.SSLError.reason) → reason. Alerts name the peer's verdict.
_SSL_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "WRONG_VERSION_NUMBER": "plaintext",
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "NO_SHARED_CIPHER": "handshake_failure",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake_failure",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "alpn",
    "NO_APPLICATION_PROTOCOL": "alpn",
}
_HINTS = {
    "plaintext": "the peer does not speak TLS (a plaintext client on the mTLS port, "
    "or a server outside the mesh)",
    "unknown_ca": "the certificate is not signed by a root in the trust bundle: "
    "check that both sides are in this mesh and have the current bundle.pem",
    "expired": "a certificate has expired: check that certificate renewal runs "
    "and that the clocks agree",
    "not_yet_valid": "a certificate is not valid yet: check that the clocks agree",
    "revoked": "a certificate was revoked",
    "bad_certificate": "a certificate was refused: check it with `meshlet certs inspect`",
    "no_certificate": "the client presented no certificate (mutual TLS is required)",
    "protocol_version": "the peer does not speak TLS 1.3",
    "alpn": "no application protocol in common",
    "timeout": "the handshake did not finish in time",
    "eof": "the peer closed the connection during the handshake",
    "reset": "the connection was reset during the handshake",
}


def handshake_reason(ssl_reason: str | None, verify_code: int | None) -> str:
    """The short reason for a failed handshake, from OpenSSL's verify code or reason."""
    if verify_code:
        return _VERIFY_REASONS.get(verify_code, "bad_certificate")
    return _SSL_REASONS.get(ssl_reason or "", "handshake_failure")


def failure_hint(reason: str) -> str | None:
    """What a user can do about a handshake that failed for ``reason``."""
    return _HINTS.get(reason)
