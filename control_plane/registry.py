"""The registry: the pure core of the control plane.

``apply(state, command) -> (state, events)``. Commands come from the API; events go to
the store and to watchers. No I/O, no clock: an unchanged object yields no event, so
re-applying the same request changes nothing. Refusals raise ``InputError``,
``NotFoundError`` or ``ConflictError`` and leave the state as it was.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshlet.errors import ConflictError, InputError, NotFoundError
from meshlet.model import (
    Endpoint,
    Event,
    EventType,
    Health,
    Kind,
    Node,
    Object,
    Service,
    ServicePort,
    Snapshot,
    service_key,
)
from meshlet.policy import Policy

VIP_CIDR = "198.19.128.0/17"
OVERLAY_CIDR = "198.19.0.0/17"
SUBNET_PREFIX = 24
TABLES = {Kind.SERVICE: "services", Kind.ENDPOINT: "endpoints", Kind.NODE: "nodes"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    trust_domain: str = "mesh.local"
    vip_cidr: str = VIP_CIDR
    overlay_cidr: str = OVERLAY_CIDR

    def __post_init__(self) -> None:
        for name in ("vip_cidr", "overlay_cidr"):
            try:
                ipaddress.IPv4Network(getattr(self, name))
            except ValueError as e:
                raise InputError(
                    f"{name} {getattr(self, name)!r} is not an IPv4 network: {e}"
                ) from None
        if ipaddress.IPv4Network(self.overlay_cidr).prefixlen > SUBNET_PREFIX:
            raise InputError(f"overlay_cidr {self.overlay_cidr} must be /24 or larger")


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    services: dict[str, Service] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)

    def snapshot(self, revision: int) -> Snapshot:
        return Snapshot(
            revision=revision, services=self.services, endpoints=self.endpoints, nodes=self.nodes
        )

    def objects(self) -> Iterator[Object]:
        yield from self.services.values()
        yield from self.endpoints.values()
        yield from self.nodes.values()


# ---- commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PutService:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteService:
    namespace: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterEndpoint:
    endpoint: Endpoint
    # When the service does not exist yet, create it with these ports (as an agent does).
    create_service_ports: tuple[ServicePort, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeregisterEndpoint:
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetEndpointHealth:
    id: str
    health: Health


@dataclass(frozen=True, slots=True, kw_only=True)
class PutNode:
    name: str
    underlay_address: str
    vtep_mac: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteNode:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetNodeHealth:
    name: str
    health: Health


Command = (
    PutService
    | DeleteService
    | RegisterEndpoint
    | DeregisterEndpoint
    | SetEndpointHealth
    | PutNode
    | DeleteNode
    | SetNodeHealth
)


# ---- allocation ---------------------------------------------------------------------------


def allocate_vip(state: State, cfg: Config) -> str:
    """The lowest free address of the VIP range."""
    used = {s.vip for s in state.services.values()}
    for host in ipaddress.IPv4Network(cfg.vip_cidr).hosts():
        if str(host) not in used:
            return str(host)
    raise ConflictError(
        f"the VIP range {cfg.vip_cidr} is full ({len(used)} services): delete unused "
        "services or start the control plane with a larger --vip-cidr"
    )


def lease_subnet(state: State, cfg: Config) -> str:
    """The lowest free /24 of the overlay range."""
    used = {n.subnet for n in state.nodes.values()}
    for subnet in ipaddress.IPv4Network(cfg.overlay_cidr).subnets(new_prefix=SUBNET_PREFIX):
        if str(subnet) not in used:
            return str(subnet)
    raise ConflictError(
        f"the overlay range {cfg.overlay_cidr} has no free /{SUBNET_PREFIX} for another node: "
        "remove departed nodes or use a larger --overlay-cidr"
    )


# ---- apply ----------------------------------------------------------------------------------


class _Changes:
    """Collects new tables and the events that describe the difference."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.tables: dict[str, dict[str, object]] = {}
        self.events: list[Event] = []

    def _table(self, name: str) -> dict[str, object]:
        if name not in self.tables:
            self.tables[name] = dict(getattr(self.state, name))
        return self.tables[name]

    def put(self, table: str, key: str, obj: Object) -> None:
        old = getattr(self.state, table).get(key)
        if old == obj:
            return
        self._table(table)[key] = obj
        kind = EventType.ADDED if old is None else EventType.MODIFIED
        self.events.append(Event(type=kind, object=obj))

    def delete(self, table: str, key: str) -> None:
        old = self._table(table).pop(key, None)
        if old is not None:
            self.events.append(Event(type=EventType.DELETED, object=old))  # type: ignore[arg-type]

    def result(self) -> tuple[State, list[Event]]:
        if not self.events:
            return self.state, []
        return dataclasses.replace(self.state, **self.tables), self.events  # type: ignore[arg-type]


def _service(state: State, namespace: str, name: str) -> Service:
    svc = state.services.get(service_key(namespace, name))
    if svc is None:
        raise NotFoundError(
            f"service {namespace}/{name} does not exist: create it with "
            f"PUT /v1/services/{namespace}/{name} or `meshlet apply`"
        )
    return svc


