"""`meshlet certs needs-renewal` and `renew` (once, and as a daemon) as a user runs them."""

from __future__ import annotations

import datetime as dt
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from certs_helpers import (
    ORDERS,
    REPO,
    Ca,
    cli_init,
    cli_issue,
    make_ca,
    meshlet,
    mode,
    odd_leaf,
    ok,
    openssl_verifies,
    read_chain,
    write_pem,
)

from certs import pki

pytestmark = pytest.mark.integration


def lifetime(cert: Path) -> dt.timedelta:
    leaf = read_chain(cert)[0]
    return leaf.not_valid_after_utc - leaf.not_valid_before_utc


# ---- needs-renewal ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed_leaves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Leaves whose validity is chosen around the real clock, so no test has to sleep."""
    base = tmp_path_factory.mktemp("timed")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ca: Ca = make_ca(now=now - dt.timedelta(days=1))
    minutes = dt.timedelta(minutes=1)

    def leaf(name: str, elapsed: int, left: int) -> Path:
        cert = odd_leaf(
            ca.issuer,
            ca.issuer_key,
            not_before=now - elapsed * minutes,
            not_after=now + left * minutes,
        )
        return write_pem(base / f"{name}.pem", [cert, ca.issuer])

    return {
        "late": leaf("late", elapsed=50, left=10),  # 1/6 of an hour left
        "early": leaf("early", elapsed=10, left=50),  # 5/6 of an hour left
        "expired": leaf("expired", elapsed=70, left=-10),
    }


@pytest.mark.parametrize(
    ("which", "expires_in", "code"),
    [
        ("late", None, 0),  # default: past 2/3 of the lifetime
        ("early", None, 1),
        ("expired", None, 0),
        ("late", "33%", 0),
        ("early", "33%", 1),
        ("early", "90%", 0),
        ("late", "1h", 0),
        ("early", "1h", 0),
        ("early", "30m", 1),
        ("late", "5m", 1),
    ],
)
def test_needs_renewal_exit_codes(timed_leaves, which: str, expires_in: str | None, code: int):
    args = ["--expires-in", expires_in] if expires_in else []
    result = meshlet("certs", "needs-renewal", timed_leaves[which], *args)
    assert result.returncode == code, result.stderr
    cert = timed_leaves[which]
    if code == 0:
        assert result.stdout.startswith(f"{cert}: renew now (")
    else:
        assert result.stdout.startswith(f"{cert}: no renewal needed yet (")
    assert result.stderr == ""


def test_needs_renewal_says_an_expired_certificate_has_expired(timed_leaves):
    result = meshlet("certs", "needs-renewal", timed_leaves["expired"])
    assert result.stdout == f"{timed_leaves['expired']}: renew now (expired left)\n"


