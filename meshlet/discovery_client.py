"""The client side of the control plane's gRPC API, shared by the sidecar, the node helper
and the CLI: a verified TLS channel, the Watch stream decoded into model objects, Report,
Sign, and the Registration of a sidecar's own endpoint (over mTLS).

Decoding a WatchResponse into model objects happens here and nowhere else. The channel
always verifies the control plane against the mesh's trust bundle and its fixed name
``control-plane.meshlet``. gRPC failures become ``ControlPlaneError`` (a MeshError) that
names the status and the control plane's reason. This module never retries or
reconnects on its own: the caller owns its loop (resume with the last revision).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson

from certs import pki
from certs.bundle import bundle_fingerprint_pem
from meshlet import wire
from meshlet.errors import InputError, MeshError
from meshlet.model import (
    Endpoint,
    Event,
    EventType,
    Health,
    Kind,
    Node,
    Object,
    ServicePort,
    Snapshot,
    key_of,
    kind_of,
)
from meshlet.proto import mesh_pb2, mesh_pb2_grpc

SERVER_NAME = "control-plane.meshlet"  # the DNS SAN of the control plane's certificate
IDLE_TIMEOUT_S = 60.0  # the server sends a Bookmark every 15 s by default
CALL_TIMEOUT_S = 10.0

DiscoveryStub = mesh_pb2_grpc.DiscoveryStub
CertificateAuthorityStub = mesh_pb2_grpc.CertificateAuthorityStub

_EVENT_TYPES = {
    mesh_pb2.Change.ADDED: EventType.ADDED,
    mesh_pb2.Change.MODIFIED: EventType.MODIFIED,
    mesh_pb2.Change.DELETED: EventType.DELETED,
}


class ControlPlaneError(MeshError):
    """A call to the control plane failed; ``code`` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        self.code = code
        self.details = details
        if code == "UNAVAILABLE":
            text = f"cannot reach the control plane ({details})"
        else:
            text = f"the control plane refused the request ({code}): {details}"
        super().__init__(text)
        if code == "INVALID_ARGUMENT":
            self.exit_code = 2


def _translate(e: grpc.aio.AioRpcError) -> ControlPlaneError:
    return ControlPlaneError(e.code().name, e.details() or "no details")


# ---- updates: what a Watch yields ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset:
    """Everything, at ``revision``: replace what you have."""

    revision: int
    snapshot: Snapshot
    trust_bundle_pem: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    """The changes of one revision, in order."""

    revision: int
    events: tuple[Event, ...]
    trust_bundle_pem: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Bookmark:
    """Nothing changed up to ``revision`` (or only the bundle did)."""

    revision: int
    trust_bundle_pem: bytes | None = None


Update = Reset | Delta | Bookmark


def decode_object(obj: mesh_pb2.Object) -> Object:
    try:
        kind = Kind(obj.kind)
    except ValueError:
        raise InputError(f"control plane sent an object of unknown kind {obj.kind!r}") from None
    decoded = wire.decode(wire.KIND_TYPES[kind], obj.json, what=f"{kind.value} {obj.key}")
    if key_of(decoded) != obj.key:
        raise InputError(
            f"control plane sent {kind.value} {key_of(decoded)!r} under key {obj.key!r}"
        )
    return decoded


def decode_response(response: mesh_pb2.WatchResponse) -> Update:
    """The one place a WatchResponse becomes model objects."""
    bundle = response.trust_bundle_pem or None
    body = response.WhichOneof("body")
    if body == "snapshot":
        tables: dict[Kind, dict[str, Any]] = {k: {} for k in Kind}
        for raw in response.snapshot.objects:
            obj = decode_object(raw)
            tables[kind_of(obj)][key_of(obj)] = obj
        snapshot = Snapshot(
            revision=response.revision,
            services=tables[Kind.SERVICE],
            endpoints=tables[Kind.ENDPOINT],
            nodes=tables[Kind.NODE],
        )
        return Reset(revision=response.revision, snapshot=snapshot, trust_bundle_pem=bundle)
    if body == "delta":
        events = []
        for change in response.delta.changes:
            if change.type not in _EVENT_TYPES:
                raise InputError(f"control plane sent a change of unknown type {change.type}")
            events.append(
                Event(
                    type=_EVENT_TYPES[change.type],
                    object=decode_object(change.object),
                    revision=response.revision,
                )
            )
        return Delta(revision=response.revision, events=tuple(events), trust_bundle_pem=bundle)
    return Bookmark(revision=response.revision, trust_bundle_pem=bundle)


