"""Issuer and root rotation through `meshlet certs rotate`, checked at every step with
`verify_svid` against the current bundle.pem and with `openssl verify`."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from certs_helpers import (
    ORDERS,
    WEB,
    cli_init,
    cli_issue,
    meshlet,
    ok,
    openssl_verifies,
    read_chain,
    write_pem,
)

from certs import pki
from certs.verify import Expectation, Reason, Verdict, verify_svid

pytestmark = pytest.mark.integration


def rotate_root(ca: Path, *args: str | Path):
    return meshlet("certs", "rotate", "root", "--dir", ca, *args)


def svid_verdict(ca: Path, cert: Path) -> Verdict:
    sid = pki.spiffe_id_of(read_chain(cert)[0])
    assert sid is not None
    return verify_svid(
        read_chain(cert),
        read_chain(ca / "bundle.pem"),
        now=dt.datetime.now(dt.UTC),
        expect=Expectation.exactly(sid),
    )


def verifies(ca: Path, cert: Path) -> bool:
    """The leaf verifies against the CA's current bundle.pem both ways; they must agree."""
    ours = svid_verdict(ca, cert).ok
    theirs = openssl_verifies(ca / "bundle.pem", cert)
    assert ours == theirs, f"verify_svid says {ours}, openssl says {theirs}"
    return ours


def status(ca: Path, *args: str | Path) -> dict:
    return json.loads(ok(rotate_root(ca, "--status", "-o", "json", *args)).stdout)


def assert_refused(ca: Path, step: str, *args: str | Path, because: str) -> None:
    before = {p.name: p.read_bytes() for p in ca.iterdir()}
    result = rotate_root(ca, "--step", step, *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert because in result.stderr
    assert result.stdout == ""
    assert {p.name: p.read_bytes() for p in ca.iterdir()} == before, "nothing changed"


def test_root_rotation_add_promote_retire(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    old_leaf = cli_issue(ca, tmp_path / "old", str(ORDERS))
    first_root = read_chain(ca / "root-cert.pem")[0]

    # before: one root, next step is add; promote and retire are refused
    text = ok(rotate_root(ca, "--status")).stdout
    assert "next step     add: create a new root and trust both" in text
    assert status(ca)["next_step"] == "add"
    assert_refused(ca, "promote", because="the next root rotation step in")
    assert_refused(ca, "retire", because="is 'add'")
    assert verifies(ca, old_leaf)

    # add: the new root joins the bundle; the old leaf still verifies
    result = ok(rotate_root(ca, "--step", "add"))
    assert "add: done; bundle.pem now holds 2 root(s)" in result.stdout
    assert "next step: promote" in result.stdout
    assert len(read_chain(ca / "bundle.pem")) == 2
    assert verifies(ca, old_leaf)
    info = status(ca)
    assert info["next_step"] == "promote"
    assert [r["role"] for r in info["roots"]] == ["active", "next"]
    assert_refused(ca, "add", because="is 'promote'")
    assert_refused(ca, "retire", because="is 'promote'")

    # promote: a new issuer under the new root; old and new leaves both verify
    ok(rotate_root(ca, "--step", "promote"))
    new_leaf = cli_issue(ca, tmp_path / "new", str(WEB))
    new_root = read_chain(ca / "root-cert.pem")[0]
    assert new_root != first_root
    assert pki.anchor_of(read_chain(new_leaf), [new_root]) == new_root
    assert pki.anchor_of(read_chain(new_leaf), [first_root]) is None
    assert verifies(ca, old_leaf)
    assert verifies(ca, new_leaf)
    info = status(ca, "--still-in-use", f"{old_leaf},{new_leaf}")
    assert info["next_step"] == "retire"
    assert [r["role"] for r in info["roots"]] == ["previous", "active"]
    assert info["still_on_old_root"] == [str(old_leaf)]
    text = ok(rotate_root(ca, "--status", "--still-in-use", old_leaf)).stdout
    assert "next step     retire: drop the old root" in text
    assert f"blocking      {old_leaf} chains only to the old root" in text

    # retire refuses while a leaf that chains only to the old root is still in use; a file
    # with the leaf alone cannot be traced to a root any more, and is refused too
    leaf_only = write_pem(tmp_path / "old-leaf-only.pem", read_chain(old_leaf)[:1])
    assert status(ca, "--still-in-use", leaf_only)["still_on_old_root"] == [str(leaf_only)]
    assert_refused(ca, "retire", "--still-in-use", leaf_only, because="with its chain")
    assert_refused(
        ca, "retire", "--still-in-use", old_leaf, because=f"{old_leaf} chains only to the old root"
    )
    assert_refused(
        ca,
        "retire",
        "--still-in-use",
        new_leaf,
        "--still-in-use",
        old_leaf,
        because="refusing to retire the old root",
    )
    assert_refused(ca, "add", because="is 'retire'")
    assert verifies(ca, old_leaf), "a refused retire leaves the old root trusted"

    # once the old workload is re-issued, retire goes through
    renewed = tmp_path / "renewed"
    shutil.copytree(tmp_path / "old", renewed)
    ok(
        meshlet(
            "certs",
            "renew",
            "--dir",
            ca,
            "--cert",
            renewed / "cert.pem",
            "--key",
            renewed / "key.pem",
        )
    )
    result = ok(
        rotate_root(ca, "--step", "retire", "--still-in-use", f"{renewed / 'cert.pem'},{new_leaf}")
    )
    assert "retire: done; bundle.pem now holds 1 root(s)" in result.stdout
    assert read_chain(ca / "bundle.pem") == [new_root]
    assert verifies(ca, new_leaf)
    assert verifies(ca, renewed / "cert.pem")
    assert not verifies(ca, old_leaf), "the old root is gone"
    assert svid_verdict(ca, old_leaf).reason is Reason.UNKNOWN_CA
    assert status(ca)["next_step"] == "add"


def test_rotate_root_needs_exactly_one_of_step_and_status(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    for args in ((), ("--status", "--step", "add")):
        result = rotate_root(ca, *args)
        assert result.returncode == 2
        assert result.stderr == (
            "meshlet: error: give exactly one of --step add|promote|retire and --status\n"
        )


def test_issuer_rotation_keeps_old_leaves_and_signs_new_ones(tmp_path: Path):
    ca = cli_init(tmp_path / "ca")
    old_leaf = cli_issue(ca, tmp_path / "old", str(ORDERS))
    old_issuer = read_chain(ca / "ca-cert.pem")[0]
    root = read_chain(ca / "root-cert.pem")[0]

    result = ok(meshlet("certs", "rotate", "issuer", "--dir", ca, "--ttl", "30d"))
    assert result.stdout.startswith("new issuer ")
    new_issuer = read_chain(ca / "ca-cert.pem")[0]
    assert new_issuer != old_issuer
    assert read_chain(ca / "root-cert.pem") == [root], "same root"
    assert read_chain(ca / "cert-chain.pem") == [new_issuer, root]
    assert read_chain(ca / "bundle.pem") == [root]
    lifetime = new_issuer.not_valid_after_utc - new_issuer.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30, seconds=60)

    new_leaf = cli_issue(ca, tmp_path / "new", str(WEB))
    leaf, presented = read_chain(new_leaf)
    assert presented == new_issuer
    assert pki.issued_by(leaf, new_issuer)
    assert not pki.issued_by(leaf, old_issuer)
    assert verifies(ca, old_leaf), "leaves of the old issuer keep verifying"
    assert verifies(ca, new_leaf)
    assert openssl_verifies(ca / "bundle.pem", new_leaf, untrusted=ca / "ca-cert.pem")
