"""The overlay planner: the kernel state a node wants, and the operations that get there.

For: the node helper. ``desired_state(local, nodes)`` turns this host's settings and the
control plane's node map into a ``KernelState``; ``plan(current, desired)`` compares it with
what the netlink layer read and returns the operations that make the kernel match, in an
order the kernel accepts; ``simulate(state, ops)`` is the same operations applied to a
value (the property tests check ``simulate(current, plan(current, desired)) == desired``
and that planning again yields nothing).

The layout is flannel's VXLAN backend (routed, not one big L2 segment):

- bridge ``mesh0`` holds the node's containers and the subnet's first address (the
  gateway, ``198.19.N.1/24``); its MAC is fixed, so containers' ARP caches stay right;
- VXLAN device ``mesh-vxlan`` (VNI, dstport 4789, nolearning, local = the underlay address,
  on the underlay device, MTU = underlay MTU - 50) is *not* a bridge port; it holds the
  subnet's network address as its VTEP address (``198.19.N.0/32``, as flannel.1 does) and
  has a MAC derived from the underlay address (``02:4d:`` + the four address bytes), so it
  is known before the device exists and survives a re-creation;
- for every other node: FDB ``VTEP MAC → its underlay`` (where to tunnel) and
  ``00:00:00:00:00:00 → its underlay`` (head-end replication of what floods), a permanent
  neighbour ``its VTEP address → its VTEP MAC`` (no ARP across the overlay) and a route
  ``its subnet via its VTEP address dev mesh-vxlan onlink``;
- IPv4 forwarding on: a packet from a container is routed by this host onto the VXLAN
  device, and by the other host from its VXLAN device onto its bridge.

Everything on ``mesh-vxlan`` belongs to the helper: an entry that no node explains is
stale and removed. Nodes are programmed whatever their health (a node whose helper is
silent still forwards); only a node that leaves the map is removed.

Must never: do I/O, import asyncio, sockets or pyroute2, or read the clock.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshlet.model import Node

BRIDGE = "mesh0"
VXLAN = "mesh-vxlan"
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
FLOOD_MAC = "00:00:00:00:00:00"
VTEP_MAC_PREFIX = "02:4d"
BRIDGE_MAC_PREFIX = "02:4e"
MIN_MTU = 576


# ---- the state: what the kernel has (or should have) ------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VxlanSettings:
    """What a VXLAN device is created with (changing any of it means re-creating it)."""

    vni: int
    port: int
    local: str
    link: int | None  # ifindex of the underlay device
    learning: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    kind: str  # "bridge", "vxlan", or whatever else holds the name
    mtu: int
    mac: str
    up: bool
    master: int | None = None
    vxlan: VxlanSettings | None = None
    addresses: frozenset[str] = frozenset()  # IPv4 "a.b.c.d/len"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Fdb:
    mac: str
    dst: str


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Neighbour:
    ip: str
    mac: str
    permanent: bool = True


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Route:
    dst: str  # "a.b.c.d/len"
    via: str
    onlink: bool = True
    metric: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelState:
    """The part of a network namespace the helper owns. Entries live on the VXLAN device,
    so without it there are none."""

    forwarding: bool
    bridge: Link | None = None
    vxlan: Link | None = None
    fdb: frozenset[Fdb] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()  # at most one per ip
    routes: frozenset[Route] = frozenset()  # at most one per (dst, metric)


# ---- operations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SetForwarding:
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteLink:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateBridge:
    name: str
    mtu: int
    mac: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateVxlan:
    name: str
    settings: VxlanSettings
    mtu: int
    mac: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetLink:
    """Make an existing link's MTU and MAC these, take it out of any bridge, bring it up."""

    name: str
    mtu: int
    mac: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AddAddress:
    link: str
    address: str  # "a.b.c.d/len"


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveAddress:
    link: str
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AddFdb:
    entry: Fdb


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveFdb:
    entry: Fdb