def apply_update(current: Snapshot | None, update: Update) -> Snapshot:
    """The state after ``update``: a Reset replaces, a Delta applies, a Bookmark moves on."""
    if isinstance(update, Reset):
        return update.snapshot
    if current is None:
        raise MeshError(
            f"got a {type(update).__name__} at revision {update.revision} before any state: "
            "watch from revision 0 to start with a snapshot"
        )
    if isinstance(update, Bookmark):
        return dataclasses.replace(current, revision=update.revision)
    tables = {k: dict(current.table(k)) for k in Kind}
    for ev in update.events:
        if ev.type is EventType.DELETED:
            tables[ev.kind].pop(ev.key, None)
        else:
            tables[ev.kind][ev.key] = ev.object
    return Snapshot(
        revision=update.revision,
        services=tables[Kind.SERVICE],  # type: ignore[arg-type]
        endpoints=tables[Kind.ENDPOINT],  # type: ignore[arg-type]
        nodes=tables[Kind.NODE],  # type: ignore[arg-type]
    )


# ---- calls ------------------------------------------------------------------------------------


JOIN_TOKEN_METADATA = "x-meshlet-join-token"


class _JoinToken(grpc.AuthMetadataPlugin):  # type: ignore[misc]  # grpc ships no stubs
    """Sends the join token with every call: the credential for watching without an SVID."""

    def __init__(self, token: str) -> None:
        self._metadata = ((JOIN_TOKEN_METADATA, token),)

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        callback(self._metadata, None)


