"""Who may register, heartbeat, drain and deregister which endpoint over gRPC: the pure rules
of control_plane.registration_rpc. Real certificates, no sockets, no loop."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from certs_helpers import NOW, TD, make_ca, odd_leaf

from certs.spiffe import parse
from control_plane import registration_rpc as rules
from control_plane.ca_rules import AuthenticationError, PermissionDeniedError
from meshlet import wire
from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError
from meshlet.model import Endpoint, Health, Protocol, ServicePort

WEB = parse(f"spiffe://{TD}/ns/shop/sa/web")
ORDERS = parse(f"spiffe://{TD}/ns/shop/sa/orders")


def endpoint(id_: str = "web-1", service: str = "web", port: int = 15006, **kw: object) -> Endpoint:
    return Endpoint(
        id=id_,
        namespace="shop",
        service=service,
        address="127.0.0.1",
        app_port=8080,
        inbound_port=port,
        **kw,  # type: ignore[arg-type]
    )


def registered(*eps: Endpoint) -> dict[str, Endpoint]:
    return {e.id: e for e in eps}


# ---- the caller: a verified SVID ------------------------------------------------------------


def test_a_valid_svid_is_the_caller() -> None:
    ca = make_ca()
    chain = [ca.leaf(str(WEB)), ca.issuer]
    assert rules.caller_id(chain, [ca.root], trust_domain=TD, now=NOW) == WEB


def test_no_certificate_is_unauthenticated_and_points_to_the_mtls_port() -> None:
    with pytest.raises(AuthenticationError, match="mTLS port") as err:
        rules.caller_id([], [make_ca().root], trust_domain=TD, now=NOW)
    assert rules.status_name(err.value) == "UNAUTHENTICATED"


@pytest.mark.parametrize("problem", ["other_ca", "expired", "other_trust_domain"])
def test_a_certificate_that_does_not_verify_is_unauthenticated(problem: str) -> None:
    ca, other = make_ca(), make_ca()
    roots = [ca.root]
    if problem == "other_ca":
        chain = [other.leaf(str(WEB)), other.issuer]
    elif problem == "expired":
        chain = [ca.leaf(str(WEB), now=NOW - dt.timedelta(days=2)), ca.issuer]
    else:
        chain = [odd_leaf(ca.issuer, ca.issuer_key, uris=["spiffe://elsewhere.test/ns/a/sa/b"])]
        chain.append(ca.issuer)
    with pytest.raises(AuthenticationError, match="refused"):
        rules.caller_id(chain, roots, trust_domain=TD, now=NOW)


# ---- Register --------------------------------------------------------------------------------


def test_register_sets_the_identity_to_the_caller() -> None:
    ep = rules.authorize_register(WEB, endpoint(), {})
    assert ep.identity == str(WEB)
    assert dataclasses.replace(ep, identity="") == endpoint()


def test_register_accepts_the_callers_own_identity_spelled_out() -> None:
    ep = rules.authorize_register(WEB, endpoint(identity=str(WEB)), {})
    assert ep.identity == str(WEB)


def test_register_for_another_service_is_denied_naming_both() -> None:
    with pytest.raises(PermissionDeniedError) as err:
        rules.authorize_register(WEB, endpoint("orders-1", service="orders"), {})
    assert str(WEB) in str(err.value) and "shop/orders" in str(err.value)
    assert "shop/web" in str(err.value)
    assert rules.status_name(err.value) == "PERMISSION_DENIED"


def test_register_for_another_namespace_is_denied() -> None:
    other_ns = Endpoint(id="w", namespace="lab", service="web", address="127.0.0.1", app_port=1)
    with pytest.raises(PermissionDeniedError, match="lab/web"):
        rules.authorize_register(WEB, other_ns, {})


def test_register_with_an_explicit_other_identity_is_denied() -> None:
    with pytest.raises(PermissionDeniedError, match=str(ORDERS)):
        rules.authorize_register(WEB, endpoint(identity=str(ORDERS)), {})


def test_a_non_workload_svid_registers_nothing() -> None:
    odd = parse(f"spiffe://{TD}/node/a")
    with pytest.raises(PermissionDeniedError, match="not a workload identity"):
        rules.authorize_register(odd, endpoint(), {})


def test_register_cannot_take_over_an_id_of_another_identity() -> None:
    theirs = endpoint("web-1", identity=f"spiffe://{TD}/ns/shop/sa/intruder")
    with pytest.raises(PermissionDeniedError, match="belongs to"):
        rules.authorize_register(WEB, endpoint("web-1", port=15007), registered(theirs))


def test_re_register_of_an_own_endpoint_is_allowed() -> None:
    mine = rules.authorize_register(WEB, endpoint(), {})
    again = rules.authorize_register(WEB, endpoint(labels={"v": "2"}), registered(mine))
    assert again.labels == {"v": "2"} and again.identity == str(WEB)


def test_an_address_another_endpoint_has_is_already_exists() -> None:
    other = endpoint("orders-1", service="orders", identity=str(ORDERS))
    with pytest.raises(rules.AddressTakenError, match="orders-1") as err:
        rules.authorize_register(WEB, endpoint("web-1"), registered(other))
    assert isinstance(err.value, ConflictError)
    assert rules.status_name(err.value) == "ALREADY_EXISTS"


# ---- decoding --------------------------------------------------------------------------------


def test_decode_round_trips_the_endpoint_and_ports() -> None:
    ep = endpoint(labels={"version": "v1"})
    ports = b'[{"port": 8080, "protocol": "http"}, {"port": 9090}]'
    got, got_ports = rules.decode_registration(wire.encode(ep), ports)
    assert got == ep
    assert got_ports == (
        ServicePort(port=8080, protocol=Protocol.HTTP),
        ServicePort(port=9090),
    )
    assert rules.decode_registration(wire.encode(ep)) == (ep, ())


@pytest.mark.parametrize(
    ("endpoint_json", "ports_json", "named"),
    [
        (b"", b"", "endpoint_json is empty"),
        (b"{nope", b"", "endpoint_json is not valid JSON"),
        (b'{"id": "a"}', b"", "endpoint_json: namespace: required field is missing"),
        (
            b'{"id":"a","namespace":"shop","service":"web","address":"127.0.0.1","app_port":0}',
            b"",
            "app_port 0 is out of range",
        ),
        (
            b'{"id":"a","namespace":"shop","service":"web","address":"127.0.0.1","app_port":1,'
            b'"colour":"red"}',
            b"",
            "colour: unknown field",
        ),
        (wire.encode(endpoint()), b"[{", "service_ports_json is not valid JSON"),
        (wire.encode(endpoint()), b'{"port": 1}', "service_ports_json must be a JSON list"),
        (wire.encode(endpoint()), b'[{"port": 1}, {"port": 70000}]', "service_ports_json.1"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    endpoint_json: bytes, ports_json: bytes, named: str
) -> None:
    with pytest.raises(InputError, match=named) as err:
        rules.decode_registration(endpoint_json, ports_json)
    assert rules.status_name(err.value) == "INVALID_ARGUMENT"


# ---- Heartbeat, SetHealth, Deregister -----------------------------------------------------------


def test_own_endpoint_is_allowed() -> None:
    mine = endpoint(identity=str(WEB))
    assert rules.authorize_endpoint(WEB, "web-1", registered(mine)) == mine


def test_unknown_endpoint_is_not_found_so_the_sidecar_registers_again() -> None:
    with pytest.raises(NotFoundError, match="register it again") as err:
        rules.authorize_endpoint(WEB, "web-9", {})
    assert rules.status_name(err.value) == "NOT_FOUND"


def test_an_endpoint_of_another_identity_is_denied() -> None:
    theirs = endpoint("orders-1", service="orders", identity=str(ORDERS))
    with pytest.raises(PermissionDeniedError, match=str(ORDERS)):
        rules.authorize_endpoint(WEB, "orders-1", registered(theirs))


def test_same_service_but_another_identity_string_is_denied() -> None:
    """Ownership is the identity, not the service name: an admin-set identity is respected."""
    pinned = endpoint(identity=f"spiffe://{TD}/ns/shop/sa/web-canary")
    with pytest.raises(PermissionDeniedError):
        rules.authorize_endpoint(WEB, "web-1", registered(pinned))


def test_empty_id_is_invalid_argument() -> None:
    with pytest.raises(InputError, match="id is empty"):
        rules.authorize_endpoint(WEB, "", {})


def test_health_names() -> None:
    assert rules.parse_health("draining") is Health.DRAINING
    with pytest.raises(InputError, match="healthy, unhealthy, draining"):
        rules.parse_health("sleepy")


def test_other_refusals_are_failed_precondition() -> None:
    assert rules.status_name(ConflictError("the VIP range is full")) == "FAILED_PRECONDITION"
    assert rules.status_name(MeshError("issuer expired")) == "FAILED_PRECONDITION"
