"""The Nodes gRPC service: a node helper registers its host, leases its overlay subnet,
heartbeats and deregisters, with the join token as its credential.

For: `meshlet node run`, which needs no admin token. The rules are pure functions at the
top (values in, a Node or a refusal out); the servicer below checks the join token, asks
the rules and executes the same registry commands as the admin API (``PutNode``,
``DeleteNode``; the subnet comes from ``registry.lease_subnet`` and is kept across
re-registrations), and heartbeats into the same ``HealthTracker``. Refusals and the gRPC
status they become (``status_name``):

  AuthenticationError     UNAUTHENTICATED      no join token, or a wrong one
  UnderlayTakenError      ALREADY_EXISTS       the underlay address belongs to another node
  NotFoundError           NOT_FOUND            unknown node (register again)
  InputError              INVALID_ARGUMENT     a bad field, named
  ConflictError (other)   FAILED_PRECONDITION  e.g. no free subnet left: an operator's job

Must never: accept an SVID instead of the join token (a workload must not move a host's
overlay), or change a node's subnet when it re-registers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc

from control_plane.ca import Authority
from control_plane.ca_rules import AuthenticationError
from control_plane.core import ControlPlane
from control_plane.health import HealthTracker
from control_plane.registry import DeleteNode, PutNode
from meshlet import wire
from meshlet.discovery_client import JOIN_TOKEN_METADATA
from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError
from meshlet.model import Node
from meshlet.proto import mesh_pb2, mesh_pb2_grpc
from meshlet.runtime import Clock, SystemClock

log = logging.getLogger(__name__)

SERVICE_NAME = "meshlet.v1.Nodes"


# ---- the rules (pure) ---------------------------------------------------------------------------


class UnderlayTakenError(ConflictError):
    """Another node already registered this underlay address."""


def decode_node(request: mesh_pb2.RegisterNodeRequest) -> Node:
    """The node a RegisterNode asks for (no subnet yet); InputError names the field."""
    return wire.from_data(
        Node,
        {
            "name": request.name,
            "underlay_address": request.underlay_address,
            "vtep_mac": request.vtep_mac,
        },
        what="RegisterNode",
    )


def check_underlay(node: Node, nodes: Mapping[str, Node]) -> None:
    """UnderlayTakenError when another node already has ``node``'s underlay address."""
    for other in nodes.values():
        if other.name != node.name and other.underlay_address == node.underlay_address:
            raise UnderlayTakenError(
                f"underlay address {node.underlay_address} already belongs to node "
                f"{other.name!r}: deregister that node first, or give this host its own address"
            )


def known_node(name: str, nodes: Mapping[str, Node]) -> Node:
    if not name:
        raise InputError("name is empty: send the node name you registered with")
    node = nodes.get(name)
    if node is None:
        raise NotFoundError(f"node {name!r} is not registered: register it again")
    return node


def status_name(error: MeshError) -> str:
    """The gRPC status (by name) a refusal becomes."""
    if isinstance(error, AuthenticationError):
        return "UNAUTHENTICATED"
    if isinstance(error, UnderlayTakenError):
        return "ALREADY_EXISTS"
    if isinstance(error, NotFoundError):
        return "NOT_FOUND"
    if isinstance(error, InputError):
        return "INVALID_ARGUMENT"
    return "FAILED_PRECONDITION"


# ---- the servicer ----------------------------------------------------------------------------


class NodesServicer(mesh_pb2_grpc.NodesServicer):
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

    async def RegisterNode(
        self, request: mesh_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.RegisterNodeResponse:
        try:
            self._authenticate(context)
            node = decode_node(request)
            check_underlay(node, self._cp.state.nodes)
            created = node.name not in self._cp.state.nodes
            try:
                revision, _ = await self._cp.execute(
                    PutNode(
                        name=node.name,
                        underlay_address=node.underlay_address,
                        vtep_mac=node.vtep_mac,
                    )
                )
            except ConflictError:
                check_underlay(node, self._cp.state.nodes)  # lost a race for the address?
                raise
            revision = await self._beat(node.name, revision)
            stored = known_node(node.name, self._cp.state.nodes)
        except MeshError as e:
            await self._refuse(context, "register", request.name, e)
        log.info(
            "node registered" if created else "node re-registered",
            extra={
                "node": stored.name,
                "underlay_address": stored.underlay_address,
                "subnet": stored.subnet,
            },
        )
        return mesh_pb2.RegisterNodeResponse(
            node_json=wire.encode(stored), revision=revision, created=created
        )

    async def NodeHeartbeat(
        self, request: mesh_pb2.NodeHeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.NodeHeartbeatResponse:
        try:
            self._authenticate(context)
            known_node(request.name, self._cp.state.nodes)
            revision = await self._beat(request.name, self._cp.revision)
            health = known_node(request.name, self._cp.state.nodes).health
        except MeshError as e:
            await self._refuse(context, "heartbeat", request.name, e)
        return mesh_pb2.NodeHeartbeatResponse(
            name=request.name, health=health.value, revision=revision
        )

    async def DeregisterNode(
        self, request: mesh_pb2.DeregisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.DeregisterNodeResponse:
        try:
            self._authenticate(context)
            known_node(request.name, self._cp.state.nodes)
            revision, _ = await self._cp.execute(DeleteNode(name=request.name))
        except MeshError as e:
            await self._refuse(context, "deregister", request.name, e)
        log.info("node deregistered", extra={"node": request.name})
        return mesh_pb2.DeregisterNodeResponse(revision=revision)

    # ---- helpers ---------------------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The join token only: a peer certificate, even a valid SVID, does not count."""
        metadata = {m.key: m.value for m in (context.invocation_metadata() or ())}
        token = metadata.get(JOIN_TOKEN_METADATA, "")
        if not isinstance(token, str) or not token:
            raise AuthenticationError(
                f"registering a node needs the join token (metadata {JOIN_TOKEN_METADATA}): "
                "pass --join-token FILE, the control plane's DATA_DIR/join-token"
            )
        self._authority.authenticate(join_token=token)

    async def _beat(self, name: str, revision: int) -> int:
        """Record a heartbeat and execute what the tracker decides (unhealthy → healthy)."""
        commands = self._tracker.node_heartbeat(self._cp.state, name, self._clock.monotonic())
        return await self._cp.execute_all(commands) if commands else revision

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: str,
        node: str,
        error: MeshError,
    ) -> NoReturn:
        code = status_name(error)
        log.info(
            "node request refused",
            extra={"call": call, "node": node, "code": code, "reason": str(error)},
        )
        await context.abort(grpc.StatusCode[code], str(error))
        raise AssertionError("unreachable: abort raises")
