"""The identity of a trust bundle: one fingerprint for a set of roots, the same everywhere.

The control plane, sidecars, node helpers and the CLI all compare bundles by this value
(``GET /v1/ca``, ``WatchRequest.bundle_fingerprint``), so it is defined here once.
SHA-256 over the roots' DER encodings, deduplicated and sorted, so the order of a PEM
file does not matter. Pure: no files, no sockets, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.pki import load_certs


def bundle_fingerprint(roots: Iterable[x509.Certificate]) -> str:
    """Lowercase hex SHA-256 over the sorted, distinct DER encodings of ``roots``."""
    ders = sorted({c.public_bytes(serialization.Encoding.DER) for c in roots})
    return hashlib.sha256(b"".join(ders)).hexdigest()


def bundle_fingerprint_pem(pem: bytes, *, source: str = "trust bundle") -> str:
    """``bundle_fingerprint`` of every certificate in PEM ``pem`` (CertificateError if none)."""
    return bundle_fingerprint(load_certs(pem, source=source))
