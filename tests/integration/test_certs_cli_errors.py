"""Bad input to `meshlet certs`: exactly one line on stderr, exit 2 for bad input and 1
for a refusal, nothing on stdout, and no file written, changed or left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from certs_helpers import ORDERS, WEB, cli_init, cli_issue, listing, meshlet
from cryptography.hazmat.primitives import serialization

from certs import pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a workload, and files of every wrong kind. The tests must not change any of it."""
    base = tmp_path_factory.mktemp("errors")
    ca = cli_init(base / "ca")
    cli_issue(ca, base / "orders", str(ORDERS))
    cli_issue(ca, base / "web", str(WEB))
    key = pki.load_key((base / "orders" / "key.pem").read_bytes(), source="key")
    (base / "csr.pem").write_bytes(
        pki.build_csr(key, ORDERS).public_bytes(serialization.Encoding.PEM)
    )
    (base / "random.bin").write_bytes(os.urandom(512))
    (base / "garbage-key.pem").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nnot a key at all\n-----END PRIVATE KEY-----\n"
    )
    (base / "a-directory").mkdir()
    (base / "a-file").write_text("just a file\n")
    # a CA whose issuer key is garbage
    shutil.copytree(ca, base / "broken-ca")
    (base / "broken-ca" / "ca-key.pem").write_bytes(b"garbage\n")
    return base


def issue(*args: str | Path) -> tuple[str | Path, ...]:
    return ("certs", "issue", "--dir", "ca", "--spiffe-id", str(ORDERS), "--out", "new", *args)


def renew(cert: str, key: str, *args: str) -> tuple[str, ...]:
    return ("certs", "renew", "--dir", "ca", "--cert", cert, "--key", key, *args)


