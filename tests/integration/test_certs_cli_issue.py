"""`meshlet certs init / issue / inspect` as a user runs them, checked with openssl."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from certs_helpers import (
    ORDERS,
    TD,
    cli_init,
    cli_issue,
    meshlet,
    mode,
    ok,
    openssl,
    openssl_verifies,
    read_chain,
)

from certs import pki
from certs.verify import Expectation, verify_svid

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(CA dir, out dir) after `init` and `issue` of the orders identity."""
    base = tmp_path_factory.mktemp("issue")
    ca = cli_init(base / "ca")
    cli_issue(ca, base / "orders")
    return ca, base / "orders"


def test_init_says_what_it_made(tmp_path: Path):
    result = ok(meshlet("certs", "init", "--dir", tmp_path / "ca", "--trust-domain", TD))
    assert f"created CA for trust domain {TD} in {tmp_path / 'ca'}" in result.stdout
    assert re.search(r"root +[0-9a-f]{16} +valid until \d{4}-", result.stdout)
    assert "bundle.pem, ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem" in result.stdout
    assert result.stderr == ""


def test_issue_writes_a_leaf_its_key_and_the_bundle(issued: tuple[Path, Path]):
    ca, out = issued
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
    leaf, issuer = read_chain(out / "cert.pem")
    assert issuer == read_chain(ca / "ca-cert.pem")[0]
    assert pki.spiffe_id_of(leaf) == ORDERS
    key = pki.load_key((out / "key.pem").read_bytes(), source="key.pem")
    assert pki.key_matches(leaf, key)
    assert (out / "bundle.pem").read_bytes() == (ca / "bundle.pem").read_bytes()
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=24, seconds=60), "24 h by default (+60 s backdate)"
    now = dt.datetime.now(dt.UTC)
    verdict = verify_svid(
        read_chain(out / "cert.pem"),
        read_chain(ca / "bundle.pem"),
        now=now,
        expect=Expectation.exactly(ORDERS),
    )
    assert verdict.ok, str(verdict)


def test_keys_are_0600_and_directories_0700(issued: tuple[Path, Path]):
    ca, out = issued
    assert mode(ca) == 0o700
    assert mode(out) == 0o700
    assert mode(ca / "root-key.pem") == 0o600
    assert mode(ca / "ca-key.pem") == 0o600
    assert mode(out / "key.pem") == 0o600
    assert mode(out / "cert.pem") == 0o644


def test_openssl_verifies_the_leaf_against_the_bundle(issued: tuple[Path, Path]):
    ca, out = issued
    result = openssl(
        "verify", "-CAfile", ca / "bundle.pem", "-untrusted", ca / "ca-cert.pem", out / "cert.pem"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{out / 'cert.pem'}: OK"


def test_openssl_refuses_the_leaf_against_another_mesh(issued: tuple[Path, Path], tmp_path: Path):
    _, out = issued
    other = cli_init(tmp_path / "other")
    assert not openssl_verifies(other / "bundle.pem", out / "cert.pem")


def test_openssl_shows_an_svid(issued: tuple[Path, Path]):
    _, out = issued
    result = openssl("x509", "-in", out / "cert.pem", "-text", "-noout")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"URI:{ORDERS}" in text
    assert text.count("URI:") == 1
    assert re.search(r"X509v3 Basic Constraints: critical\n\s+CA:FALSE\n", text)
    assert re.search(r"X509v3 Key Usage: critical\n\s+Digital Signature\n", text)
    assert re.search(
        r"X509v3 Extended Key Usage: ?\n"
        r"\s+TLS Web Server Authentication, TLS Web Client Authentication\n",
        text,
    )
    assert "Certificate Sign" not in text
    assert "CRL Sign" not in text
    assert "ASN1 OID: prime256v1" in text


def test_openssl_shows_the_issuer_is_a_signing_ca(issued: tuple[Path, Path]):
    ca, _ = issued
    text = ok(openssl("x509", "-in", ca / "ca-cert.pem", "-text", "-noout")).stdout
    assert re.search(r"CA:TRUE, pathlen:0", text)
    assert re.search(r"Key Usage: critical\n\s+Digital Signature, Certificate Sign, CRL Sign", text)


def test_inspect_shows_identity_and_chain(issued: tuple[Path, Path]):
    ca, out = issued
    result = ok(
        meshlet("certs", "inspect", out / "cert.pem", "--bundle", ca / "bundle.pem", "-o", "json")
    )
    info = json.loads(result.stdout)
    assert info["spiffe_id"] == str(ORDERS)
    assert info["is_ca"] is False
    assert info["key_type"] == "ECDSA P-256"
    assert info["certificates_in_file"] == 2
    assert info["chain_verified"] is True
    assert 86000 < info["time_left_seconds"] <= 86400
    table = ok(meshlet("certs", "inspect", out / "cert.pem")).stdout
    assert re.search(rf"spiffe id +{re.escape(str(ORDERS))}\n", table)
    assert "not checked (pass --bundle)" in table


def test_inspect_exits_1_when_the_chain_does_not_verify(issued: tuple[Path, Path], tmp_path: Path):
    _, out = issued
    other = cli_init(tmp_path / "other")
    result = meshlet("certs", "inspect", out / "cert.pem", "--bundle", other / "bundle.pem")
    assert result.returncode == 1
    assert re.search(r"chain +unknown_ca: the chain does not lead to a trusted root", result.stdout)


def test_a_short_issuer_caps_the_leaf_and_says_so(tmp_path: Path):
    ca = cli_init(tmp_path / "ca", TD, "--issuer-ttl", "2h")
    result = ok(
        meshlet("certs", "issue", "--dir", ca, "--spiffe-id", str(ORDERS), "--out", tmp_path / "o")
    )
    assert result.stderr.startswith("warning: the issuer expires at ")
    assert "run `meshlet certs rotate issuer`" in result.stderr
    leaf, issuer = read_chain(tmp_path / "o" / "cert.pem")
    assert leaf.not_valid_after_utc == issuer.not_valid_after_utc
