"""The CA directory (certs/cadir.py, certs/files.py): what init writes, with which modes,
and the root rotation plan that refuses steps out of order or a retire that breaks a
certificate still in use. In-process, on files under tmp_path."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from certs_helpers import NOW, ORDERS, TD, listing, mode

from certs import cadir, pki
from certs.files import write_files
from certs.verify import Expectation, Reason, verify_svid
from meshlet.errors import CertificateError, ConflictError, InputError, NotFoundError


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    cadir.init(path, TD, NOW)
    return path


def step(path: Path, which: cadir.Step, **kw) -> cadir.CaState:
    cadir.apply(path, cadir.plan_root_step(cadir.load(path), which, NOW, **kw))
    return cadir.load(path)


def test_init_writes_the_ca_with_private_keys_and_a_private_directory(ca_dir: Path):
    assert sorted(p.name for p in ca_dir.iterdir()) == sorted(
        [
            "root-cert.pem",
            "root-key.pem",
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "bundle.pem",
        ]
    )
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root-key.pem") == 0o600
    assert mode(ca_dir / "ca-key.pem") == 0o600
    for public in ("root-cert.pem", "ca-cert.pem", "cert-chain.pem", "bundle.pem"):
        assert mode(ca_dir / public) == 0o644
    state = cadir.load(ca_dir)
    assert state.trust_domain == TD
    assert state.bundle == (state.root,)
    assert state.chain == (state.issuer, state.root)
    assert pki.load_certs((ca_dir / "cert-chain.pem").read_bytes(), source="x") == [
        state.issuer,
        state.root,
    ]
    assert state.next_step is cadir.Step.ADD


def test_init_tightens_an_existing_directory(tmp_path: Path):
    path = tmp_path / "ca"
    path.mkdir()
    path.chmod(0o755)
    cadir.init(path, TD, NOW)
    assert mode(path) == 0o700


def test_init_refuses_to_replace_a_ca_without_force(ca_dir: Path):
    before = listing(ca_dir)
    with pytest.raises(ConflictError, match=r"already holds a CA .*pass --force"):
        cadir.init(ca_dir, TD, NOW)
    assert listing(ca_dir) == before
    old_root = cadir.load(ca_dir).root
    assert cadir.init(ca_dir, TD, NOW, force=True).root != old_root


def test_init_refuses_an_issuer_longer_than_its_root(tmp_path: Path):
    with pytest.raises(InputError, match="--issuer-ttl must not be longer than --root-ttl"):
        cadir.init(tmp_path / "ca", TD, NOW, root_ttl=dt.timedelta(days=1))
    assert not (tmp_path / "ca").exists()


def test_load_names_what_is_missing_or_wrong(ca_dir: Path, tmp_path: Path):
    with pytest.raises(NotFoundError, match="does not exist: create it with `meshlet certs init"):
        cadir.load(tmp_path / "nowhere")
    (ca_dir / "root-key.pem").write_bytes((ca_dir / "ca-key.pem").read_bytes())
    with pytest.raises(
        CertificateError, match=r"root-key\.pem does not belong to .*root-cert\.pem"
    ):
        cadir.load(ca_dir)
    (ca_dir / "root-key.pem").unlink()
    assert cadir.load(ca_dir).root_key is None, "the root key may be kept offline"
    (ca_dir / "bundle.pem").unlink()
    with pytest.raises(NotFoundError, match=r"bundle\.pem is missing"):
        cadir.load(ca_dir)


def test_rotating_the_issuer_needs_the_root_key(ca_dir: Path):
    (ca_dir / "root-key.pem").unlink()
    with pytest.raises(
        InputError, match=r"root-key\.pem is missing: this step signs with the root"
    ):
        cadir.plan_rotate_issuer(cadir.load(ca_dir), NOW, pki.ISSUER_TTL)


def test_root_rotation_steps_in_order(ca_dir: Path):
    first = cadir.load(ca_dir)
    added = step(ca_dir, cadir.Step.ADD)
    assert added.root == first.root
    assert added.next_root is not None and added.bundle == (first.root, added.next_root)
    assert mode(ca_dir / "next-root-key.pem") == 0o600
    assert added.next_step is cadir.Step.PROMOTE

    promoted = step(ca_dir, cadir.Step.PROMOTE)
    assert promoted.root == added.next_root
    assert promoted.previous_root == first.root
    assert promoted.bundle == added.bundle
    assert pki.issued_by(promoted.issuer, promoted.root)
    assert not (ca_dir / "next-root-cert.pem").exists()
    assert promoted.next_step is cadir.Step.RETIRE

    retired = step(ca_dir, cadir.Step.RETIRE)
    assert retired.bundle == (promoted.root,)
    assert not (ca_dir / "previous-root-cert.pem").exists()
    assert retired.next_step is cadir.Step.ADD


@pytest.mark.parametrize(
    ("done", "refused"),
    [
        ((), cadir.Step.PROMOTE),
        ((), cadir.Step.RETIRE),
        ((cadir.Step.ADD,), cadir.Step.ADD),
        ((cadir.Step.ADD,), cadir.Step.RETIRE),
        ((cadir.Step.ADD, cadir.Step.PROMOTE), cadir.Step.ADD),
        ((cadir.Step.ADD, cadir.Step.PROMOTE), cadir.Step.PROMOTE),
    ],
)
def test_steps_out_of_order_are_refused(ca_dir: Path, done, refused):
    for s in done:
        step(ca_dir, s)
    expected = cadir.load(ca_dir).next_step.value
    before = listing(ca_dir)
    with pytest.raises(ConflictError, match=f"cannot {refused.value} now: .* is '{expected}'"):
        step(ca_dir, refused)
    assert listing(ca_dir) == before


def test_retire_refuses_while_a_certificate_chains_only_to_the_old_root(ca_dir: Path):
    old = cadir.load(ca_dir)
    old_chain, _, _ = cadir.issue(old, ORDERS, NOW)
    step(ca_dir, cadir.Step.ADD)
    promoted = step(ca_dir, cadir.Step.PROMOTE)
    new_chain, _, _ = cadir.issue(promoted, ORDERS, NOW)
    before = listing(ca_dir)
    with pytest.raises(ConflictError, match=r"orders/cert\.pem chains only to the old root"):
        step(ca_dir, cadir.Step.RETIRE, still_in_use=[("orders/cert.pem", old_chain)])
    assert listing(ca_dir) == before

    # a file with the leaf alone (its old issuer is gone after promote) is never waved through
    with pytest.raises(ConflictError, match=r"old-leaf\.pem leads to no root .* with its chain"):
        step(ca_dir, cadir.Step.RETIRE, still_in_use=[("old-leaf.pem", old_chain[:1])])
    assert listing(ca_dir) == before

    retired = step(
        ca_dir, cadir.Step.RETIRE, still_in_use=[("new", new_chain), ("new-leaf", new_chain[:1])]
    )
    expect = Expectation.exactly(ORDERS)
    assert verify_svid(new_chain, retired.bundle, now=NOW, expect=expect).ok
    gone = verify_svid(old_chain, retired.bundle, now=NOW, expect=expect)
    assert gone.reason is Reason.UNKNOWN_CA


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path: Path):
    (tmp_path / "cert.pem").mkdir()  # a directory where a file must go
    with pytest.raises(InputError, match=r"cert.pem is a directory"):
        write_files(tmp_path, {"key.pem": (b"new key", 0o600), "cert.pem": (b"new cert", 0o644)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem"], "no key, no temp files"

    write_files(tmp_path, {"a": (b"1", 0o600), "b": (b"2", 0o644)})
    assert (tmp_path / "a").read_bytes() == b"1" and mode(tmp_path / "a") == 0o600
    assert mode(tmp_path / "b") == 0o644
    write_files(tmp_path, {"b": (b"3", 0o644)}, remove=["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "cert.pem"], "no temp files left"
    assert (tmp_path / "b").read_bytes() == b"3"


def test_retire_refuses_a_certificate_it_cannot_trace_to_any_root(ca_dir: Path, tmp_path: Path):
    step(ca_dir, cadir.Step.ADD)
    step(ca_dir, cadir.Step.PROMOTE)
    stranger = cadir.init(tmp_path / "other", TD, NOW)
    foreign_leaf, _, _ = cadir.issue(stranger, ORDERS, NOW)
    before = listing(ca_dir)
    with pytest.raises(ConflictError, match=r"leads to no root in the bundle.*with its chain"):
        step(ca_dir, cadir.Step.RETIRE, still_in_use=[("stranger.pem", foreign_leaf[:1])])
    assert listing(ca_dir) == before
