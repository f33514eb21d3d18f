"""The certificate authority's rules, pure: who may get which SPIFFE ID, what a CSR may ask
for, how long a leaf lives, and when the control plane's own certificate must be re-issued.

``control_plane.ca`` (the shell) hands in the CA state, the time and the presented
credentials; these functions answer or raise. They never read files, the clock or the
network. The only key they make is the control plane's own (``build_server_cert``); a
workload's key never reaches the control plane at all.

Refusals, by the gRPC status they become:
  AuthenticationError   UNAUTHENTICATED    no credential, or a bad one
  PermissionDeniedError PERMISSION_DENIED  a good credential that does not allow the ID
  InputError            INVALID_ARGUMENT   a bad CSR, SPIFFE ID or ttl
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certs import pki
from certs.cadir import CaState
from certs.spiffe import SpiffeId, SpiffeIdError, parse
from certs.verify import Expectation, verify_svid
from meshlet.errors import CertificateError, InputError, MeshError

SYSTEM_NAMESPACE = "meshlet-system"  # the mesh's own components; never for a join token
CONTROL_PLANE_SA = "control-plane"
SERVER_DNS_NAME = "control-plane.meshlet"  # clients set grpc.ssl_target_name_override to it
DEFAULT_TTL = pki.LEAF_TTL
MAX_TTL = dt.timedelta(days=7)
MIN_TTL = dt.timedelta(minutes=1)


class AuthenticationError(MeshError):
    """No credential was presented, or the one presented is not valid."""


class PermissionDeniedError(MeshError):
    """The credential is valid but does not allow what was asked."""


@dataclass(frozen=True, slots=True)
class JoinTokenCredential:
    """The control plane's join token: any workload ID outside ``meshlet-system``."""


@dataclass(frozen=True, slots=True)
class SvidCredential:
    """A current SVID presented over mTLS: exactly its own ID (renewal)."""

    spiffe_id: SpiffeId


Credential = JoinTokenCredential | SvidCredential


def control_plane_id(trust_domain: str) -> SpiffeId:
    return SpiffeId.for_workload(trust_domain, SYSTEM_NAMESPACE, CONTROL_PLANE_SA)


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token matches nothing."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def authenticate(
    *,
    join_token: str,
    expected_token: str,
    peer_chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    trust_domain: str,
    now: dt.datetime,
) -> tuple[Credential, ...]:
    """Every credential presented, each checked; any bad one refuses the whole request."""
    credentials: list[Credential] = []
    if join_token:
        if not token_matches(join_token, expected_token):
            raise AuthenticationError(
                "the join token is not valid for this control plane: use the token in its "
                "data directory (DATA_DIR/join-token)"
            )
        credentials.append(JoinTokenCredential())
    if peer_chain:
        verdict = verify_svid(
            peer_chain, roots, now=now, expect=Expectation(trust_domain=trust_domain)
        )
        if not verdict.ok or verdict.spiffe_id is None:
            raise AuthenticationError(
                f"the client certificate was refused ({verdict}): renew before it expires, "
                "or start over with the join token"
            )
        credentials.append(SvidCredential(verdict.spiffe_id))
    if not credentials:
        raise AuthenticationError(
            "no credential: send the join token for a first certificate, or connect to the "
            "control plane's mTLS port with your current certificate to renew it"
        )
    return tuple(credentials)


def parse_requested_id(text: str) -> SpiffeId:
    if not text:
        raise InputError("spiffe_id is empty: ask for spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/NAME")
    try:
        return parse(text, require_path=True)
    except SpiffeIdError as e:
        raise InputError(f"spiffe_id: {e}") from None


def _token_refusal(requested: SpiffeId) -> str | None:
    workload = requested.workload()
    if workload is None:
        return (
            f"the join token allows only workload IDs spiffe://{requested.trust_domain}"
            f"/ns/NAMESPACE/sa/NAME, not {requested}"
        )
    if workload[0] == SYSTEM_NAMESPACE:
        return (
            f"the join token cannot get {requested}: namespace {SYSTEM_NAMESPACE} is reserved "
            "for the mesh's own components"
        )
    return None