CASES = {
    # missing or wrong directories
    "issue-missing-dir": (
        ("certs", "issue", "--dir", "nowhere", "--spiffe-id", str(ORDERS), "--out", "new"),
        2,
        "CA directory nowhere does not exist: create it with `meshlet certs init",
    ),
    "renew-missing-dir": (
        ("certs", "renew", "--dir", "nowhere", "--cert", "orders/cert.pem", "--key", "orders/key.pem"),
        2,
        "CA directory nowhere does not exist",
    ),
    "rotate-missing-dir": (
        ("certs", "rotate", "root", "--dir", "nowhere", "--status"),
        2,
        "CA directory nowhere does not exist",
    ),
    "dir-is-a-file": (
        ("certs", "rotate", "issuer", "--dir", "a-file"),
        2,
        "Invalid value for '--dir': Directory 'a-file' is a file.",
    ),
    "not-a-ca-dir": (
        ("certs", "rotate", "issuer", "--dir", "orders"),
        2,
        "orders/root-cert.pem is missing: orders is not a complete meshlet CA directory",
    ),
    "init-under-a-file": (
        ("certs", "init", "--dir", "a-file/ca", "--trust-domain", "mesh.test"),
        2,
        "cannot create or use directory a-file/ca: Not a directory",
    ),
    "out-under-a-file": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", str(ORDERS), "--out", "a-file/new"),
        2,
        "cannot create or use directory a-file/new",
    ),
    # unreadable or wrong keys
    "key-is-garbage": (renew("orders/cert.pem", "garbage-key.pem"), 2, "garbage-key.pem is not an unencrypted PEM private key"),
    "key-is-random-bytes": (renew("orders/cert.pem", "random.bin"), 2, "random.bin is not an unencrypted PEM private key"),
    "key-is-a-directory": (renew("orders/cert.pem", "a-directory"), 2, "key file a-directory is a directory, not a file"),
    "key-is-a-certificate": (renew("orders/cert.pem", "orders/cert.pem"), 2, "orders/cert.pem holds a certificate, not a private key"),
    "key-is-missing": (renew("orders/cert.pem", "nothing.pem"), 2, "key file nothing.pem does not exist"),
    "key-of-another-workload": (renew("orders/cert.pem", "web/key.pem"), 2, "web/key.pem is not the key of orders/cert.pem"),
    "ca-key-is-garbage": (
        ("certs", "issue", "--dir", "broken-ca", "--spiffe-id", str(ORDERS), "--out", "new"),
        2,
        "broken-ca/ca-key.pem is not an unencrypted PEM private key",
    ),
    # wrong file types where a certificate is expected
    "cert-is-a-key": (renew("orders/key.pem", "orders/key.pem"), 2, "orders/key.pem holds a private key, not a certificate"),
    "cert-is-a-csr": (("certs", "inspect", "csr.pem"), 2, "csr.pem is a certificate request, not a certificate"),
    "cert-is-random-bytes": (("certs", "needs-renewal", "random.bin"), 2, "random.bin is not a certificate (neither PEM nor DER)"),
    "cert-is-a-directory": (("certs", "inspect", "a-directory"), 2, "certificate file a-directory is a directory, not a file"),
    "still-in-use-is-a-key": (
        ("certs", "rotate", "root", "--dir", "ca", "--status", "--still-in-use", "orders/key.pem"),
        2,
        "orders/key.pem holds a private key, not a certificate",
    ),
    "bundle-is-a-csr": (("certs", "inspect", "orders/cert.pem", "--bundle", "csr.pem"), 2, "csr.pem is a certificate request"),
    # bad durations
    "ttl-5x": (issue("--ttl", "5x"), 2, "--ttl '5x' is not a duration: use a number with a unit"),
    "ttl-0s": (issue("--ttl", "0s"), 2, "--ttl '0s' must be longer than zero"),
    "ttl-negative": (issue("--ttl", "-1h"), 2, "--ttl '-1h' is not a duration"),
    "ttl-past-year-9999": (issue("--ttl", "9000y"), 2, "--ttl '9000y' is too long"),
    "ttl-overflow": (issue("--ttl", "99999999999y"), 2, "--ttl '99999999999y' is too long"),
    "renew-ttl-5x": (renew("orders/cert.pem", "orders/key.pem", "--ttl", "5x"), 2, "--ttl '5x' is not a duration"),
    "rotate-issuer-ttl-0s": (("certs", "rotate", "issuer", "--dir", "ca", "--ttl", "0s"), 2, "--ttl '0s' must be longer than zero"),
    "root-ttl-bad": (("certs", "rotate", "root", "--dir", "ca", "--step", "add", "--root-ttl", "ten years"), 2, "--root-ttl 'ten years' is not a duration"),
    "expires-in-bad": (("certs", "needs-renewal", "orders/cert.pem", "--expires-in", "5x"), 2, "--expires-in '5x' is not a duration"),
    "expires-in-0%": (("certs", "needs-renewal", "orders/cert.pem", "--expires-in", "0%"), 2, "--expires-in '0%' must be between 0% and 100%"),
    # bad identities
    "id-in-another-trust-domain": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", "spiffe://other.test/ns/shop/sa/orders", "--out", "new"),
        2,
        "SPIFFE ID spiffe://other.test/ns/shop/sa/orders is outside this CA's trust domain 'mesh.test'",
    ),
    "id-with-trailing-slash": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", "spiffe://mesh.test/ns/shop/", "--out", "new"),
        2,
        "has an empty path segment",
    ),
    "id-without-path": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", "spiffe://mesh.test", "--out", "new"),
        2,
        "has no path",
    ),
    "id-with-uppercase-scheme": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", "SPIFFE://mesh.test/ns/a/sa/b", "--out", "new"),
        2,
        "the scheme must be lowercase",
    ),
    # flags
    "unknown-step": (("certs", "rotate", "root", "--dir", "ca", "--step", "later"), 2, "'later' is not one of"),
    "missing-flag": (("certs", "issue", "--dir", "ca", "--out", "new"), 2, "Missing option '--spiffe-id'"),
    "out-is-a-file": (
        ("certs", "issue", "--dir", "ca", "--spiffe-id", str(ORDERS), "--out", "a-file"),
        2,
        "Invalid value for '--out': Directory 'a-file' is a file.",
    ),
    # refusals
    "init-over-existing-ca": (
        ("certs", "init", "--dir", "ca", "--trust-domain", "mesh.test"),
        1,
        "ca already holds a CA (root-cert.pem, ca-cert.pem, ca-key.pem): refusing to overwrite it; pass --force",
    ),
    "init-over-existing-ca-other-domain": (
        ("certs", "init", "--dir", "ca", "--trust-domain", "other.test"),
        1,
        "refusing to overwrite it",
    ),
    "step-out-of-order": (
        ("certs", "rotate", "root", "--dir", "ca", "--step", "retire"),
        1,
        "cannot retire now: the next root rotation step in ca is 'add'",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("args", "code", "message"), CASES.values(), ids=CASES.keys())
def test_bad_input_gives_one_line_an_exit_code_and_no_files(
    work: Path, args: tuple[str, ...], code: int, message: str
):
    before = listing(work)
    result = meshlet(*args, cwd=work)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshlet: error: ")
    assert message in lines[0]
    assert result.returncode == code
    assert result.stdout == ""
    assert listing(work) == before, "nothing written, changed or left behind"
    assert not (work / "new").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("--trust-domain", "Mesh.Local"),
        ("--trust-domain", ""),
        ("--trust-domain", "mesh.test", "--root-ttl", "5x"),
        ("--trust-domain", "mesh.test", "--issuer-ttl", "-1h"),
        ("--trust-domain", "mesh.test", "--root-ttl", "1d", "--issuer-ttl", "2d"),
        ("--trust-domain", "mesh.test", "--root-ttl", "20000y"),
    ],
)
def test_a_refused_init_creates_no_directory(tmp_path: Path, args: tuple[str, ...]):
    result = meshlet("certs", "init", "--dir", tmp_path / "ca", *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("meshlet: error: ")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_where_a_file_must_go_leaves_the_others_alone(work: Path, tmp_path: Path):
    out = tmp_path / "out"
    (out / "cert.pem").mkdir(parents=True)
    (out / "key.pem").write_text("the old key\n")
    out.chmod(0o700)
    before = listing(tmp_path)
    result = meshlet(
        "certs", "issue", "--dir", work / "ca", "--spiffe-id", str(ORDERS), "--out", out
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"meshlet: error: {out / 'cert.pem'} is a directory: move it away and run this again\n"
    )
    assert listing(tmp_path) == before, "the old key is kept and no temp file is left"
