"""Peer verification (certs/verify.py): every reason a peer is refused comes from a real
certificate built for it, and the verdict names the reason a sidecar would log."""

from __future__ import annotations

import datetime as dt

import pytest
from certs_helpers import NOW, ORDERS, TD, WEB, Ca, make_ca, odd_leaf

from certs.spiffe import parse
from certs.verify import Expectation, Reason, check_identity, verify_svid

ANY_IN_TD = Expectation(trust_domain=TD)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return make_ca()


def verify(chain, roots, *, expect=ANY_IN_TD, now=NOW):
    return verify_svid(chain, roots, now=now, expect=expect)


def test_a_good_svid_is_accepted_with_its_identity(ca: Ca):
    verdict = verify([ca.leaf(), ca.issuer], [ca.root])
    assert verdict.ok
    assert verdict.reason is Reason.OK
    assert verdict.spiffe_id == ORDERS
    assert str(verdict) == "ok"


def test_a_good_svid_is_accepted_with_the_root_in_the_chain_too(ca: Ca):
    assert verify([ca.leaf(), ca.issuer, ca.root], [ca.root]).ok


def test_no_certificate(ca: Ca):
    verdict = verify([], [ca.root])
    assert verdict.reason is Reason.NO_CERTIFICATE
    assert not verdict.ok
    assert str(verdict) == "no_certificate: the peer presented no certificate"


def test_a_leaf_that_is_a_ca_is_refused(ca: Ca):
    leaf = odd_leaf(ca.issuer, ca.issuer_key, ca=True)
    verdict = verify([leaf, ca.issuer], [ca.root])
    assert verdict.reason is Reason.LEAF_IS_CA
    assert check_identity(leaf, ANY_IN_TD).reason is Reason.LEAF_IS_CA


def test_the_issuer_presented_as_a_leaf_is_refused(ca: Ca):
    assert verify([ca.issuer], [ca.root]).reason is Reason.LEAF_IS_CA


@pytest.mark.parametrize(
    ("uris", "count"),
    [((), 0), ((str(ORDERS), str(WEB)), 2), ((str(ORDERS), "https://orders.example"), 2)],
)
def test_a_leaf_without_exactly_one_uri_san_is_refused(ca: Ca, uris, count):
    leaf = odd_leaf(ca.issuer, ca.issuer_key, uris=uris)
    verdict = verify([leaf, ca.issuer], [ca.root])
    assert verdict.reason is Reason.URI_SAN_COUNT
    assert f"this one has {count}" in verdict.detail
    assert check_identity(leaf, ANY_IN_TD).reason is Reason.URI_SAN_COUNT


def test_an_expired_leaf_is_refused(ca: Ca):
    leaf = ca.leaf(ttl=dt.timedelta(hours=1))
    later = NOW + dt.timedelta(hours=1, seconds=1)
    verdict = verify([leaf, ca.issuer], [ca.root], now=later)
    assert verdict.reason is Reason.EXPIRED
    assert verdict.detail == "leaf expired at 2030-01-01T13:00:00Z"
    # one second earlier it was still good
    assert verify([leaf, ca.issuer], [ca.root], now=later - dt.timedelta(seconds=2)).ok


def test_a_leaf_that_is_not_valid_yet_is_refused(ca: Ca):
    leaf = ca.leaf(now=NOW + dt.timedelta(hours=2))
    verdict = verify([leaf, ca.issuer], [ca.root], now=NOW + dt.timedelta(hours=1))
    assert verdict.reason is Reason.NOT_YET_VALID
    assert verdict.detail.startswith("leaf is valid from 2030-01-01T13:59:00Z")


def test_an_expired_intermediate_is_refused_even_when_the_leaf_is_valid():
    ca = make_ca(issuer_ttl=dt.timedelta(hours=1))
    # pki caps leaves at the issuer's expiry, so build one that outlives it on purpose
    leaf = odd_leaf(ca.issuer, ca.issuer_key, not_after=NOW + dt.timedelta(days=2))
    at = NOW + dt.timedelta(hours=2)
    verdict = verify([leaf, ca.issuer], [ca.root], now=at)
    assert verdict.reason is Reason.EXPIRED
    assert verdict.detail.startswith("chain certificate 1 expired at 2030-01-01T13:00:00Z")
    assert verify([leaf, ca.issuer], [ca.root], now=NOW).ok


def test_a_leaf_from_another_ca_is_refused(ca: Ca):
    other = make_ca()  # same trust domain, different keys
    leaf = other.leaf()
    verdict = verify([leaf, other.issuer], [ca.root])
    assert verdict.reason is Reason.UNKNOWN_CA
    assert "does not lead to a trusted root" in verdict.detail
    assert verify([leaf, other.issuer], [ca.root, other.root]).ok