@dataclass(frozen=True, slots=True, kw_only=True)
class SetNeighbour:
    entry: Neighbour


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveNeighbour:
    ip: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetRoute:
    entry: Route


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveRoute:
    dst: str
    metric: int


Op = (
    SetForwarding
    | DeleteLink
    | CreateBridge
    | CreateVxlan
    | SetLink
    | AddAddress
    | RemoveAddress
    | AddFdb
    | RemoveFdb
    | SetNeighbour
    | RemoveNeighbour
    | SetRoute
    | RemoveRoute
)


# ---- what this node wants ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalNode:
    """This host, as the helper found it (the underlay) and was told (the subnet)."""

    name: str
    underlay_address: str
    underlay_index: int
    underlay_mtu: int
    vni: int
    port: int
    subnet: str  # the /24 leased by the control plane

    @property
    def mtu(self) -> int:
        return overlay_mtu(self.underlay_mtu)


def overlay_mtu(underlay_mtu: int) -> int:
    return max(MIN_MTU, underlay_mtu - VXLAN_OVERHEAD)


def _mac(prefix: str, address: str) -> str:
    packed = ipaddress.IPv4Address(address).packed
    return prefix + "".join(f":{b:02x}" for b in packed)


def vtep_mac(underlay_address: str) -> str:
    """The VXLAN device's MAC: stable for the host, unique per underlay address."""
    return _mac(VTEP_MAC_PREFIX, underlay_address)


def bridge_mac(subnet: str) -> str:
    """The bridge's MAC, fixed so it never follows its ports (unique per subnet)."""
    return _mac(BRIDGE_MAC_PREFIX, gateway(subnet))


def gateway(subnet: str) -> str:
    """The subnet's first address: the bridge's, and the containers' default route."""
    return str(ipaddress.IPv4Network(subnet)[1])


def vtep_address(subnet: str) -> str:
    """The subnet's network address, held by the VXLAN device (flannel's VTEP address)."""
    return str(ipaddress.IPv4Network(subnet).network_address)


def peers(local: LocalNode, nodes: Iterable[Node]) -> list[Node]:
    """The other nodes this one tunnels to: leased, not itself, not sharing its addresses."""
    mine = ipaddress.IPv4Network(local.subnet)
    found: dict[str, Node] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name == local.name or node.subnet is None:
            continue
        if node.underlay_address == local.underlay_address:
            continue
        if ipaddress.IPv4Network(node.subnet).overlaps(mine):
            continue
        found.setdefault(node.subnet, node)  # the registry never leases a subnet twice
    return list(found.values())


def desired_state(local: LocalNode, nodes: Iterable[Node]) -> KernelState:
    net = ipaddress.IPv4Network(local.subnet)
    bridge = Link(
        kind="bridge",
        mtu=local.mtu,
        mac=bridge_mac(local.subnet),
        up=True,
        addresses=frozenset({f"{gateway(local.subnet)}/{net.prefixlen}"}),
    )
    vxlan = Link(
        kind="vxlan",
        mtu=local.mtu,
        mac=vtep_mac(local.underlay_address),
        up=True,
        vxlan=VxlanSettings(
            vni=local.vni, port=local.port, local=local.underlay_address, link=local.underlay_index
        ),
        addresses=frozenset({f"{vtep_address(local.subnet)}/32"}),
    )
    fdb: set[Fdb] = set()
    neighbours: set[Neighbour] = set()
    routes: set[Route] = set()
    for peer in peers(local, nodes):
        assert peer.subnet is not None
        hop = vtep_address(peer.subnet)
        fdb.add(Fdb(mac=peer.vtep_mac, dst=peer.underlay_address))
        fdb.add(Fdb(mac=FLOOD_MAC, dst=peer.underlay_address))
        neighbours.add(Neighbour(ip=hop, mac=peer.vtep_mac))
        routes.add(Route(dst=str(ipaddress.IPv4Network(peer.subnet)), via=hop))
    return KernelState(
        forwarding=True,
        bridge=bridge,
        vxlan=vxlan,
        fdb=frozenset(fdb),
        neighbours=frozenset(neighbours),
        routes=frozenset(routes),
    )