def authorize(credentials: Iterable[Credential], requested: SpiffeId, trust_domain: str) -> None:
    """Allowed when any presented credential allows ``requested``; else PermissionDeniedError."""
    if requested.trust_domain != trust_domain:
        raise PermissionDeniedError(
            f"{requested} is outside the trust domain {trust_domain!r}: this control plane "
            f"signs only spiffe://{trust_domain}/... IDs"
        )
    refusals: list[str] = []
    for cred in credentials:
        if isinstance(cred, JoinTokenCredential):
            refusal = _token_refusal(requested)
        elif cred.spiffe_id == requested:
            refusal = None
        else:
            refusal = f"the certificate of {cred.spiffe_id} may renew only itself, not {requested}"
        if refusal is None:
            return
        refusals.append(refusal)
    raise PermissionDeniedError("; ".join(refusals) or f"nothing allows {requested}")


def leaf_ttl(
    ttl_seconds: int, *, default: dt.timedelta = DEFAULT_TTL, maximum: dt.timedelta = MAX_TTL
) -> dt.timedelta:
    """0 means ``default``; otherwise between MIN_TTL and ``maximum``."""
    if ttl_seconds == 0:
        return default
    ttl = dt.timedelta(seconds=ttl_seconds)
    if ttl_seconds < 0 or ttl < MIN_TTL or ttl > maximum:
        raise InputError(
            f"ttl_seconds {ttl_seconds} is out of range: use 0 for the default "
            f"({int(default.total_seconds())}), or {int(MIN_TTL.total_seconds())}-"
            f"{int(maximum.total_seconds())}"
        )
    return ttl


def check_csr(csr_pem: bytes, requested: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR signed by its own ECDSA P-256 key whose only SAN, if any, is ``requested``."""
    if not csr_pem:
        raise InputError("csr_pem is empty: send a PEM certificate signing request")
    try:
        csr = pki.load_csr(csr_pem, source="csr_pem")
    except CertificateError as e:
        raise InputError(str(e)) from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InputError("csr_pem: the CSR's key must be ECDSA P-256, which meshlet requires")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return csr
    except ValueError as e:  # a malformed extension
        raise InputError(f"csr_pem: unreadable extension ({e})") from None
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        raise InputError(
            f"csr_pem asks for {', '.join(str(n.value) for n in others)}: workload "
            "certificates carry only their SPIFFE ID (no DNS names, IP addresses or e-mail)"
        )
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris and uris != [str(requested)]:
        raise InputError(
            f"csr_pem names {', '.join(uris)} but spiffe_id is {requested}: they must agree"
        )
    return csr


# ---- the control plane's own certificate ----------------------------------------------------


def build_server_cert(
    state: CaState, now: dt.datetime, ttl: dt.timedelta = DEFAULT_TTL
) -> tuple[tuple[x509.Certificate, ...], pki.PrivateKey]:
    """A new key and SVID for the control plane, with the DNS name its clients check."""
    key = pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(),
        spiffe_id=control_plane_id(state.trust_domain),
        issuer=state.issuer,
        issuer_key=state.issuer_key,
        now=now,
        ttl=ttl,
        dns_names=(SERVER_DNS_NAME,),
    )
    return (leaf.cert, state.issuer), key


def server_cert_problem(
    chain: Sequence[x509.Certificate], key: pki.PrivateKey, state: CaState, now: dt.datetime
) -> str | None:
    """Why the control plane's certificate must be re-issued, or None when it may serve."""
    if len(chain) < 2:
        return "the chain lacks its issuer"
    leaf = chain[0]
    if not pki.key_matches(leaf, key):
        return "the key does not belong to the certificate"
    if chain[1] != state.issuer:
        return "it was not signed by the current issuer"
    if SERVER_DNS_NAME not in _dns_names(leaf):
        return f"it lacks the DNS name {SERVER_DNS_NAME}"
    verdict = verify_svid(
        chain,
        state.bundle,
        now=now,
        expect=Expectation.exactly(control_plane_id(state.trust_domain)),
    )
    return None if verdict.ok else str(verdict)


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)