def _put_service(state: State, cmd: PutService, cfg: Config, ch: _Changes) -> None:
    key = service_key(cmd.namespace, cmd.name)
    old = state.services.get(key)
    vip = old.vip if old else allocate_vip(state, cfg)
    try:
        svc = Service(
            namespace=cmd.namespace, name=cmd.name, ports=cmd.ports, vip=vip, policy=cmd.policy
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    ch.put("services", key, svc)


def _register(state: State, cmd: RegisterEndpoint, cfg: Config, ch: _Changes) -> None:
    ep = cmd.endpoint
    if ep.service_key not in state.services:
        if not cmd.create_service_ports:
            _service(state, ep.namespace, ep.service)  # raises NotFound
        _put_service(
            state,
            PutService(namespace=ep.namespace, name=ep.service, ports=cmd.create_service_ports),
            cfg,
            ch,
        )
    for other in state.endpoints.values():
        if other.id != ep.id and other.target == ep.target:
            raise ConflictError(
                f"endpoint {ep.address}:{ep.inbound_port} is already registered as {other.id!r} "
                f"({other.service_key}): deregister it first or use another address"
            )
    if ep.node is not None and ep.node not in state.nodes:
        raise NotFoundError(f"node {ep.node!r} is not registered: register the node first")
    if not ep.identity:
        ep = dataclasses.replace(
            ep, identity=f"spiffe://{cfg.trust_domain}/ns/{ep.namespace}/sa/{ep.service}"
        )
    elif not ep.identity.startswith(f"spiffe://{cfg.trust_domain}/"):
        raise InputError(
            f"endpoint identity {ep.identity!r} is outside the trust domain {cfg.trust_domain!r}"
        )
    ch.put("endpoints", ep.id, ep)


def _set_endpoint_health(state: State, id_: str, health: Health, ch: _Changes) -> None:
    ep = state.endpoints.get(id_)
    if ep is None:
        raise NotFoundError(f"endpoint {id_!r} is not registered")
    ch.put("endpoints", id_, dataclasses.replace(ep, health=health))


def _node(state: State, name: str) -> Node:
    node = state.nodes.get(name)
    if node is None:
        raise NotFoundError(f"node {name!r} is not registered")
    return node


def _put_node(state: State, cmd: PutNode, cfg: Config, ch: _Changes) -> None:
    old = state.nodes.get(cmd.name)
    for other in state.nodes.values():
        if other.name != cmd.name and other.underlay_address == cmd.underlay_address:
            raise ConflictError(
                f"underlay address {cmd.underlay_address} already belongs to node {other.name!r}"
            )
    try:
        node = Node(
            name=cmd.name,
            underlay_address=cmd.underlay_address,
            vtep_mac=cmd.vtep_mac,
            subnet=old.subnet if old else lease_subnet(state, cfg),
            health=old.health if old else Health.HEALTHY,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    ch.put("nodes", cmd.name, node)


def apply(state: State, command: Command, cfg: Config) -> tuple[State, list[Event]]:
    """The new state and the events that lead to it (none when nothing changed)."""
    ch = _Changes(state)
    match command:
        case PutService():
            _put_service(state, command, cfg, ch)
        case DeleteService(namespace=ns, name=name):
            svc = state.services.get(service_key(ns, name))
            if svc is None:
                raise NotFoundError(f"service {ns}/{name} does not exist")
            for ep in state.endpoints.values():
                if ep.service_key == svc.key:
                    ch.delete("endpoints", ep.id)
            ch.delete("services", svc.key)
        case RegisterEndpoint():
            _register(state, command, cfg, ch)
        case DeregisterEndpoint(id=id_):
            if id_ not in state.endpoints:
                raise NotFoundError(f"endpoint {id_!r} is not registered")
            ch.delete("endpoints", id_)
        case SetEndpointHealth(id=id_, health=health):
            _set_endpoint_health(state, id_, health, ch)
        case PutNode():
            _put_node(state, command, cfg, ch)
        case DeleteNode(name=name):
            _node(state, name)
            for ep in state.endpoints.values():
                if ep.node == name:
                    ch.delete("endpoints", ep.id)
            ch.delete("nodes", name)
        case SetNodeHealth(name=name, health=health):
            ch.put("nodes", name, dataclasses.replace(_node(state, name), health=health))
            if health is not Health.HEALTHY:
                for ep in state.endpoints.values():
                    if ep.node == name and ep.health is Health.HEALTHY:
                        ch.put("endpoints", ep.id, dataclasses.replace(ep, health=Health.UNHEALTHY))
    return ch.result()


def replay(state: State, events: list[Event]) -> State:
    """Apply events (as a watcher receives them) to a state."""
    tables = {kind: dict(getattr(state, name)) for kind, name in TABLES.items()}
    for ev in events:
        table = tables[ev.kind]
        if ev.type is EventType.DELETED:
            table.pop(ev.key, None)
        else:
            table[ev.key] = ev.object
    return State(**{TABLES[k]: t for k, t in tables.items()})