def test_a_leaf_without_its_intermediate_is_refused(ca: Ca):
    assert verify([ca.leaf()], [ca.root]).reason is Reason.UNKNOWN_CA


def test_an_intermediate_from_another_ca_is_refused(ca: Ca):
    other = make_ca()
    assert verify([ca.leaf(), other.issuer], [ca.root]).reason is Reason.UNKNOWN_CA


def test_an_empty_bundle_trusts_nobody(ca: Ca):
    verdict = verify([ca.leaf(), ca.issuer], [])
    assert verdict.reason is Reason.UNKNOWN_CA
    assert verdict.detail == "the trust bundle is empty"


def test_a_leaf_in_another_trust_domain_is_refused(ca: Ca):
    foreign = "spiffe://other.test/ns/shop/sa/orders"
    leaf = odd_leaf(ca.issuer, ca.issuer_key, uris=[foreign])
    verdict = verify([leaf, ca.issuer], [ca.root])
    assert verdict.reason is Reason.WRONG_TRUST_DOMAIN
    assert verdict.spiffe_id == parse(foreign)
    assert verdict.detail == f"{foreign} is not in trust domain '{TD}'"


def test_a_foreign_trust_domain_is_refused_even_from_its_own_trusted_ca(ca: Ca):
    other = make_ca("other.test")
    leaf = other.leaf("spiffe://other.test/ns/shop/sa/orders")
    verdict = verify([leaf, other.issuer], [ca.root, other.root])
    assert verdict.reason is Reason.WRONG_TRUST_DOMAIN


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        (f"spiffe://{TD}/ns/shop//orders", "empty path segment"),
        (f"spiffe://{TD}/ns/shop/sa/orders/", "empty path segment"),
        (f"spiffe://{TD}/ns/../sa/orders", "'..' path segment"),
        (f"spiffe://{TD}", "has no path"),
        (f"spiffe://{TD}:443/ns/a", "port"),
        ("SPIFFE://mesh.test/ns/a", "scheme must be lowercase"),
        ("https://orders.mesh.test/", "must start with 'spiffe://'"),
        ("spiffe://Mesh.Test/ns/a", "has characters SPIFFE does not allow"),
    ],
)
def test_a_bad_spiffe_id_in_the_san_is_refused(ca: Ca, uri: str, why: str):
    leaf = odd_leaf(ca.issuer, ca.issuer_key, uris=[uri])
    verdict = verify([leaf, ca.issuer], [ca.root])
    assert verdict.reason is Reason.BAD_SPIFFE_ID
    assert why in verdict.detail
    assert verdict.spiffe_id is None


def test_exactly_accepts_that_identity_and_no_other(ca: Ca):
    chain = [ca.leaf(str(ORDERS)), ca.issuer]
    assert verify(chain, [ca.root], expect=Expectation.exactly(ORDERS)).ok
    verdict = verify(chain, [ca.root], expect=Expectation.exactly(WEB))
    assert verdict.reason is Reason.WRONG_IDENTITY
    assert verdict.spiffe_id == ORDERS
    assert verdict.detail == f"{ORDERS} is not {WEB}"


def test_any_of_accepts_a_listed_identity_only(ca: Ca):
    chain = [ca.leaf(str(ORDERS)), ca.issuer]
    admin = parse(f"spiffe://{TD}/ns/ops/sa/admin")
    assert verify(chain, [ca.root], expect=Expectation.any_of(TD, [WEB, ORDERS])).ok
    verdict = verify(chain, [ca.root], expect=Expectation.any_of(TD, [WEB, admin]))
    assert verdict.reason is Reason.WRONG_IDENTITY
    assert str(WEB) in verdict.detail and str(admin) in verdict.detail
    nobody = verify(chain, [ca.root], expect=Expectation.any_of(TD, []))
    assert nobody.reason is Reason.WRONG_IDENTITY
    assert nobody.detail.endswith("is not nobody")


def test_check_identity_alone_checks_only_the_identity(ca: Ca):
    # check_identity is used after TLS verified the chain: no chain or time checks here
    expired = ca.leaf(now=NOW - dt.timedelta(days=30))
    verdict = check_identity(expired, Expectation.exactly(ORDERS))
    assert verdict.ok and verdict.spiffe_id == ORDERS
    assert check_identity(expired, Expectation.exactly(WEB)).reason is Reason.WRONG_IDENTITY
    bad = odd_leaf(ca.issuer, ca.issuer_key, uris=[f"spiffe://{TD}/a/./b"])
    assert check_identity(bad, ANY_IN_TD).reason is Reason.BAD_SPIFFE_ID
