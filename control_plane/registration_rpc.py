"""The Registration gRPC service: a sidecar registers, heartbeats, drains and deregisters its
own endpoint, authenticated by the SVID it presents on the control plane's mTLS port.

The rules are pure functions at the top (values in, an Endpoint or a refusal out); the
servicer below only reads the caller's chain, asks the rules, and executes registry
commands. The caller ``spiffe://TD/ns/NS/sa/NAME`` may touch only endpoints of service
NS/NAME whose identity is exactly that ID; the identity of what it registers is set to
its ID. Refusals and the gRPC status they become (``status_name``):

  AuthenticationError    UNAUTHENTICATED    no SVID (the TLS port) or one that fails to verify
  PermissionDeniedError  PERMISSION_DENIED  another service's or another identity's endpoint
  AddressTakenError      ALREADY_EXISTS     the address:port belongs to another endpoint
  NotFoundError          NOT_FOUND          unknown endpoint (register again) or service
  InputError             INVALID_ARGUMENT   bad JSON or field, named

Heartbeats go to the same ``HealthTracker`` the admin API uses, and the commands it returns
(unhealthy → healthy) are executed. This module must never trust an identity it did not
verify itself, and never lets one workload act on another's endpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import grpc
import orjson
from cryptography import x509

from certs.spiffe import SpiffeId
from certs.verify import Expectation, verify_svid
from control_plane.ca import Authority
from control_plane.ca_rules import AuthenticationError, PermissionDeniedError
from control_plane.core import ControlPlane
from control_plane.discovery_wire import peer_chain
from control_plane.health import HealthTracker
from control_plane.registry import DeregisterEndpoint, RegisterEndpoint, SetEndpointHealth
from meshlet import wire
from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError
from meshlet.model import Endpoint, Health, ServicePort
from meshlet.proto import mesh_pb2, mesh_pb2_grpc
from meshlet.runtime import Clock, SystemClock

log = logging.getLogger(__name__)

SERVICE_NAME = "meshlet.v1.Registration"


# ---- the rules (pure) ---------------------------------------------------------------------------


class AddressTakenError(ConflictError):
    """The endpoint's address:port is already registered under another id."""


def caller_id(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    trust_domain: str,
    now: dt.datetime,
) -> SpiffeId:
    """The caller's verified SPIFFE ID; AuthenticationError without a valid SVID."""
    if not chain:
        raise AuthenticationError(
            "Registration needs your SVID: call the control plane's mTLS port with your "
            "current certificate (the TLS port serves only discovery and the join token)"
        )
    verdict = verify_svid(chain, roots, now=now, expect=Expectation(trust_domain=trust_domain))
    if not verdict.ok or verdict.spiffe_id is None:
        raise AuthenticationError(
            f"the client certificate was refused ({verdict}): renew it, or start over with "
            "the join token"
        )
    return verdict.spiffe_id


def decode_registration(
    endpoint_json: bytes, service_ports_json: bytes = b""
) -> tuple[Endpoint, tuple[ServicePort, ...]]:
    """The endpoint and the ports to create its service with; InputError names the field."""
    if not endpoint_json:
        raise InputError("endpoint_json is empty: send meshlet.wire.encode(Endpoint)")
    endpoint = wire.decode(Endpoint, endpoint_json, what="endpoint_json")
    if not service_ports_json:
        return endpoint, ()
    try:
        data = orjson.loads(service_ports_json)
    except orjson.JSONDecodeError as e:
        raise InputError(f"service_ports_json is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise InputError(
            'service_ports_json must be a JSON list, e.g. [{"port": 8080, "protocol": "http"}]'
        )
    ports = tuple(
        wire.from_data(ServicePort, p, what=f"service_ports_json.{i}") for i, p in enumerate(data)
    )
    return endpoint, ports


def _workload(caller: SpiffeId) -> tuple[str, str]:
    workload = caller.workload()
    if workload is None:
        raise PermissionDeniedError(
            f"{caller} is not a workload identity spiffe://{caller.trust_domain}/ns/NAMESPACE"
            "/sa/NAME: only workloads register endpoints"
        )
    return workload


