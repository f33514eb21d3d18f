"""Build and read the mesh's certificates: roots, issuers and SPIFFE leaves (X.509-SVIDs).

Pure: the time (``now``) is always handed in; no files, no sockets. ECDSA P-256 with
SHA-256 everywhere. Leaves follow the SPIFFE X.509-SVID rules (see REFERENCE.md).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.spiffe import SpiffeId, SpiffeIdError, parse
from meshlet.errors import CertificateError, InputError

PrivateKey = ec.EllipticCurvePrivateKey

ROOT_TTL = dt.timedelta(days=3650)
ISSUER_TTL = dt.timedelta(days=365)
LEAF_TTL = dt.timedelta(hours=24)
MAX_BACKDATE = dt.timedelta(seconds=60)  # tolerate small clock skew between hosts


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _backdate(ttl: dt.timedelta) -> dt.timedelta:
    # Whole seconds: X.509 times drop fractions, and ``ttl_of`` must undo this exactly.
    return min(MAX_BACKDATE, dt.timedelta(seconds=int(ttl.total_seconds()) // 20))


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_name(kind: str, trust_domain: str, key: PrivateKey) -> x509.Name:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshlet {kind} {ski}"),
        ]
    )


def _signing_cert(
    *,
    kind: str,
    key: PrivateKey,
    trust_domain: str,
    signer: x509.Certificate | None,
    signer_key: PrivateKey,
    now: dt.datetime,
    ttl: dt.timedelta,
    path_length: int | None,
) -> x509.Certificate:
    subject = _ca_name(kind, trust_domain, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _backdate(ttl))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if signer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


def build_root(
    key: PrivateKey, *, trust_domain: str, now: dt.datetime, ttl: dt.timedelta = ROOT_TTL
) -> x509.Certificate:
    """A self-signed trust anchor for ``trust_domain``."""
    return _signing_cert(
        kind="root",
        key=key,
        trust_domain=trust_domain,
        signer=None,
        signer_key=key,
        now=now,
        ttl=ttl,
        path_length=1,
    )


def build_issuer(
    key: PrivateKey,
    *,
    root: x509.Certificate,
    root_key: PrivateKey,
    now: dt.datetime,
    ttl: dt.timedelta = ISSUER_TTL,
) -> x509.Certificate:
    """An intermediate that signs leaves, valid no longer than its root."""
    td = trust_domain_of(root)
    ttl = min(ttl, root.not_valid_after_utc - now)
    if ttl <= dt.timedelta(0):
        raise CertificateError("the root certificate has expired: rotate the root first")
    return _signing_cert(
        kind="issuer",
        key=key,
        trust_domain=td,
        signer=root,
        signer_key=root_key,
        now=now,
        ttl=ttl,
        path_length=0,
    )


@dataclass(frozen=True, slots=True)
class Leaf:
    cert: x509.Certificate
    capped: bool  # True when the issuer's own expiry shortened the requested lifetime


def build_leaf(
    public_key: ec.EllipticCurvePublicKey,
    *,
    spiffe_id: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    now: dt.datetime,
    ttl: dt.timedelta = LEAF_TTL,
    dns_names: Sequence[str] = (),
) -> Leaf:
    """An X.509-SVID for ``spiffe_id``: one URI SAN, CA:false, digitalSignature, both EKUs.

    ``dns_names`` adds DNS SANs (the SVID spec allows them beside the one URI SAN): the
    control plane uses one so that standard TLS clients such as gRPC can check its name.
    """
    td = trust_domain_of(issuer)
    if spiffe_id.trust_domain != td:
        raise InputError(
            f"SPIFFE ID {spiffe_id} is outside this CA's trust domain {td!r}: use spiffe://{td}/..."
        )
    if not spiffe_id.path:
        raise InputError(f"SPIFFE ID {spiffe_id} has no path: a workload ID needs one")
    if (
        not isinstance(public_key, ec.EllipticCurvePublicKey)
        or public_key.curve.name != "secp256r1"
    ):
        raise CertificateError("workload keys must be ECDSA P-256")
    not_after = now + ttl
    capped = not_after > issuer.not_valid_after_utc
    if capped:
        not_after = issuer.not_valid_after_utc
    if not_after <= now:
        raise CertificateError(
            "the issuer certificate has expired: run `meshlet certs rotate issuer`"
        )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _backdate(ttl))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        # The subject is empty, so RFC 5280 wants the SAN critical.
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(str(spiffe_id)),
                    *(x509.DNSName(n) for n in dns_names),
                ]
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return Leaf(cert=cert, capped=capped)


def load_csr(pem: bytes, *, source: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise CertificateError(f"{source} is not a PEM certificate signing request") from e
    if not csr.is_signature_valid:
        raise CertificateError(f"{source}: the CSR's signature does not match its key")
    return csr


def build_csr(key: PrivateKey, spiffe_id: SpiffeId) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


# ---- reading -------------------------------------------------------------------------


def load_certs(data: bytes, *, source: str) -> list[x509.Certificate]:
    """Every certificate in PEM (or one in DER) ``data``; errors name ``source``."""
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
            raise CertificateError(f"{source} holds a private key, not a certificate")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            if b"CERTIFICATE REQUEST-----" in data:
                raise CertificateError(
                    f"{source} is a certificate request, not a certificate"
                ) from e
            raise CertificateError(f"{source} has no readable PEM certificate: {e}") from e
        return certs
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise CertificateError(f"{source} is not a certificate (neither PEM nor DER)") from e


def load_key(data: bytes, *, source: str) -> PrivateKey:
    if b"CERTIFICATE-----" in data and b"PRIVATE KEY-----" not in data:
        raise CertificateError(f"{source} holds a certificate, not a private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{source} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertificateError(f"{source} is not an ECDSA P-256 key, which meshlet requires")
    return key


def dump_certs(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def dump_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId | None:
    """The certificate's SPIFFE ID when it has exactly one valid spiffe:// URI SAN."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        return None
    try:
        return parse(uris[0])
    except SpiffeIdError:
        return None


def trust_domain_of(ca_cert: x509.Certificate) -> str:
    """A meshlet root or issuer names its trust domain in a ``spiffe://TD`` URI SAN."""
    sid = spiffe_id_of(ca_cert)
    if sid is None:
        raise CertificateError(
            f"certificate {ca_cert.subject.rfc4514_string()!r} names no SPIFFE trust domain: "
            "is it a meshlet CA certificate?"
        )
    return sid.trust_domain


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def anchor_of(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The root among ``roots`` that ``chain`` (leaf first) leads to by signatures, if any.

    Structure only: validity periods and usages are ``verify.verify_svid``'s job.
    """
    if not chain:
        return None
    for child, parent in itertools.pairwise(chain):
        if not issued_by(child, parent):
            return None
    top = chain[-1]
    for root in roots:
        if top == root or issued_by(top, root):
            return root
    return None


def key_type(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            pub.curve.name, f"ECDSA {pub.curve.name}"
        )
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size}"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(pub).__name__


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def ttl_of(cert: x509.Certificate) -> dt.timedelta:
    """The lifetime that was asked for when ``cert`` was built (undoing the backdate)."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if lifetime >= MAX_BACKDATE * 21:
        return lifetime - MAX_BACKDATE
    # lifetime = ttl + ttl // 20 (whole seconds), so ttl = ceil(lifetime * 20 / 21).
    return dt.timedelta(seconds=-(-int(lifetime.total_seconds()) * 20 // 21))
