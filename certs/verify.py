"""Verify a peer's SVID chain against a trust bundle and an expected identity.

Pure: ``now`` is handed in. Returns a ``Verdict`` with a machine-readable reason; it
never raises for a bad peer certificate (a bad peer is an answer, not an error). The
sidecar uses ``verify_svid`` for a chain and ``check_identity`` when TLS already
verified the chain.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509 import verification

from certs.pki import is_ca, uri_sans
from certs.spiffe import SpiffeId, SpiffeIdError, parse


class Reason(StrEnum):
    OK = "ok"
    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    LEAF_IS_CA = "leaf_is_ca"
    URI_SAN_COUNT = "uri_san_count"
    BAD_SPIFFE_ID = "bad_spiffe_id"
    WRONG_TRUST_DOMAIN = "wrong_trust_domain"
    WRONG_IDENTITY = "wrong_identity"


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: Reason
    detail: str = ""
    spiffe_id: SpiffeId | None = None

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True, slots=True)
class Expectation:
    """Who the peer must be: any ID of ``trust_domain``, or one of ``allowed`` when given."""

    trust_domain: str
    allowed: frozenset[SpiffeId] | None = None

    @classmethod
    def exactly(cls, spiffe_id: SpiffeId) -> Expectation:
        return cls(trust_domain=spiffe_id.trust_domain, allowed=frozenset([spiffe_id]))

    @classmethod
    def any_of(cls, trust_domain: str, ids: Collection[SpiffeId]) -> Expectation:
        return cls(trust_domain=trust_domain, allowed=frozenset(ids))


def _check_time(chain: Sequence[x509.Certificate], now: dt.datetime) -> Verdict | None:
    for position, cert in enumerate(chain):
        what = "leaf" if position == 0 else f"chain certificate {position}"
        if now > cert.not_valid_after_utc:
            return Verdict(
                Reason.EXPIRED, f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
        if now < cert.not_valid_before_utc:
            return Verdict(
                Reason.NOT_YET_VALID,
                f"{what} is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
            )
    return None


def check_identity(leaf: x509.Certificate, expect: Expectation) -> Verdict:
    """The SPIFFE checks on a leaf whose chain is already trusted."""
    if is_ca(leaf):
        return Verdict(Reason.LEAF_IS_CA, "the peer's leaf certificate is a CA certificate")
    uris = uri_sans(leaf)
    if len(uris) != 1:
        return Verdict(
            Reason.URI_SAN_COUNT, f"an SVID has exactly one URI SAN, this one has {len(uris)}"
        )
    try:
        sid = parse(uris[0], require_path=True)
    except SpiffeIdError as e:
        return Verdict(Reason.BAD_SPIFFE_ID, str(e))
    if sid.trust_domain != expect.trust_domain:
        return Verdict(
            Reason.WRONG_TRUST_DOMAIN,
            f"{sid} is not in trust domain {expect.trust_domain!r}",
            sid,
        )
    if expect.allowed is not None and sid not in expect.allowed:
        wanted = ", ".join(sorted(str(s) for s in expect.allowed)) or "nobody"
        return Verdict(Reason.WRONG_IDENTITY, f"{sid} is not {wanted}", sid)
    return Verdict(Reason.OK, "", sid)


def verify_svid(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: dt.datetime,
    expect: Expectation,
) -> Verdict:
    """Verify ``chain`` (leaf first, then intermediates) against ``roots`` and ``expect``."""
    if not chain:
        return Verdict(Reason.NO_CERTIFICATE, "the peer presented no certificate")
    leaf, intermediates = chain[0], list(chain[1:])
    if is_ca(leaf):
        return Verdict(Reason.LEAF_IS_CA, "the peer's leaf certificate is a CA certificate")
    uris = uri_sans(leaf)
    if len(uris) != 1:
        return Verdict(
            Reason.URI_SAN_COUNT, f"an SVID has exactly one URI SAN, this one has {len(uris)}"
        )
    if (bad_time := _check_time(chain, now)) is not None:
        return bad_time
    if not roots:
        return Verdict(Reason.UNKNOWN_CA, "the trust bundle is empty")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(now)
        .max_chain_depth(4)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as e:
        return Verdict(Reason.UNKNOWN_CA, f"the chain does not lead to a trusted root ({e})")
    return check_identity(leaf, expect)