def teardown_state(current: KernelState) -> KernelState:
    """No bridge, no VXLAN device, nothing on them; forwarding left as it is."""
    return KernelState(forwarding=current.forwarding)


# ---- the planner -------------------------------------------------------------------------------


def plan(current: KernelState, desired: KernelState) -> list[Op]:
    """The operations that turn ``current`` into ``desired`` (none when they are equal)."""
    ops: list[Op] = []
    if current.forwarding != desired.forwarding:
        ops.append(SetForwarding(enabled=desired.forwarding))
    ops += _plan_link(BRIDGE, current.bridge, desired.bridge)
    vxlan_ops = _plan_link(VXLAN, current.vxlan, desired.vxlan)
    ops += vxlan_ops
    if desired.vxlan is None:
        return ops  # deleting the device deletes every entry on it
    have = current
    if current.vxlan is None or any(isinstance(op, DeleteLink) for op in vxlan_ops):
        have = KernelState(forwarding=current.forwarding)  # a new device starts empty
    ops += _plan_entries(have, desired)
    return ops


def _needs_new(current: Link, desired: Link) -> bool:
    return current.kind != desired.kind or current.vxlan != desired.vxlan


def _create(name: str, link: Link) -> Op:
    if link.kind == "vxlan":
        assert link.vxlan is not None, "a desired VXLAN link has settings"
        return CreateVxlan(name=name, settings=link.vxlan, mtu=link.mtu, mac=link.mac)
    return CreateBridge(name=name, mtu=link.mtu, mac=link.mac)


def _plan_link(name: str, current: Link | None, desired: Link | None) -> list[Op]:
    if desired is None:
        return [DeleteLink(name=name)] if current is not None else []
    if current is None or _needs_new(current, desired):
        ops: list[Op] = [] if current is None else [DeleteLink(name=name)]
        ops.append(_create(name, desired))
        ops += [AddAddress(link=name, address=a) for a in sorted(desired.addresses)]
        return ops
    ops = []
    if (current.mtu, current.mac, current.up, current.master) != (
        desired.mtu,
        desired.mac,
        desired.up,
        desired.master,
    ):
        ops.append(SetLink(name=name, mtu=desired.mtu, mac=desired.mac))
    ops += [
        RemoveAddress(link=name, address=a) for a in sorted(current.addresses - desired.addresses)
    ]
    ops += [AddAddress(link=name, address=a) for a in sorted(desired.addresses - current.addresses)]
    return ops


def _plan_entries(current: KernelState, desired: KernelState) -> list[Op]:
    """Stale entries first (routes, neighbours, FDB), then what is missing (FDB, neighbours,
    routes): a route is only added once its next hop resolves."""
    ops: list[Op] = []
    want_routes = {(r.dst, r.metric): r for r in desired.routes}
    want_neigh = {n.ip: n for n in desired.neighbours}
    for r in sorted(current.routes - desired.routes):
        if (r.dst, r.metric) not in want_routes:  # else SetRoute replaces it in place
            ops.append(RemoveRoute(dst=r.dst, metric=r.metric))
    for n in sorted(current.neighbours - desired.neighbours):
        if n.ip not in want_neigh:
            ops.append(RemoveNeighbour(ip=n.ip))
    ops += [RemoveFdb(entry=f) for f in sorted(current.fdb - desired.fdb)]
    ops += [AddFdb(entry=f) for f in sorted(desired.fdb - current.fdb)]
    ops += [SetNeighbour(entry=n) for n in sorted(desired.neighbours - current.neighbours)]
    ops += [SetRoute(entry=r) for r in sorted(desired.routes - current.routes)]
    return ops


