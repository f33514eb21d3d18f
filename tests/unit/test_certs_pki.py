"""Building and reading certificates (certs/pki.py): leaves follow the X.509-SVID rules,
lifetimes are what was asked for, and every unusable file gets a message naming it."""

from __future__ import annotations

import datetime as dt

import pytest
from certs_helpers import NOW, ORDERS, TD, Ca, make_ca
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from certs import pki
from certs.spiffe import parse
from meshlet.errors import CertificateError, InputError


@pytest.fixture(scope="module")
def ca() -> Ca:
    return make_ca()


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


def test_a_leaf_follows_the_svid_rules(ca: Ca):
    leaf = ca.leaf()
    basic = ext(leaf, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.uri_sans(leaf) == [str(ORDERS)]
    assert pki.spiffe_id_of(leaf) == ORDERS
    assert pki.key_type(leaf) == "ECDSA P-256"
    assert pki.issued_by(leaf, ca.issuer)


def test_signing_certificates_are_cas_that_sign(ca: Ca):
    for cert in (ca.root, ca.issuer):
        assert ext(cert, x509.BasicConstraints).value.ca
        assert ext(cert, x509.KeyUsage).value.key_cert_sign
        assert pki.trust_domain_of(cert) == TD
    assert ext(ca.issuer, x509.BasicConstraints).value.path_length == 0
    assert pki.issued_by(ca.issuer, ca.root)
    assert pki.issued_by(ca.root, ca.root)


def test_a_leaf_lasts_as_long_as_asked_plus_a_backdate_for_clock_skew(ca: Ca):
    leaf = ca.leaf(ttl=dt.timedelta(hours=24))
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(seconds=60)
    assert pki.ttl_of(leaf) == dt.timedelta(hours=24)


@given(
    ttl_seconds=st.integers(min_value=1, max_value=3 * 86400),
    micros=st.integers(min_value=0, max_value=999_999),
)
def test_ttl_of_gives_back_the_requested_lifetime_at_any_moment(
    ca: Ca, ttl_seconds: int, micros: int
):
    # `renew` re-issues with ttl_of(old): an error here makes lifetimes drift on every renewal
    now = NOW + dt.timedelta(microseconds=micros)
    ttl = dt.timedelta(seconds=ttl_seconds)
    leaf = ca.leaf(now=now, ttl=ttl)
    assert pki.ttl_of(leaf) == ttl


def test_a_leaf_never_outlives_its_issuer():
    ca = make_ca(issuer_ttl=dt.timedelta(hours=2))
    result = pki.build_leaf(
        pki.new_key().public_key(),
        spiffe_id=ORDERS,
        issuer=ca.issuer,
        issuer_key=ca.issuer_key,
        now=NOW,
        ttl=dt.timedelta(hours=24),
    )
    assert result.capped
    assert result.cert.not_valid_after_utc == ca.issuer.not_valid_after_utc
    assert not pki.build_leaf(
        pki.new_key().public_key(),
        spiffe_id=ORDERS,
        issuer=ca.issuer,
        issuer_key=ca.issuer_key,
        now=NOW,
        ttl=dt.timedelta(hours=1),
    ).capped


def test_an_issuer_never_outlives_its_root():
    ca = make_ca(root_ttl=dt.timedelta(days=30), issuer_ttl=dt.timedelta(days=365))
    assert ca.issuer.not_valid_after_utc == ca.root.not_valid_after_utc


def test_an_expired_root_signs_no_issuer():
    ca = make_ca(root_ttl=dt.timedelta(days=1), issuer_ttl=dt.timedelta(hours=1))
    with pytest.raises(CertificateError, match="root certificate has expired"):
        pki.build_issuer(
            pki.new_key(), root=ca.root, root_key=ca.root_key, now=NOW + dt.timedelta(days=2)
        )


def test_an_expired_issuer_signs_no_leaf():
    ca = make_ca(issuer_ttl=dt.timedelta(hours=1))
    with pytest.raises(CertificateError, match="rotate issuer"):
        ca.leaf(now=NOW + dt.timedelta(hours=2))


def test_a_leaf_outside_the_trust_domain_is_refused(ca: Ca):
    with pytest.raises(InputError, match=r"outside this CA's trust domain 'mesh.test'"):
        ca.leaf("spiffe://other.test/ns/shop/sa/orders")


def test_a_leaf_without_a_path_is_refused(ca: Ca):
    with pytest.raises(InputError, match="has no path"):
        ca.leaf(f"spiffe://{TD}")


def test_a_leaf_for_a_key_that_is_not_p256_is_refused(ca: Ca):
    with pytest.raises(CertificateError, match="ECDSA P-256"):
        pki.build_leaf(
            ec.generate_private_key(ec.SECP384R1()).public_key(),
            spiffe_id=parse(f"spiffe://{TD}/ns/a/sa/b"),
            issuer=ca.issuer,
            issuer_key=ca.issuer_key,
            now=NOW,
        )


def test_a_csr_round_trips_with_its_identity():
    key = pki.new_key()
    csr = pki.build_csr(key, ORDERS)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    loaded = pki.load_csr(pem, source="orders.csr")
    assert loaded.public_key() == key.public_key()
    with pytest.raises(CertificateError, match=r"orders\.csr is not a PEM certificate signing"):
        pki.load_csr(b"junk", source="orders.csr")


# ---- reading files ---------------------------------------------------------------------


def test_pem_and_der_certificates_load(ca: Ca):
    pem = pki.dump_certs([ca.leaf(), ca.issuer])
    assert [c.issuer for c in pki.load_certs(pem, source="x")] == [
        ca.issuer.subject,
        ca.root.subject,
    ]
    der = ca.root.public_bytes(serialization.Encoding.DER)
    assert pki.load_certs(der, source="x") == [ca.root]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("key", "cert.pem holds a private key, not a certificate"),
        ("csr", "cert.pem is a certificate request, not a certificate"),
        ("random", r"cert.pem is not a certificate \(neither PEM nor DER\)"),
        ("empty", r"cert.pem is not a certificate"),
        ("broken-pem", "cert.pem has no readable PEM certificate"),
    ],
)
def test_what_is_not_a_certificate_is_named(content: str, message: str):
    key = pki.new_key()
    data = {
        "key": pki.dump_key(key),
        "csr": pki.build_csr(key, ORDERS).public_bytes(serialization.Encoding.PEM),
        "random": bytes(range(256)) * 2,
        "empty": b"",
        "broken-pem": b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    }[content]
    with pytest.raises(CertificateError, match=message):
        pki.load_certs(data, source="cert.pem")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cert", "key.pem holds a certificate, not a private key"),
        ("random", "key.pem is not an unencrypted PEM private key"),
        ("encrypted", "key.pem is not an unencrypted PEM private key"),
        ("p384", "key.pem is not an ECDSA P-256 key"),
    ],
)
def test_what_is_not_a_usable_key_is_named(ca: Ca, content: str, message: str):
    data = {
        "cert": pki.dump_certs([ca.root]),
        "random": b"\x00garbage" * 40,
        "encrypted": pki.new_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        "p384": ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }[content]
    with pytest.raises(CertificateError, match=message):
        pki.load_key(data, source="key.pem")


def test_a_key_round_trips_and_matches_only_its_certificate(ca: Ca):
    key = pki.load_key(pki.dump_key(ca.issuer_key), source="ca-key.pem")
    assert pki.key_matches(ca.issuer, key)
    assert not pki.key_matches(ca.root, key)


def test_anchor_of_finds_the_root_a_chain_leads_to(ca: Ca):
    other = make_ca()
    leaf = ca.leaf()
    assert pki.anchor_of([leaf, ca.issuer], [other.root, ca.root]) == ca.root
    assert pki.anchor_of([leaf, ca.issuer], [other.root]) is None
    assert pki.anchor_of([leaf, other.issuer], [ca.root, other.root]) is None, "broken link"
    assert pki.anchor_of([], [ca.root]) is None
