"""The CA's pure rules: who may get which SPIFFE ID, what a CSR may ask for, ttl bounds, and
what GET /v1/ca says about each client. No files, no sockets, no loop."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from certs_helpers import NOW, TD, Ca, make_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import cadir, pki
from certs.bundle import bundle_fingerprint, bundle_fingerprint_pem
from certs.spiffe import parse
from control_plane import ca_report
from control_plane import ca_rules as rules
from meshlet.errors import InputError

WEB = parse(f"spiffe://{TD}/ns/shop/sa/web")
ORDERS = parse(f"spiffe://{TD}/ns/shop/sa/orders")
TOKEN = "s3cret-join-token"


def state_of(ca: Ca, *, extra_roots: tuple[x509.Certificate, ...] = ()) -> cadir.CaState:
    return cadir.CaState(
        path=Path("ca"),
        trust_domain=TD,
        root=ca.root,
        root_key=ca.root_key,
        issuer=ca.issuer,
        issuer_key=ca.issuer_key,
        bundle=(ca.root, *extra_roots),
    )


def csr_pem(
    sans: x509.SubjectAlternativeName | None, key: ec.EllipticCurvePrivateKey | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        builder = builder.add_extension(sans, critical=True)
    return builder.sign(key or pki.new_key(), hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM
    )


def san(*names: x509.GeneralName) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(list(names))


def uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


# ---- authorization ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested",
    [
        f"spiffe://{TD}/ns/shop/sa/web",
        f"spiffe://{TD}/ns/default/sa/a.b_c-d",
    ],
)
def test_join_token_allows_any_workload_id(requested: str) -> None:
    rules.authorize([rules.JoinTokenCredential()], parse(requested), TD)


@pytest.mark.parametrize(
    ("requested", "says"),
    [
        (f"spiffe://{TD}/ns/meshlet-system/sa/control-plane", "reserved"),
        (f"spiffe://{TD}/ns/meshlet-system/sa/node-a", "reserved"),
        (f"spiffe://{TD}/admin", "only workload IDs"),
        (f"spiffe://{TD}/ns/shop/sa/web/extra", "only workload IDs"),
        (f"spiffe://{TD}/ns/shop/svc/web", "only workload IDs"),
        ("spiffe://other.test/ns/shop/sa/web", "outside the trust domain"),
    ],
)
def test_join_token_refuses_system_foreign_and_odd_ids(requested: str, says: str) -> None:
    with pytest.raises(rules.PermissionDeniedError, match=says):
        rules.authorize([rules.JoinTokenCredential()], parse(requested), TD)


def test_svid_allows_exactly_its_own_id() -> None:
    cred = rules.SvidCredential(WEB)
    rules.authorize([cred], WEB, TD)
    with pytest.raises(rules.PermissionDeniedError, match="may renew only itself"):
        rules.authorize([cred], ORDERS, TD)


def test_system_svid_may_renew_itself_though_the_token_may_not_get_it() -> None:
    cp = rules.control_plane_id(TD)
    rules.authorize([rules.SvidCredential(cp)], cp, TD)


def test_any_presented_credential_may_allow() -> None:
    rules.authorize([rules.SvidCredential(WEB), rules.JoinTokenCredential()], ORDERS, TD)


# ---- authentication ------------------------------------------------------------------------


def test_token_comparison() -> None:
    assert rules.token_matches(TOKEN, TOKEN)
    assert not rules.token_matches(TOKEN + "x", TOKEN)
    assert not rules.token_matches("", TOKEN)
    assert not rules.token_matches("", "")  # no token configured: nothing matches


def authenticate(ca: Ca, *, token: str = "", chain: tuple[x509.Certificate, ...] = ()):  # type: ignore[no-untyped-def]
    return rules.authenticate(
        join_token=token,
        expected_token=TOKEN,
        peer_chain=chain,
        roots=[ca.root],
        trust_domain=TD,
        now=NOW,
    )


def test_authenticate_token_and_svid() -> None:
    ca = make_ca()
    assert authenticate(ca, token=TOKEN) == (rules.JoinTokenCredential(),)
    leaf = ca.leaf(str(WEB))
    assert authenticate(ca, chain=(leaf, ca.issuer)) == (rules.SvidCredential(WEB),)


def test_no_credential_is_unauthenticated() -> None:
    with pytest.raises(rules.AuthenticationError, match="no credential"):
        authenticate(make_ca())


def test_wrong_token_is_unauthenticated_even_with_a_good_svid() -> None:
    ca = make_ca()
    with pytest.raises(rules.AuthenticationError, match="join token is not valid"):
        authenticate(ca, token="guess", chain=(ca.leaf(str(WEB)), ca.issuer))


@pytest.mark.parametrize("problem", ["expired", "other_ca"])
def test_bad_svid_is_unauthenticated(problem: str) -> None:
    ca = make_ca()
    if problem == "expired":
        chain = (ca.leaf(str(WEB), now=NOW - dt.timedelta(days=2)), ca.issuer)
    else:
        other = make_ca()
        chain = (other.leaf(str(WEB)), other.issuer)
    with pytest.raises(rules.AuthenticationError, match="client certificate was refused"):
        authenticate(ca, chain=chain)


# ---- request checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "web", "https://mesh.test/ns/a/sa/b", f"spiffe://{TD}", f"spiffe://{TD}/ns//sa/b"]
)
def test_bad_requested_id_is_invalid_argument(text: str) -> None:
    with pytest.raises(InputError, match="spiffe_id"):
        rules.parse_requested_id(text)


def test_ttl_defaults_and_bounds() -> None:
    assert rules.leaf_ttl(0) == dt.timedelta(hours=24)
    assert rules.leaf_ttl(3600) == dt.timedelta(hours=1)
    assert rules.leaf_ttl(7 * 86400) == dt.timedelta(days=7)
    for bad in (-1, 10, 7 * 86400 + 1):
        with pytest.raises(InputError, match="ttl_seconds"):
            rules.leaf_ttl(bad)


def test_csr_with_its_own_id_or_no_san_is_accepted() -> None:
    assert rules.check_csr(csr_pem(san(uri(str(WEB)))), WEB)
    assert rules.check_csr(csr_pem(None), WEB)


@pytest.mark.parametrize(
    ("pem", "says"),
    [
        (b"", "empty"),
        (b"not a csr", "not a PEM certificate signing request"),
        (lambda: csr_pem(san(uri(str(ORDERS)))), "must agree"),
        (lambda: csr_pem(san(uri(str(WEB)), uri(str(ORDERS)))), "must agree"),
        (lambda: csr_pem(san(uri(str(WEB)), x509.DNSName("web.shop"))), "no DNS names"),
        (lambda: csr_pem(san(x509.DNSName("control-plane.meshlet"))), "no DNS names"),
        (lambda: csr_pem(None, ec.generate_private_key(ec.SECP384R1())), "ECDSA P-256"),
    ],
)
def test_bad_csr_is_invalid_argument(pem: object, says: str) -> None:
    raw = pem() if callable(pem) else pem
    with pytest.raises(InputError, match=says):
        rules.check_csr(raw, WEB)  # type: ignore[arg-type]


def test_tampered_csr_signature_is_refused() -> None:
    good = x509.load_pem_x509_csr(csr_pem(san(uri(str(WEB)))))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # flip a bit of the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InputError, match="signature"):
        rules.check_csr(pem, WEB)


@pytest.mark.parametrize(
    ("client_id", "kind"), [("", "sidecar"), ("a b", "sidecar"), ("x" * 129, "node"), ("ok", "pod")]
)
def test_client_identity_checks(client_id: str, kind: str) -> None:
    with pytest.raises(InputError):
        ca_report.check_client(client_id, kind)


# ---- the control plane's certificate -----------------------------------------------------


def test_server_cert_problem() -> None:
    ca = make_ca()
    state = state_of(ca)
    key = pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(),
        spiffe_id=rules.control_plane_id(TD),
        issuer=ca.issuer,
        issuer_key=ca.issuer_key,
        now=NOW,
        dns_names=(rules.SERVER_DNS_NAME,),
    ).cert
    assert rules.server_cert_problem((leaf, ca.issuer), key, state, NOW) is None
    assert "key" in (rules.server_cert_problem((leaf, ca.issuer), pki.new_key(), state, NOW) or "")
    later = NOW + dt.timedelta(days=2)
    assert "expired" in (rules.server_cert_problem((leaf, ca.issuer), key, state, later) or "")
    other = make_ca()
    assert "current issuer" in (
        rules.server_cert_problem((leaf, ca.issuer), key, state_of(other), NOW) or ""
    )


# ---- the report ----------------------------------------------------------------------------


def test_bundle_fingerprint_ignores_order_and_duplicates() -> None:
    a, b = make_ca().root, make_ca().root
    assert bundle_fingerprint([a, b]) == bundle_fingerprint([b, a, b])
    assert bundle_fingerprint([a]) != bundle_fingerprint([a, b])
    assert bundle_fingerprint_pem(pki.dump_certs([b, a])) == bundle_fingerprint([a, b])


def test_report_says_which_bundle_and_root_each_client_runs() -> None:
    old = make_ca()
    new = make_ca()
    state = dataclasses.replace(state_of(old, extra_roots=(new.root,)), next_root=new.root)
    fp = bundle_fingerprint(state.bundle)
    leaf_old = old.leaf(str(WEB))
    leaf_new = new.leaf(str(ORDERS))

    def record(
        client_id: str, bundle: str, chain: tuple[x509.Certificate, ...]
    ) -> ca_report.ClientRecord:
        status = ca_report.with_chain_facts(
            ca_report.ClientStatus(
                client_id=client_id, kind="sidecar", bundle_fingerprint=bundle, leaf_chain=chain
            )
        )
        root = ca_report.root_of(chain, ca_report.known_roots(state)) if chain else None
        return ca_report.ClientRecord(status=status, leaf_root=root, last_seen=NOW, streams=1)

    report = ca_report.ca_report(
        state,
        bundle_fp=fp,
        clients=[
            record("b", bundle_fingerprint([old.root]), (leaf_new, new.issuer)),
            record("a", fp, (leaf_old, old.issuer)),
            record("c", "", ()),
        ],
    )
    assert report["trust_domain"] == TD
    assert [r["role"] for r in report["roots"]] == ["active", "next"]
    assert report["issuer"]["root"] == pki.fingerprint(old.root)
    assert report["bundle_fingerprint"] == fp
    assert report["next_step"] == "promote"
    rows = {c["client_id"]: c for c in report["clients"]}
    assert list(rows) == ["a", "b", "c"]
    assert rows["a"]["bundle_current"] is True
    assert rows["a"]["leaf_under_current_root"] is True
    assert rows["a"]["spiffe_id"] == str(WEB)
    assert rows["a"]["leaf_serial"] == format(leaf_old.serial_number, "x")
    assert rows["b"]["bundle_current"] is False
    assert rows["b"]["leaf_under_current_root"] is False
    assert rows["c"]["leaf_under_current_root"] is None
    assert rows["c"]["connected"] is True


def test_client_book_counts_streams_and_forgets_departed_clients() -> None:
    book = ca_report.ClientBook(retention=dt.timedelta(minutes=10))
    status = ca_report.ClientStatus(client_id="web-1", kind="sidecar")
    book.record(status, leaf_root=None, now=NOW, streams=1)
    book.record(status, leaf_root=None, now=NOW, streams=1)  # a reconnect before the old ended
    book.left("web-1", NOW)
    assert book.records["web-1"].streams == 1
    book.prune(NOW + dt.timedelta(hours=1))
    assert "web-1" in book.records  # still connected: kept however old
    book.left("web-1", NOW + dt.timedelta(minutes=1))
    book.touch("web-1", NOW + dt.timedelta(minutes=2))
    book.prune(NOW + dt.timedelta(minutes=11))
    assert "web-1" in book.records
    book.prune(NOW + dt.timedelta(minutes=13))
    assert "web-1" not in book.records
    book.left("gone", NOW)  # unknown clients are ignored