def authorize_register(
    caller: SpiffeId, endpoint: Endpoint, endpoints: Mapping[str, Endpoint]
) -> Endpoint:
    """``endpoint`` with the caller's identity, if the caller may register it.

    Refused: another service than the caller's own (PermissionDeniedError naming both), an
    explicit other identity, an id registered under another identity, and an address:port
    that another endpoint already has (AddressTakenError).
    """
    namespace, service = _workload(caller)
    if (endpoint.namespace, endpoint.service) != (namespace, service):
        raise PermissionDeniedError(
            f"{caller} may register endpoints of {namespace}/{service} only, not of "
            f"{endpoint.namespace}/{endpoint.service}: run the sidecar with the identity of "
            "the service it fronts"
        )
    if endpoint.identity and endpoint.identity != str(caller):
        raise PermissionDeniedError(
            f"endpoint {endpoint.id!r} names identity {endpoint.identity} but the caller is "
            f"{caller}: leave identity empty, or set it to your own SPIFFE ID"
        )
    _check_owner(caller, endpoints.get(endpoint.id), endpoint.id)
    check_address(endpoint, endpoints)
    return dataclasses.replace(endpoint, identity=str(caller))


def check_address(endpoint: Endpoint, endpoints: Mapping[str, Endpoint]) -> None:
    """AddressTakenError when another endpoint already has ``endpoint``'s address:port."""
    for other in endpoints.values():
        if other.id != endpoint.id and other.target == endpoint.target:
            raise AddressTakenError(
                f"endpoint {endpoint.address}:{endpoint.inbound_port} is already registered "
                f"as {other.id!r} ({other.service_key}): deregister it first or use another "
                "address"
            )


def authorize_endpoint(caller: SpiffeId, id_: str, endpoints: Mapping[str, Endpoint]) -> Endpoint:
    """The registered endpoint ``id_``, if its identity is the caller's (heartbeat, drain, …)."""
    if not id_:
        raise InputError("id is empty: send the id the endpoint was registered with")
    _workload(caller)
    endpoint = endpoints.get(id_)
    if endpoint is None:
        raise NotFoundError(f"endpoint {id_!r} is not registered: register it again")
    _check_owner(caller, endpoint, id_)
    return endpoint


def _check_owner(caller: SpiffeId, existing: Endpoint | None, id_: str) -> None:
    if existing is not None and existing.identity != str(caller):
        raise PermissionDeniedError(
            f"endpoint {id_!r} belongs to {existing.identity or 'no identity'}, not to "
            f"{caller}: a workload may act only on its own endpoints"
        )


def parse_health(text: str) -> Health:
    try:
        return Health(text)
    except ValueError:
        names = ", ".join(h.value for h in Health)
        raise InputError(f"health {text!r} is not one of {names}") from None


def status_name(error: MeshError) -> str:
    """The gRPC status (by name) a refusal becomes."""
    if isinstance(error, AuthenticationError):
        return "UNAUTHENTICATED"
    if isinstance(error, PermissionDeniedError):
        return "PERMISSION_DENIED"
    if isinstance(error, AddressTakenError):
        return "ALREADY_EXISTS"
    if isinstance(error, NotFoundError):
        return "NOT_FOUND"
    if isinstance(error, InputError):
        return "INVALID_ARGUMENT"
    return "FAILED_PRECONDITION"  # e.g. the VIP range is full: an operator's job


# ---- the servicer ----------------------------------------------------------------------------


