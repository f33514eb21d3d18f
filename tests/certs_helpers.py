"""Helpers for the certs tests: a CA in memory, and certificates that ``certs.pki`` refuses
to make (a CA:true leaf, zero or two URI SANs, a foreign trust domain, chosen validity).

Odd certificates are built with ``cryptography`` directly so that every rejection the
verifier gives is produced by a real certificate, not a mock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pki
from certs.spiffe import parse

TD = "mesh.test"
NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
ORDERS = parse(f"spiffe://{TD}/ns/shop/sa/orders")
WEB = parse(f"spiffe://{TD}/ns/shop/sa/web")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Ca:
    root: x509.Certificate
    root_key: pki.PrivateKey
    issuer: x509.Certificate
    issuer_key: pki.PrivateKey

    def leaf(
        self,
        spiffe_id: str = str(ORDERS),
        *,
        now: dt.datetime = NOW,
        ttl: dt.timedelta = pki.LEAF_TTL,
    ) -> x509.Certificate:
        """A well-formed SVID from ``certs.pki``."""
        return pki.build_leaf(
            pki.new_key().public_key(),
            spiffe_id=parse(spiffe_id),
            issuer=self.issuer,
            issuer_key=self.issuer_key,
            now=now,
            ttl=ttl,
        ).cert


def make_ca(
    trust_domain: str = TD,
    *,
    now: dt.datetime = NOW,
    root_ttl: dt.timedelta = pki.ROOT_TTL,
    issuer_ttl: dt.timedelta = pki.ISSUER_TTL,
) -> Ca:
    root_key = pki.new_key()
    root = pki.build_root(root_key, trust_domain=trust_domain, now=now, ttl=root_ttl)
    issuer_key = pki.new_key()
    issuer = pki.build_issuer(issuer_key, root=root, root_key=root_key, now=now, ttl=issuer_ttl)
    return Ca(root=root, root_key=root_key, issuer=issuer, issuer_key=issuer_key)


def odd_leaf(
    signer: x509.Certificate,
    signer_key: pki.PrivateKey,
    *,
    uris: Sequence[str] = (str(ORDERS),),
    ca: bool = False,
    not_before: dt.datetime = NOW - dt.timedelta(minutes=1),
    not_after: dt.datetime = NOW + dt.timedelta(hours=1),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    """A leaf shaped like an SVID except where told otherwise, signed by ``signer``."""
    public = (key or pki.new_key()).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd leaf")]))
        .issuer_name(signer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=None if not ca else 0), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


# ---- for the CLI tests -----------------------------------------------------------------


def meshlet(
    *args: str | Path, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m meshlet ARGS`` as a user would; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "meshlet", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def openssl(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert a CLI call succeeded, showing its stderr when it did not."""
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    return result


def listing(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``root``: relative name → (mode, sha256 of the content)."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (st.st_mode, digest)
    return out


def read_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def write_pem(path: Path, certs: Sequence[x509.Certificate]) -> Path:
    path.write_bytes(pki.dump_certs(certs))
    return path


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def cli_init(ca_dir: Path, trust_domain: str = TD, *extra: str) -> Path:
    ok(meshlet("certs", "init", "--dir", ca_dir, "--trust-domain", trust_domain, *extra))
    return ca_dir


def cli_issue(ca_dir: Path, out: Path, spiffe_id: str = str(ORDERS), *extra: str) -> Path:
    """Issue into ``out``; return ``out / "cert.pem"``."""
    ok(meshlet("certs", "issue", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--out", out, *extra))
    return out / "cert.pem"


def roots_of(bundle: Path) -> list[x509.Certificate]:
    return read_chain(bundle)


def openssl_verifies(bundle: Path, cert: Path, untrusted: Path | None = None) -> bool:
    """``openssl verify -CAfile bundle -untrusted (untrusted or cert) cert`` succeeded."""
    result = openssl("verify", "-CAfile", bundle, "-untrusted", untrusted or cert, cert)
    if result.returncode == 0:
        assert result.stdout.strip() == f"{cert}: OK"
        return True
    return False
