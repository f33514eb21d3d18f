"""The CA directory: a root, an issuer under it, the trust bundle, and root rotation.

Layout (keys 0600, the directory 0700):
    root-cert.pem  root-key.pem      the active trust anchor
    ca-cert.pem    ca-key.pem        the issuer that signs workload certificates
    cert-chain.pem                   issuer + root
    bundle.pem                       every root the mesh trusts right now
    next-root-cert.pem next-root-key.pem   after `rotate root --step add`
    previous-root-cert.pem                 after `--step promote`, until `--step retire`

The rotation step in progress is derived from which files exist; nothing else records
it. Each operation is planned as a pure ``Change`` from the loaded state, then written
with ``files.write_files`` (all files or none).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from certs import pki
from certs.files import PUBLIC, SECRET, ensure_private_dir, read_file, write_files
from certs.spiffe import SpiffeId, validate_trust_domain
from meshlet.errors import CertificateError, ConflictError, InputError, NotFoundError

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CHAIN = "cert-chain.pem"
BUNDLE = "bundle.pem"
NEXT_ROOT_CERT = "next-root-cert.pem"
NEXT_ROOT_KEY = "next-root-key.pem"
PREVIOUS_ROOT_CERT = "previous-root-cert.pem"
ALL_FILES = (
    ROOT_CERT,
    ROOT_KEY,
    CA_CERT,
    CA_KEY,
    CHAIN,
    BUNDLE,
    NEXT_ROOT_CERT,
    NEXT_ROOT_KEY,
    PREVIOUS_ROOT_CERT,
)


class Step(StrEnum):
    ADD = "add"
    PROMOTE = "promote"
    RETIRE = "retire"


@dataclass(frozen=True, slots=True, kw_only=True)
class CaState:
    path: Path
    trust_domain: str
    root: x509.Certificate
    root_key: pki.PrivateKey | None  # None when the root key is kept offline
    issuer: x509.Certificate
    issuer_key: pki.PrivateKey
    bundle: tuple[x509.Certificate, ...]
    next_root: x509.Certificate | None = None
    next_root_key: pki.PrivateKey | None = None
    previous_root: x509.Certificate | None = None

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.issuer, self.root)

    @property
    def next_step(self) -> Step:
        if self.next_root is not None:
            return Step.PROMOTE
        if self.previous_root is not None:
            return Step.RETIRE
        return Step.ADD

    def require_root_key(self) -> pki.PrivateKey:
        if self.root_key is None:
            raise InputError(
                f"{self.path / ROOT_KEY} is missing: this step signs with the root key; "
                "put the root key back in the CA directory and run it again"
            )
        return self.root_key


@dataclass(frozen=True, slots=True)
class Change:
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


def apply(path: Path, change: Change) -> None:
    write_files(path, change.files, remove=change.remove)


def _cert_file(certs: Sequence[x509.Certificate]) -> tuple[bytes, int]:
    return pki.dump_certs(certs), PUBLIC


def _key_file(key: pki.PrivateKey) -> tuple[bytes, int]:
    return pki.dump_key(key), SECRET


def _issuer_files(
    state_root: x509.Certificate, root_key: pki.PrivateKey, now: dt.datetime, ttl: dt.timedelta
) -> dict[str, tuple[bytes, int]]:
    key = pki.new_key()
    issuer = pki.build_issuer(key, root=state_root, root_key=root_key, now=now, ttl=ttl)
    return {
        CA_CERT: _cert_file([issuer]),
        CA_KEY: _key_file(key),
        CHAIN: _cert_file([issuer, state_root]),
    }


# ---- planning (pure) -------------------------------------------------------------------


def plan_init(
    trust_domain: str, now: dt.datetime, *, root_ttl: dt.timedelta, issuer_ttl: dt.timedelta
) -> Change:
    validate_trust_domain(trust_domain)
    if issuer_ttl > root_ttl:
        raise InputError("--issuer-ttl must not be longer than --root-ttl")
    root_key = pki.new_key()
    root = pki.build_root(root_key, trust_domain=trust_domain, now=now, ttl=root_ttl)
    files = {
        ROOT_CERT: _cert_file([root]),
        ROOT_KEY: _key_file(root_key),
        BUNDLE: _cert_file([root]),
        **_issuer_files(root, root_key, now, issuer_ttl),
    }
    return Change(files, remove=(NEXT_ROOT_CERT, NEXT_ROOT_KEY, PREVIOUS_ROOT_CERT))


def plan_rotate_issuer(state: CaState, now: dt.datetime, ttl: dt.timedelta) -> Change:
    return Change(_issuer_files(state.root, state.require_root_key(), now, ttl))


def plan_root_step(
    state: CaState,
    step: Step,
    now: dt.datetime,
    *,
    root_ttl: dt.timedelta = pki.ROOT_TTL,
    issuer_ttl: dt.timedelta = pki.ISSUER_TTL,
    still_in_use: Sequence[tuple[str, Sequence[x509.Certificate]]] = (),
) -> Change:
    if step is not state.next_step:
        raise ConflictError(
            f"cannot {step.value} now: the next root rotation step in {state.path} is "
            f"{state.next_step.value!r} (see `meshlet certs rotate root --status`)"
        )
    if step is Step.ADD:
        key = pki.new_key()
        new_root = pki.build_root(key, trust_domain=state.trust_domain, now=now, ttl=root_ttl)
        return Change(
            {
                NEXT_ROOT_CERT: _cert_file([new_root]),
                NEXT_ROOT_KEY: _key_file(key),
                BUNDLE: _cert_file([*state.bundle, new_root]),
            }
        )
    if step is Step.PROMOTE:
        assert state.next_root is not None and state.next_root_key is not None
        return Change(
            {
                ROOT_CERT: _cert_file([state.next_root]),
                ROOT_KEY: _key_file(state.next_root_key),
                PREVIOUS_ROOT_CERT: _cert_file([state.root]),
                **_issuer_files(state.next_root, state.next_root_key, now, issuer_ttl),
            },
            remove=(NEXT_ROOT_CERT, NEXT_ROOT_KEY),
        )
    assert state.previous_root is not None
    old = state.previous_root
    remaining = tuple(c for c in state.bundle if c != old)
    for name, chain in still_in_use:
        refusal = retire_blocker(chain, old, remaining, state.issuer)
        if refusal:
            raise ConflictError(f"refusing to retire the old root: {name} {refusal}")
    return Change({BUNDLE: _cert_file(remaining)}, remove=(PREVIOUS_ROOT_CERT,))


def retire_blocker(
    chain: Sequence[x509.Certificate],
    old: x509.Certificate,
    remaining: Sequence[x509.Certificate],
    issuer: x509.Certificate,
) -> str | None:
    """Why ``chain`` (leaf first) may break without ``old``, or None when it cannot.

    A file with the leaf alone is tried with the current ``issuer`` too; when it still
    leads to no root, nobody can tell whether it needs the old one, and that blocks too.
    """
    candidates = [list(chain), [*chain, issuer]]
    if any(pki.anchor_of(c, remaining) for c in candidates):
        return None
    if any(pki.anchor_of(c, [old]) for c in candidates):
        return (
            "chains only to the old root; re-issue it (`meshlet certs renew`) and run retire again"
        )
    return (
        "leads to no root in the bundle, so it cannot be told whether it needs the old root: "
        "pass the file with its chain (leaf + issuer), or leave it out if it is not in use"
    )


# ---- the shell: loading and writing ------------------------------------------------------


def _load_one_cert(path: Path, what: str) -> x509.Certificate:
    certs = pki.load_certs(read_file(path, what=what), source=str(path))
    return certs[0]


def _load_optional_key(path: Path, what: str) -> pki.PrivateKey | None:
    if not path.exists():
        return None
    return pki.load_key(read_file(path, what=what), source=str(path))


def load(path: Path) -> CaState:
    """Load and check a CA directory; every problem names the file and what to do."""
    if not path.exists():
        raise NotFoundError(
            f"CA directory {path} does not exist: create it with "
            f"`meshlet certs init --dir {path} --trust-domain TD`"
        )
    if not path.is_dir():
        raise InputError(f"{path} is not a directory: --dir takes the CA directory")
    for name in (ROOT_CERT, CA_CERT, CA_KEY, BUNDLE):
        if not (path / name).exists():
            raise NotFoundError(
                f"{path / name} is missing: {path} is not a complete meshlet CA directory "
                f"(create one with `meshlet certs init --dir {path} --trust-domain TD`)"
            )
    root = _load_one_cert(path / ROOT_CERT, "root certificate")
    issuer = _load_one_cert(path / CA_CERT, "issuer certificate")
    issuer_key = pki.load_key(
        read_file(path / CA_KEY, what="issuer key"), source=str(path / CA_KEY)
    )
    if not pki.key_matches(issuer, issuer_key):
        raise CertificateError(f"{path / CA_KEY} does not belong to {path / CA_CERT}")
    root_key = _load_optional_key(path / ROOT_KEY, "root key")
    if root_key is not None and not pki.key_matches(root, root_key):
        raise CertificateError(f"{path / ROOT_KEY} does not belong to {path / ROOT_CERT}")
    bundle = tuple(
        pki.load_certs(read_file(path / BUNDLE, what="trust bundle"), source=str(path / BUNDLE))
    )
    next_root = None
    if (path / NEXT_ROOT_CERT).exists():
        next_root = _load_one_cert(path / NEXT_ROOT_CERT, "next root certificate")
    next_root_key = _load_optional_key(path / NEXT_ROOT_KEY, "next root key")
    if (next_root is None) != (next_root_key is None):
        raise CertificateError(
            f"{path} has only one of {NEXT_ROOT_CERT} and {NEXT_ROOT_KEY}: restore the other, "
            "or remove both to abandon the rotation"
        )
    previous_root = None
    if (path / PREVIOUS_ROOT_CERT).exists():
        previous_root = _load_one_cert(path / PREVIOUS_ROOT_CERT, "previous root certificate")
    if root not in bundle:
        raise CertificateError(
            f"{path / BUNDLE} does not contain the active root {path / ROOT_CERT}"
        )
    return CaState(
        path=path,
        trust_domain=pki.trust_domain_of(issuer),
        root=root,
        root_key=root_key,
        issuer=issuer,
        issuer_key=issuer_key,
        bundle=bundle,
        next_root=next_root,
        next_root_key=next_root_key,
        previous_root=previous_root,
    )


def init(
    path: Path,
    trust_domain: str,
    now: dt.datetime,
    *,
    force: bool = False,
    root_ttl: dt.timedelta = pki.ROOT_TTL,
    issuer_ttl: dt.timedelta = pki.ISSUER_TTL,
) -> CaState:
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory: choose another --dir")
    existing = [n for n in (ROOT_CERT, CA_CERT, CA_KEY) if (path / n).exists()]
    if existing and not force:
        raise ConflictError(
            f"{path} already holds a CA ({', '.join(existing)}): refusing to overwrite it; "
            "pass --force to replace it (every certificate it issued stops verifying)"
        )
    change = plan_init(trust_domain, now, root_ttl=root_ttl, issuer_ttl=issuer_ttl)
    ensure_private_dir(path)
    apply(path, change)
    return load(path)


def issue(
    state: CaState,
    spiffe_id: SpiffeId,
    now: dt.datetime,
    *,
    ttl: dt.timedelta = pki.LEAF_TTL,
    key: pki.PrivateKey | None = None,
) -> tuple[list[x509.Certificate], pki.PrivateKey, bool]:
    """A leaf for ``spiffe_id``: (leaf + issuer chain, key, whether the lifetime was capped)."""
    key = key or pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(),
        spiffe_id=spiffe_id,
        issuer=state.issuer,
        issuer_key=state.issuer_key,
        now=now,
        ttl=ttl,
    )
    return [leaf.cert, state.issuer], key, leaf.capped