class RegistrationServicer(mesh_pb2_grpc.RegistrationServicer):
    def __init__(
        self,
        control_plane: ControlPlane,
        authority: Authority,
        tracker: HealthTracker,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._cp = control_plane
        self._authority = authority
        self._tracker = tracker
        self._clock = clock or SystemClock()

    async def Register(
        self, request: mesh_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.RegisterResponse:
        caller: SpiffeId | None = None
        try:
            caller = self._caller(context)
            endpoint, ports = decode_registration(request.endpoint_json, request.service_ports_json)
            endpoint = authorize_register(caller, endpoint, self._cp.state.endpoints)
            created = endpoint.id not in self._cp.state.endpoints
            try:
                revision, _ = await self._cp.execute(
                    RegisterEndpoint(endpoint=endpoint, create_service_ports=ports)
                )
            except ConflictError:
                check_address(endpoint, self._cp.state.endpoints)  # lost a race for the address?
                raise
            revision = await self._beat(endpoint.id, revision)
            stored = self._cp.state.endpoints.get(endpoint.id, endpoint)
        except MeshError as e:
            await self._refuse(context, "register", caller, e)
        log.info(
            "endpoint registered" if created else "endpoint re-registered",
            extra={"id": stored.id, "service": stored.service_key, "identity": stored.identity},
        )
        return mesh_pb2.RegisterResponse(
            endpoint_json=wire.encode(stored), revision=revision, created=created
        )

    async def Heartbeat(
        self, request: mesh_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.HeartbeatResponse:
        caller: SpiffeId | None = None
        try:
            caller = self._caller(context)
            authorize_endpoint(caller, request.id, self._cp.state.endpoints)
            revision = await self._beat(request.id, self._cp.revision)
            health = self._health_of(request.id)
        except MeshError as e:
            await self._refuse(context, "heartbeat", caller, e)
        return mesh_pb2.HeartbeatResponse(id=request.id, health=health.value, revision=revision)

    async def SetHealth(
        self, request: mesh_pb2.SetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.HeartbeatResponse:
        caller: SpiffeId | None = None
        try:
            caller = self._caller(context)
            health = parse_health(request.health)
            authorize_endpoint(caller, request.id, self._cp.state.endpoints)
            revision, _ = await self._cp.execute(SetEndpointHealth(id=request.id, health=health))
            health = self._health_of(request.id)
        except MeshError as e:
            await self._refuse(context, "set health", caller, e)
        log.info("endpoint health set", extra={"id": request.id, "health": health.value})
        return mesh_pb2.HeartbeatResponse(id=request.id, health=health.value, revision=revision)

    async def Deregister(
        self, request: mesh_pb2.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.DeregisterResponse:
        caller: SpiffeId | None = None
        try:
            caller = self._caller(context)
            authorize_endpoint(caller, request.id, self._cp.state.endpoints)
            revision, _ = await self._cp.execute(DeregisterEndpoint(id=request.id))
        except MeshError as e:
            await self._refuse(context, "deregister", caller, e)
        log.info("endpoint deregistered", extra={"id": request.id, "identity": str(caller)})
        return mesh_pb2.DeregisterResponse(revision=revision)

    # ---- helpers ---------------------------------------------------------------------------

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> SpiffeId:
        try:
            chain = peer_chain(context.auth_context())
        except MeshError as e:  # gRPC verified the handshake; an unparseable cert is still bad
            raise AuthenticationError(f"the client certificate cannot be read: {e}") from None
        state = self._authority.state
        return caller_id(
            chain, state.bundle, trust_domain=state.trust_domain, now=self._clock.now()
        )

    async def _beat(self, id_: str, revision: int) -> int:
        """Record a heartbeat and execute what the tracker decides (unhealthy → healthy)."""
        now = self._clock.monotonic()
        commands = self._tracker.endpoint_heartbeat(self._cp.state, id_, now)
        return await self._cp.execute_all(commands) if commands else revision

    def _health_of(self, id_: str) -> Health:
        endpoint = self._cp.state.endpoints.get(id_)
        if endpoint is None:  # deregistered while we were at it
            raise NotFoundError(f"endpoint {id_!r} is not registered: register it again")
        return endpoint.health

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: str,
        caller: SpiffeId | None,
        error: MeshError,
    ) -> NoReturn:
        code = status_name(error)
        log.info(
            "registration refused",
            extra={"call": call, "caller": str(caller or ""), "code": code, "reason": str(error)},
        )
        await context.abort(grpc.StatusCode[code], str(error))
        raise AssertionError("unreachable: abort raises")