# ---- the operations, applied to a value (what the kernel does with them) ------------------------


class PlanError(Exception):
    """An operation the kernel would refuse in this state (a planner bug)."""


def simulate(state: KernelState, ops: Sequence[Op]) -> KernelState:
    for op in ops:
        state = _step(state, op)
    return state


def _link_field(name: str) -> str:
    if name not in (BRIDGE, VXLAN):
        raise PlanError(f"{name} is not a link the helper owns")
    return "bridge" if name == BRIDGE else "vxlan"


def _with_link(state: KernelState, name: str, link: Link | None) -> KernelState:
    if _link_field(name) == "bridge":
        return dataclasses.replace(state, bridge=link)
    return dataclasses.replace(state, vxlan=link)


def _existing(state: KernelState, name: str) -> Link:
    link: Link | None = getattr(state, _link_field(name))
    if link is None:
        raise PlanError(f"{name} does not exist")
    return link


def _vxlan_up(state: KernelState, op: Op) -> None:
    if state.vxlan is None or not state.vxlan.up:
        raise PlanError(f"{op} needs {VXLAN} to exist and be up")


def _step(state: KernelState, op: Op) -> KernelState:
    match op:
        case SetForwarding(enabled=enabled):
            return dataclasses.replace(state, forwarding=enabled)
        case DeleteLink(name=name):
            _existing(state, name)
            state = _with_link(state, name, None)
            if name == VXLAN:
                state = KernelState(forwarding=state.forwarding, bridge=state.bridge)
            return state
        case CreateBridge(name=name, mtu=mtu, mac=mac) | CreateVxlan(name=name, mtu=mtu, mac=mac):
            if getattr(state, _link_field(name)) is not None:
                raise PlanError(f"{name} exists already")
            kind = "vxlan" if isinstance(op, CreateVxlan) else "bridge"
            settings = op.settings if isinstance(op, CreateVxlan) else None
            link = Link(kind=kind, mtu=mtu, mac=mac, up=True, vxlan=settings)
            return _with_link(state, name, link)
        case SetLink(name=name, mtu=mtu, mac=mac):
            link = dataclasses.replace(
                _existing(state, name), mtu=mtu, mac=mac, up=True, master=None
            )
            return _with_link(state, name, link)
        case AddAddress(link=name, address=address):
            link = _existing(state, name)
            link = dataclasses.replace(link, addresses=link.addresses | {address})
            return _with_link(state, name, link)
        case RemoveAddress(link=name, address=address):
            link = _existing(state, name)
            link = dataclasses.replace(link, addresses=link.addresses - {address})
            return _with_link(state, name, link)
        case AddFdb(entry=entry):
            _vxlan_up(state, op)
            return dataclasses.replace(state, fdb=state.fdb | {entry})
        case RemoveFdb(entry=entry):
            return dataclasses.replace(state, fdb=state.fdb - {entry})
        case SetNeighbour(entry=entry):
            _vxlan_up(state, op)
            others = frozenset(n for n in state.neighbours if n.ip != entry.ip)
            return dataclasses.replace(state, neighbours=others | {entry})
        case RemoveNeighbour(ip=ip):
            return dataclasses.replace(
                state, neighbours=frozenset(n for n in state.neighbours if n.ip != ip)
            )
        case SetRoute(entry=entry):
            _vxlan_up(state, op)
            if entry.via not in {n.ip for n in state.neighbours}:
                raise PlanError(f"{op}: its next hop has no neighbour entry yet")
            key = (entry.dst, entry.metric)
            routes = frozenset(r for r in state.routes if (r.dst, r.metric) != key)
            return dataclasses.replace(state, routes=routes | {entry})
        case RemoveRoute(dst=dst, metric=metric):
            key = (dst, metric)
            return dataclasses.replace(
                state, routes=frozenset(r for r in state.routes if (r.dst, r.metric) != key)
            )
    raise PlanError(f"unknown operation {op!r}")