def test_a_short_leaf_needs_renewal_after_two_thirds_of_its_life(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    cert = cli_issue(ca, tmp_path / "o", str(ORDERS), "--ttl", "6s")
    leaf = read_chain(cert)[0]
    assert meshlet("certs", "needs-renewal", cert).returncode == 1
    two_thirds = leaf.not_valid_before_utc + dt.timedelta(seconds=4.1)
    time.sleep(max(0.0, (two_thirds - dt.datetime.now(dt.UTC)).total_seconds()))
    assert meshlet("certs", "needs-renewal", cert).returncode == 0


# ---- renew --------------------------------------------------------------------------------


@pytest.fixture
def workload(tmp_path: Path) -> tuple[Path, Path]:
    """(CA dir, out dir) with a 2 h leaf for the orders identity."""
    ca = cli_init(tmp_path / "ca")
    cli_issue(ca, tmp_path / "orders", str(ORDERS), "--ttl", "2h")
    return ca, tmp_path / "orders"


def renew(ca: Path, out: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return meshlet(
        "certs", "renew", "--dir", ca, "--cert", out / "cert.pem", "--key", out / "key.pem", *extra
    )


def test_renew_keeps_the_identity_key_and_lifetime(workload: tuple[Path, Path]):
    ca, out = workload
    old_leaf = read_chain(out / "cert.pem")[0]
    old_key = (out / "key.pem").read_bytes()
    result = ok(renew(ca, out))
    assert result.stdout.startswith(f"renewed {out / 'cert.pem'}: valid until ")
    new_leaf = read_chain(out / "cert.pem")[0]
    assert new_leaf.serial_number != old_leaf.serial_number
    assert pki.spiffe_id_of(new_leaf) == ORDERS
    assert (out / "key.pem").read_bytes() == old_key
    assert new_leaf.public_key() == old_leaf.public_key()
    assert lifetime(out / "cert.pem") == dt.timedelta(hours=2, seconds=60)
    assert new_leaf.not_valid_after_utc >= old_leaf.not_valid_after_utc
    assert openssl_verifies(ca / "bundle.pem", out / "cert.pem")


def test_renew_with_rekey_makes_a_new_private_key(workload: tuple[Path, Path]):
    ca, out = workload
    old_leaf = read_chain(out / "cert.pem")[0]
    old_key = (out / "key.pem").read_bytes()
    ok(renew(ca, out, "--rekey"))
    new_leaf = read_chain(out / "cert.pem")[0]
    new_key = pki.load_key((out / "key.pem").read_bytes(), source="key.pem")
    assert (out / "key.pem").read_bytes() != old_key
    assert mode(out / "key.pem") == 0o600
    assert pki.key_matches(new_leaf, new_key)
    assert new_leaf.public_key() != old_leaf.public_key()
    assert pki.spiffe_id_of(new_leaf) == ORDERS
    assert new_leaf.serial_number != old_leaf.serial_number
    assert openssl_verifies(ca / "bundle.pem", out / "cert.pem")


def test_renew_takes_a_new_lifetime_and_runs_exec(workload: tuple[Path, Path]):
    ca, out = workload
    marker = out.parent / "reloaded"
    ok(renew(ca, out, "--ttl", "1h", "--exec", f"touch {shlex.quote(str(marker))}"))
    assert lifetime(out / "cert.pem") == dt.timedelta(hours=1, seconds=60)
    assert marker.exists()


def test_renewing_a_short_leaf_again_and_again_keeps_its_lifetime(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    cli_issue(ca, tmp_path / "o", str(ORDERS), "--ttl", "6s")
    assert lifetime(tmp_path / "o" / "cert.pem") == dt.timedelta(seconds=6)
    for _ in range(3):
        ok(renew(ca, tmp_path / "o"))
        assert lifetime(tmp_path / "o" / "cert.pem") == dt.timedelta(seconds=6)


def test_renew_daemon_renews_by_itself_and_stops_on_sigterm(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    out = tmp_path / "orders"
    cli_issue(ca, out, str(ORDERS), "--ttl", "6s")
    first = read_chain(out / "cert.pem")[0]
    marker = tmp_path / "renewals"
    log = tmp_path / "daemon.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "meshlet", "certs", "renew", "--daemon",
                "--dir", str(ca), "--cert", str(out / "cert.pem"), "--key", str(out / "key.pem"),
                "--exec", f"echo renewed >> {shlex.quote(str(marker))}",
            ],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # 2/3 of 6 s (± 5%) after issue, then again 2/3 of the new leaf's 6 s
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.exists() and len(marker.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the daemon died: {log.read_text()}"
        assert marker.exists() and len(marker.read_text().splitlines()) >= 2, log.read_text()
        renewed = read_chain(out / "cert.pem")[0]
        assert renewed.serial_number != first.serial_number
        assert pki.spiffe_id_of(renewed) == ORDERS
        assert renewed.public_key() == first.public_key()
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert openssl_verifies(ca / "bundle.pem", out / "cert.pem")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
        assert log.read_text().count(f"renewed {out / 'cert.pem'}: valid until") >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_renew_daemon_refuses_a_key_that_does_not_match_at_once(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    cli_issue(ca, tmp_path / "a", str(ORDERS))
    cli_issue(ca, tmp_path / "b", str(ORDERS))
    result = meshlet(
        "certs", "renew", "--daemon", "--dir", ca,
        "--cert", tmp_path / "a" / "cert.pem", "--key", tmp_path / "b" / "key.pem",
        timeout=15,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"meshlet: error: {tmp_path / 'b' / 'key.pem'} is not the key of "
        f"{tmp_path / 'a' / 'cert.pem'}: pass the matching --key\n"
    )
