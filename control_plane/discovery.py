"""The control plane's gRPC side: Discovery (the mesh map, pushed) and CertificateAuthority.

``GrpcServer`` serves both, plus grpc.health.v1, over TLS with the control plane's own
SVID (re-read on every new connection, so a rotation needs no restart). It listens on
up to two ports:

- the TLS port: clients verify the control plane; they need no certificate. Watch,
  Report, health, and Sign with the join token (a workload's first certificate).
- the mTLS port: the same services, but the client must present its SVID; Sign there
  renews the presented identity. (gRPC Python cannot ask for an optional client
  certificate, so one port cannot serve both kinds of client.) Registration
  (``registration_rpc``) is for this port only: without a client SVID it answers
  UNAUTHENTICATED, which is what every call on the TLS port gets.

A Watch stream sends a full Snapshot first (or, when resuming from a revision still in
history, a Delta of what was missed), then one Delta per revision, and a Bookmark when
the stream has been idle for ``bookmark_s``. The trust bundle rides on the first
response and, after a rotation, on a Bookmark sent at once.

This module never decides who may get a certificate (``ca_rules`` does) and never
builds messages itself (``discovery_wire`` does; ``meshlet.discovery_client`` decodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from control_plane import ca_rules
from control_plane.ca import Authority, CaChange
from control_plane.ca_identity import TlsMaterial
from control_plane.core import ControlPlane
from control_plane.discovery_wire import (
    bookmark_response,
    client_status,
    delta_responses,
    peer_chain,
    serialize_response,
    snapshot_response,
    with_bundle,
)
from control_plane.health import HealthTracker
from control_plane.registration_rpc import SERVICE_NAME as REGISTRATION_SERVICE
from control_plane.registration_rpc import RegistrationServicer
from control_plane.store.base import CompactedError
from meshlet.discovery_client import JOIN_TOKEN_METADATA
from meshlet.errors import ConflictError, InputError, MeshError
from meshlet.model import Event
from meshlet.proto import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)

BOOKMARK_INTERVAL_S = 15.0
ENCODED_REVISIONS = 64  # Deltas kept encoded for streams still behind (one commit, many streams)
SERVICE_NAMES = ("meshlet.v1.Discovery", "meshlet.v1.CertificateAuthority")
_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second control plane on the same port must fail, not share
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


# ---- servicers ------------------------------------------------------------------------------


class DiscoveryServicer(mesh_pb2_grpc.DiscoveryServicer):
    def __init__(
        self, control_plane: ControlPlane, authority: Authority, *, bookmark_s: float
    ) -> None:
        self._cp = control_plane
        self._authority = authority
        self._interval = bookmark_s
        self._wakers: set[asyncio.Event] = set()
        self._deltas: OrderedDict[int, bytes] = OrderedDict()
        self._snapshot: tuple[int, bytes] = (-1, b"")
        # The last batch looked up and its answer: every stream asks with the same (shared,
        # never mutated) list right after a commit. Holding it keeps its id from being reused.
        self._last: tuple[Sequence[Event], list[tuple[int, bytes]]] = ((), [])
        self.closing = False

    def _encoded_deltas(self, batch: Sequence[Event]) -> list[tuple[int, bytes]]:
        """One encoded Delta per revision in ``batch``: encoded once, sent to every stream."""
        if batch is self._last[0]:
            return self._last[1]
        cache = self._deltas
        revisions = dict.fromkeys(ev.revision for ev in batch)
        if not all(r in cache for r in revisions):
            for response in delta_responses(batch):
                cache[response.revision] = response.SerializeToString()
            while len(cache) > max(ENCODED_REVISIONS, len(revisions)):
                cache.popitem(last=False)
        encoded = [(r, cache[r]) for r in revisions]
        self._last = (batch, encoded)
        return encoded

    def _encoded_snapshot(self) -> tuple[int, bytes]:
        """The current Snapshot, encoded once per revision (a reconnect storm asks for it often)."""
        snapshot = self._cp.snapshot
        if self._snapshot[0] != snapshot.revision:
            self._snapshot = (snapshot.revision, snapshot_response(snapshot).SerializeToString())
        return self._snapshot

    def wake_all(self, _change: CaChange | None = None) -> None:
        """A new bundle (or shutdown): every stream looks up what to send."""
        for wake in self._wakers:
            wake.set()

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The mesh map is not public: the join token (metadata) or a current SVID (mTLS)."""
        metadata = {m.key: m.value for m in (context.invocation_metadata() or ())}
        token = metadata.get(JOIN_TOKEN_METADATA, "")
        try:
            self._authority.authenticate(
                join_token=token if isinstance(token, str) else "",
                peer_chain=peer_chain(context.auth_context()),
            )
        except ca_rules.AuthenticationError as e:
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{e}: watching the mesh needs the join token (metadata {JOIN_TOKEN_METADATA}) "
                "or an SVID on the mutual-TLS port",
            )

    async def Report(
        self, request: mesh_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.ReportResponse:
        await self._authenticate(context)
        try:
            status = client_status(request)
        except InputError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._authority.record_client(status)
        return mesh_pb2.ReportResponse()

    async def Watch(
        self, request: mesh_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await self._authenticate(context)
        try:
            status = client_status(request)
            if request.since_revision < 0:
                raise InputError(f"since_revision {request.since_revision} must not be negative")
        except InputError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._authority.record_client(status, streams=1)
        log.info("watch opened", extra={"client_id": status.client_id, "kind": status.kind})
        wake = asyncio.Event()
        self._wakers.add(wake)
        try:
            async with contextlib.aclosing(self._stream(request.since_revision, wake)) as stream:
                async for response in stream:
                    yield response
                    self._authority.touch_client(status.client_id)
        finally:
            self._wakers.discard(wake)
            self._authority.client_left(status.client_id)
            log.info("watch closed", extra={"client_id": status.client_id})
        await _abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "the control plane is shutting down: reconnect with your revision",
        )

    async def _stream(self, since: int, wake: asyncio.Event) -> AsyncGenerator[bytes]:
        """Encoded responses until shutdown; the bundle rides along whenever the client lacks it."""
        loop = asyncio.get_running_loop()
        sent_bundle = ""
        last_sent = loop.time()

        def stamp(response: mesh_pb2.WatchResponse | bytes) -> bytes:
            nonlocal sent_bundle, last_sent
            raw = serialize_response(response)
            if self._authority.bundle_fingerprint != sent_bundle:
                raw = with_bundle(raw, self._authority.bundle_pem)
                sent_bundle = self._authority.bundle_fingerprint
            last_sent = loop.time()
            return raw

        resync = since <= 0 or since > self._cp.revision  # new, or from another history
        if not resync and since == self._cp.revision:
            yield stamp(bookmark_response(since))  # nothing missed: still send the bundle now
        # The first response always carries the bundle; later ones only when it changed.
        # One wait point per stream: the watch itself, woken by a commit, by ``wake_all``
        # (a bundle, shutdown) or by the bookmark timer, all through ``wake``.
        timer: asyncio.TimerHandle | None = None

        def ring() -> None:
            nonlocal timer
            timer = None
            wake.set()

        try:
            while not self.closing:
                if resync:
                    revision, raw = self._encoded_snapshot()
                    yield stamp(raw)
                    since, resync = revision, False
                async with contextlib.aclosing(self._cp.watch(since, wake=wake)) as batches:
                    while not self.closing:
                        if sent_bundle and sent_bundle != self._authority.bundle_fingerprint:
                            yield stamp(bookmark_response(since))  # a new bundle, at once
                        due = last_sent + self._interval
                        if loop.time() >= due:
                            yield stamp(bookmark_response(since))
                            due = last_sent + self._interval
                        if timer is None:
                            timer = loop.call_at(due, ring)
                        try:
                            batch = await anext(batches)
                        except StopAsyncIteration:
                            return  # the store closed: the control plane is stopping
                        except CompactedError:
                            resync = True  # fell behind the history: start over
                            break
                        for revision, raw in self._encoded_deltas(batch):
                            yield stamp(raw)
                            since = revision
        finally:
            if timer is not None:
                timer.cancel()


class CertificateAuthorityServicer(mesh_pb2_grpc.CertificateAuthorityServicer):
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    async def Sign(
        self, request: mesh_pb2.SignRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.SignResponse:
        try:
            issued = self._authority.sign(
                csr_pem=request.csr_pem,
                spiffe_id=request.spiffe_id,
                join_token=request.join_token,
                ttl_seconds=request.ttl_seconds,
                peer_chain=peer_chain(context.auth_context()),
            )
        except MeshError as e:
            code = _status_code(e)
            log.info(
                "sign refused",
                extra={"spiffe_id": request.spiffe_id, "code": code.name, "reason": str(e)},
            )
            await _abort(context, code, str(e))
        leaf = issued.chain[0]
        log.info(
            "signed",
            extra={
                "spiffe_id": request.spiffe_id,
                "serial": format(leaf.serial_number, "x"),
                "not_after": leaf.not_valid_after_utc.isoformat(),
            },
        )
        return mesh_pb2.SignResponse(
            cert_chain_pem=issued.chain_pem, trust_bundle_pem=issued.bundle_pem
        )


def _status_code(e: MeshError) -> grpc.StatusCode:
    if isinstance(e, ca_rules.AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(e, ca_rules.PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.FAILED_PRECONDITION  # e.g. the issuer expired: an operator's job


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")


# ---- the server --------------------------------------------------------------------------------


def _certificate_config(tls: TlsMaterial, *, client_auth: bool) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_pem, tls.cert_chain_pem)],
        root_certificates=tls.bundle_pem if client_auth else None,
    )


def server_credentials(
    tls: Callable[[], TlsMaterial], *, client_auth: bool
) -> grpc.ServerCredentials:
    """TLS credentials that pick up a new certificate or bundle at the next connection.

    gRPC calls the fetcher on its own thread before each handshake; it only compares a
    generation number and builds a configuration when it changed.
    """
    first = tls()
    served = first.generation

    def fetch() -> Any:
        nonlocal served
        current = tls()
        if current.generation == served:
            return None
        served = current.generation
        return _certificate_config(current, client_auth=client_auth)

    return grpc.dynamic_ssl_server_credentials(
        _certificate_config(first, client_auth=client_auth),
        fetch,
        require_client_authentication=client_auth,
    )


class GrpcServer:
    """Discovery + CertificateAuthority + health on a TLS port and, optionally, an mTLS port;
    plus Registration (mTLS callers only) when given the ``health_tracker``, and any
    ``extra_services`` (name, function that adds the servicer to a server) app.py wires in."""

    def __init__(
        self,
        control_plane: ControlPlane,
        authority: Authority,
        *,
        bookmark_s: float = BOOKMARK_INTERVAL_S,
        health_tracker: HealthTracker | None = None,
        extra_services: Sequence[tuple[str, Callable[[grpc.aio.Server], None]]] = (),
    ) -> None:
        self._authority = authority
        self._extra_services = tuple(extra_services)
        self._discovery = DiscoveryServicer(control_plane, authority, bookmark_s=bookmark_s)
        self._ca = CertificateAuthorityServicer(authority)
        # Registration needs the tracker the admin API uses (heartbeats); without one, no service.
        self._registration = (
            RegistrationServicer(control_plane, authority, health_tracker)
            if health_tracker is not None
            else None
        )
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.port: int | None = None
        self.mtls_port: int | None = None

    async def start(self, address: str, *, mtls_address: str | None = None) -> None:
        """Listen on ``address`` (TLS) and ``mtls_address`` (mTLS); ports may be 0."""
        if self._server is not None:
            raise MeshError("the gRPC server is already started")
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        _add_discovery(self._discovery, server)
        mesh_pb2_grpc.add_CertificateAuthorityServicer_to_server(self._ca, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names: tuple[str, ...] = SERVICE_NAMES
        if self._registration is not None:  # answers UNAUTHENTICATED without a client SVID
            mesh_pb2_grpc.add_RegistrationServicer_to_server(self._registration, server)  # type: ignore[no-untyped-call]
            names = (*names, REGISTRATION_SERVICE)
        for name, add_to in self._extra_services:
            add_to(server)
            names = (*names, name)
        self.port = _bind(server, address, server_credentials(self._tls, client_auth=False))
        if mtls_address is not None:
            creds = server_credentials(self._tls, client_auth=True)
            self.mtls_port = _bind(server, mtls_address, creds)
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._unsubscribe = self._authority.subscribe(self._discovery.wake_all)
        self._discovery.closing = False
        await server.start()
        self._server = server
        log.info("gRPC listening", extra={"port": self.port, "mtls_port": self.mtls_port})

    def _tls(self) -> TlsMaterial:
        return self._authority.tls

    def bundle_changed(self) -> None:
        """Push the current bundle to every stream now (reloads also do this by themselves)."""
        self._discovery.wake_all()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, end every Watch (clients reconnect elsewhere), then stop."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self._health.enter_graceful_shutdown()
        self._discovery.closing = True
        self._discovery.wake_all()
        await server.stop(grace)

    async def run(self, address: str, *, mtls_address: str | None = None) -> None:
        """Serve until cancelled (for a TaskGroup); stops the server on the way out."""
        await self.start(address, mtls_address=mtls_address)
        assert self._server is not None
        try:
            await self._server.wait_for_termination()
        finally:
            await self.stop()


def _add_discovery(servicer: DiscoveryServicer, server: grpc.aio.Server) -> None:
    """As the generated ``add_DiscoveryServicer_to_server``, but Watch responses are bytes
    encoded once per revision and shared by every stream (``serialize_response``)."""
    handlers = {
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=mesh_pb2.WatchRequest.FromString,
            response_serializer=serialize_response,
        ),
        "Report": grpc.unary_unary_rpc_method_handler(
            servicer.Report,
            request_deserializer=mesh_pb2.WatchRequest.FromString,
            response_serializer=mesh_pb2.ReportResponse.SerializeToString,
        ),
    }
    name = "meshlet.v1.Discovery"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    try:
        port: int = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConflictError(
            f"cannot listen for gRPC on {address}: the port is in use (another control "
            "plane?) or the address is not local; choose another address"
        )
    return port
