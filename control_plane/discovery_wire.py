"""The server's half of the protobuf shape of meshlet.v1: model objects and events into
WatchResponses, WatchRequests into ``ClientStatus``, gRPC's auth context into a chain.

Decoding responses is the clients' half and lives in ``meshlet.discovery_client`` (one
place for every client). No I/O here: values in, messages or InputError out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from certs import pki
from control_plane import ca_report
from meshlet import wire
from meshlet.errors import InputError, MeshError
from meshlet.model import Event, Snapshot, key_of, kind_of
from meshlet.proto import mesh_pb2

_CHANGE_TYPES = {
    "ADDED": mesh_pb2.Change.ADDED,
    "MODIFIED": mesh_pb2.Change.MODIFIED,
    "DELETED": mesh_pb2.Change.DELETED,
}


def encode_object(obj: Any) -> mesh_pb2.Object:
    return mesh_pb2.Object(kind=kind_of(obj).value, key=key_of(obj), json=wire.encode(obj))


def snapshot_response(snapshot: Snapshot) -> mesh_pb2.WatchResponse:
    objects = [
        encode_object(o)
        for table in (snapshot.services, snapshot.endpoints, snapshot.nodes)
        for o in table.values()
    ]
    return mesh_pb2.WatchResponse(
        revision=snapshot.revision, snapshot=mesh_pb2.Snapshot(objects=objects)
    )


def delta_responses(events: Sequence[Event]) -> list[mesh_pb2.WatchResponse]:
    """One response per revision, in order (a backlog may span several)."""
    responses: list[mesh_pb2.WatchResponse] = []
    for ev in events:
        if not responses or responses[-1].revision != ev.revision:
            responses.append(mesh_pb2.WatchResponse(revision=ev.revision, delta=mesh_pb2.Delta()))
        responses[-1].delta.changes.append(
            mesh_pb2.Change(type=_CHANGE_TYPES[ev.type.value], object=encode_object(ev.object))
        )
    return responses


def with_bundle(raw: bytes, bundle_pem: bytes) -> bytes:
    """An encoded WatchResponse with ``trust_bundle_pem`` set, without decoding it.

    Protobuf merges concatenated messages field by field, so the shared bytes of a response
    plus a message holding only the bundle is that response carrying the bundle.
    """
    bundle: bytes = mesh_pb2.WatchResponse(trust_bundle_pem=bundle_pem).SerializeToString()
    return raw + bundle


def serialize_response(response: mesh_pb2.WatchResponse | bytes) -> bytes:
    """gRPC's serializer for Watch: responses encoded once for every stream pass as they are."""
    if isinstance(response, bytes):
        return response
    raw: bytes = response.SerializeToString()
    return raw


def bookmark_response(revision: int) -> mesh_pb2.WatchResponse:
    return mesh_pb2.WatchResponse(revision=revision, bookmark=mesh_pb2.Bookmark())


def client_status(request: mesh_pb2.WatchRequest) -> ca_report.ClientStatus:
    """The client's report from a WatchRequest; InputError names a bad field."""
    ca_report.check_client(request.client_id, request.kind)
    chain: tuple[x509.Certificate, ...] = ()
    if request.leaf_chain_pem:
        try:
            chain = tuple(pki.load_certs(request.leaf_chain_pem, source="leaf_chain_pem"))
        except MeshError as e:
            raise InputError(str(e)) from None
    not_after = None
    if request.leaf_not_after > 0:
        try:
            not_after = dt.datetime.fromtimestamp(request.leaf_not_after, dt.UTC)
        except (OverflowError, ValueError, OSError):
            raise InputError(f"leaf_not_after {request.leaf_not_after} is not a time") from None
    return ca_report.ClientStatus(
        client_id=request.client_id,
        kind=request.kind,
        spiffe_id=request.spiffe_id,
        bundle_fingerprint=request.bundle_fingerprint.lower(),
        leaf_serial=request.leaf_serial.lower().removeprefix("0x"),
        leaf_not_after=not_after,
        leaf_chain=chain,
    )


def peer_chain(auth: Mapping[str, Sequence[bytes]]) -> list[x509.Certificate]:
    """The client's verified chain from gRPC's auth context (mTLS port), leaf first; [] without."""
    leaf_pem = b"".join(auth.get("x509_pem_cert", []))
    if not leaf_pem:
        return []
    leaf = pki.load_certs(leaf_pem, source="client certificate")[0]
    rest_pem = b"".join(auth.get("x509_pem_cert_chain", []))
    rest = pki.load_certs(rest_pem, source="client chain") if rest_pem else []
    return [leaf, *(c for c in rest if c != leaf)]