def channel(
    address: str,
    bundle_pem: bytes,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    *,
    join_token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A TLS channel that trusts only ``bundle_pem``; with a cert and key, an mTLS one.

    Watching the mesh needs a credential: the SVID on the mTLS port, or ``join_token``
    (sent with every call) on the TLS port. Create the channel inside the running event
    loop; close it (``async with`` or ``close()``).
    """
    if not bundle_pem:
        raise InputError("the trust bundle is empty: the control plane cannot be verified")
    if (client_cert_pem is None) != (client_key_pem is None):
        raise InputError("give both the client certificate and its key, or neither")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem,
        private_key=client_key_pem,
        certificate_chain=client_cert_pem,
    )
    if join_token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_JoinToken(join_token))
        )
    return grpc.aio.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME), *options]
    )


def watch_request(
    *,
    client_id: str,
    kind: str,
    since_revision: int = 0,
    bundle_pem: bytes | None = None,
    leaf_chain_pem: bytes | None = None,
    spiffe_id: str = "",
) -> mesh_pb2.WatchRequest:
    """A WatchRequest (also the Report body) describing what this client runs now."""
    request = mesh_pb2.WatchRequest(
        client_id=client_id, kind=kind, since_revision=since_revision, spiffe_id=spiffe_id
    )
    if bundle_pem:
        request.bundle_fingerprint = bundle_fingerprint_pem(bundle_pem)
    if leaf_chain_pem:
        leaf = pki.load_certs(leaf_chain_pem, source="leaf certificate")[0]
        sid = pki.spiffe_id_of(leaf)
        request.spiffe_id = str(sid) if sid else spiffe_id
        request.leaf_serial = format(leaf.serial_number, "x")
        request.leaf_not_after = int(leaf.not_valid_after_utc.timestamp())
        request.leaf_chain_pem = leaf_chain_pem
    return request


async def watch(
    stub: mesh_pb2_grpc.DiscoveryStub,
    request: mesh_pb2.WatchRequest,
    *,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> AsyncIterator[Update]:
    """Decoded updates of one Watch stream, until it ends or fails (ControlPlaneError).

    Silence longer than ``idle_timeout_s`` (no Bookmark) counts as a lost connection.
    Reconnect with the last revision you applied to get only what you missed.
    """
    call = stub.Watch(request)
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    response = await call.read()
            except grpc.aio.AioRpcError as e:
                raise _translate(e) from None
            except TimeoutError:
                raise ControlPlaneError(
                    "UNAVAILABLE", f"no message for {idle_timeout_s:g}s on the watch stream"
                ) from None
            if response is grpc.aio.EOF:
                return
            yield decode_response(response)
    finally:
        call.cancel()


async def report(
    stub: mesh_pb2_grpc.DiscoveryStub,
    request: mesh_pb2.WatchRequest,
    *,
    timeout_s: float = CALL_TIMEOUT_S,
) -> None:
    """Tell the control plane what this client runs now (after a new bundle or leaf)."""
    try:
        await stub.Report(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None


@dataclass(frozen=True, slots=True)
class Signed:
    cert_chain_pem: bytes  # leaf first, then the issuer
    trust_bundle_pem: bytes


async def sign(
    stub: mesh_pb2_grpc.CertificateAuthorityStub,
    *,
    csr_pem: bytes,
    spiffe_id: str,
    join_token: str = "",
    ttl_seconds: int = 0,
    timeout_s: float = CALL_TIMEOUT_S,
) -> Signed:
    """Have the control plane sign ``csr_pem``: with the join token, or over mTLS to renew."""
    request = mesh_pb2.SignRequest(
        csr_pem=csr_pem, spiffe_id=spiffe_id, join_token=join_token, ttl_seconds=ttl_seconds
    )
    try:
        response = await stub.Sign(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return Signed(response.cert_chain_pem, response.trust_bundle_pem)


# ---- registration: a sidecar's own endpoint, over the mTLS channel -----------------------------

RegistrationStub = mesh_pb2_grpc.RegistrationStub


def _health(text: str) -> Health:
    try:
        return Health(text)
    except ValueError:
        raise InputError(f"control plane sent an unknown health {text!r}") from None


async def register(
    stub: mesh_pb2_grpc.RegistrationStub,
    endpoint: Endpoint,
    service_ports: Sequence[ServicePort] = (),
    *,
    timeout_s: float = CALL_TIMEOUT_S,
) -> Endpoint:
    """Register (or re-register) ``endpoint``; the answer is the endpoint as stored.

    The stub must ride on an mTLS channel with the SVID of the endpoint's service (the
    control plane sets the endpoint's identity to it). ``service_ports`` create the service
    when it does not exist yet.
    """
    request = mesh_pb2.RegisterRequest(endpoint_json=wire.encode(endpoint))
    if service_ports:
        request.service_ports_json = orjson.dumps([wire.to_data(p) for p in service_ports])
    try:
        response = await stub.Register(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return wire.decode(Endpoint, response.endpoint_json, what="registered endpoint")


async def heartbeat(
    stub: mesh_pb2_grpc.RegistrationStub, id: str, *, timeout_s: float = CALL_TIMEOUT_S
) -> Health:
    """Keep endpoint ``id`` alive; its health after the beat. NOT_FOUND: register again."""
    try:
        response = await stub.Heartbeat(mesh_pb2.HeartbeatRequest(id=id), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return _health(response.health)


async def set_health(
    stub: mesh_pb2_grpc.RegistrationStub,
    id: str,
    health: Health,
    *,
    timeout_s: float = CALL_TIMEOUT_S,
) -> Health:
    """Set endpoint ``id``'s health, e.g. DRAINING before shutdown."""
    request = mesh_pb2.SetHealthRequest(id=id, health=Health(health).value)
    try:
        response = await stub.SetHealth(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return _health(response.health)


async def deregister(
    stub: mesh_pb2_grpc.RegistrationStub, id: str, *, timeout_s: float = CALL_TIMEOUT_S
) -> None:
    """Remove endpoint ``id`` from the mesh."""
    try:
        await stub.Deregister(mesh_pb2.DeregisterRequest(id=id), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None


# ---- nodes: a node helper registers its host, with the join token ------------------------------

NodesStub = mesh_pb2_grpc.NodesStub


async def register_node(
    stub: mesh_pb2_grpc.NodesStub,
    *,
    name: str,
    underlay_address: str,
    vtep_mac: str,
    timeout_s: float = CALL_TIMEOUT_S,
) -> Node:
    """Register (or re-register) node ``name``; the answer carries its leased subnet.

    The stub must ride on a channel made with ``join_token``; a node keeps its subnet when it
    registers again.
    """
    request = mesh_pb2.RegisterNodeRequest(
        name=name, underlay_address=underlay_address, vtep_mac=vtep_mac
    )
    try:
        response = await stub.RegisterNode(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return wire.decode(Node, response.node_json, what="registered node")


async def node_heartbeat(
    stub: mesh_pb2_grpc.NodesStub, name: str, *, timeout_s: float = CALL_TIMEOUT_S
) -> Health:
    """Keep node ``name`` healthy; its health after the beat. NOT_FOUND: register again."""
    try:
        response = await stub.NodeHeartbeat(
            mesh_pb2.NodeHeartbeatRequest(name=name), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
    return _health(response.health)


async def deregister_node(
    stub: mesh_pb2_grpc.NodesStub, name: str, *, timeout_s: float = CALL_TIMEOUT_S
) -> None:
    """Remove node ``name`` (and its endpoints) from the mesh. NOT_FOUND: it is gone already."""
    try:
        await stub.DeregisterNode(mesh_pb2.DeregisterNodeRequest(name=name), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise _translate(e) from None
