"""The node helper's only I/O with the kernel: rtnetlink through pyroute2 (never `ip`).

For: reading the part of a network namespace the planner owns (``read_state``) and applying
the planner's operations (``apply``), plus the few calls attach/detach need. Every
operation is safe to repeat: "already exists with the same settings" and "already gone"
are success, a different setting is replaced (``replace`` for neighbours and routes). A
refusal becomes a ``MeshError`` naming the operation and the kernel's reason.

Must never: decide what to change (``node.plan`` does), shell out, or touch links other
than the helper's own and the veths it is asked to manage.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshlet.errors import InputError, MeshError
from node import plan
from node.plan import (
    AddAddress,
    AddFdb,
    CreateBridge,
    CreateVxlan,
    DeleteLink,
    Fdb,
    KernelState,
    Link,
    Neighbour,
    Op,
    RemoveAddress,
    RemoveFdb,
    RemoveNeighbour,
    RemoveRoute,
    Route,
    SetForwarding,
    SetLink,
    SetNeighbour,
    SetRoute,
    VxlanSettings,
)

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4
MAIN_TABLE = 254
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")
NETNS_DIR = Path("/run/netns")
_GONE = {errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL}


class NetlinkOpError(MeshError):
    """The kernel refused an operation."""


# ---- privileges ----------------------------------------------------------------------------------


def has_capability(status_text: str, cap: int) -> bool:
    """Whether /proc/PID/status text shows ``cap`` in the effective set."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def require_net_admin(what: str) -> None:
    """MeshError (exit 1) unless this process holds CAP_NET_ADMIN."""
    status = Path("/proc/self/status").read_text()
    if not has_capability(status, CAP_NET_ADMIN):
        raise MeshError(
            f"{what} needs the NET_ADMIN capability and this process does not have it: run it "
            "as root, or grant it (docker/compose: cap_add: [NET_ADMIN]; systemd: "
            "AmbientCapabilities=CAP_NET_ADMIN)"
        )


def netns_path(netns: str) -> Path:
    """A namespace name (``ip netns``) or a path such as /proc/PID/ns/net."""
    return Path(netns) if "/" in netns else NETNS_DIR / netns


# ---- the socket ----------------------------------------------------------------------------------


def _describe(e: NetlinkError) -> str:
    return os.strerror(e.code) if e.code > 0 else str(e)


class Kernel:
    """One rtnetlink socket, in this network namespace or in ``netns`` (which must exist)."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr: Any = None

    async def __aenter__(self) -> Kernel:
        if self._netns is None:
            self._ipr = AsyncIPRoute()
            return self
        path = netns_path(self._netns)
        if not path.exists():
            raise InputError(
                f"network namespace {self._netns!r} does not exist ({path}): create it first"
            )
        try:
            self._ipr = AsyncIPRoute(netns=str(path), flags=0)
        except OSError as e:
            raise MeshError(
                f"cannot enter network namespace {self._netns!r}: {e.strerror or e}"
            ) from None
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def _call(self, what: str, coro: Any, *, ok: Collection[int] = ()) -> Any:
        try:
            return await coro
        except NetlinkError as e:
            if e.code in ok:
                return None
            hint = " (the helper needs NET_ADMIN)" if e.code == errno.EPERM else ""
            raise NetlinkOpError(f"{what}: {_describe(e)}{hint}") from None

    # ---- links ---------------------------------------------------------------------------------

    async def index(self, name: str) -> int | None:
        found = await self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    async def _link_msg(self, name: str) -> Any:
        index = await self.index(name)
        if index is None:
            return None
        msgs = await self._call(f"read link {name}", self._ipr.link("get", index=index), ok=_GONE)
        return msgs[0] if msgs else None

    async def mtu_of(self, index: int) -> int:
        msgs = await self._call(f"read link {index}", self._ipr.link("get", index=index))
        return int(msgs[0].get("mtu"))

    async def underlay(self, address: str, dev: str | None) -> tuple[int, int]:
        """(ifindex, MTU) of the underlay device: ``dev``, or the one holding ``address``."""
        if dev is not None:
            index = await self.index(dev)
            if index is None:
                raise InputError(f"--underlay-dev {dev}: no such interface in this namespace")
            return index, await self.mtu_of(index)
        async for msg in await self._ipr.addr("dump", family=socket.AF_INET):
            if msg.get("address") == address:
                index = int(msg["index"])
                return index, await self.mtu_of(index)
        raise InputError(
            f"--underlay-address {address} is not an address of this host (network namespace): "
            "give this host's underlay IPv4 address, or --underlay-dev"
        )

    @staticmethod
    def _parse_link(msg: Any, addresses: frozenset[str]) -> Link:
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
        settings = None
        if kind == "vxlan":
            data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
            link = data.get("IFLA_VXLAN_LINK") if data is not None else None
            settings = VxlanSettings(
                vni=int(data.get("IFLA_VXLAN_ID") or 0),
                port=int(data.get("IFLA_VXLAN_PORT") or 0),
                local=str(data.get("IFLA_VXLAN_LOCAL") or ""),
                link=int(link) if link else None,
                learning=bool(data.get("IFLA_VXLAN_LEARNING")),
            )
        master = msg.get("master")
        return Link(
            kind=str(kind),
            mtu=int(msg.get("mtu")),
            mac=str(msg.get("address")),
            up=bool(msg["flags"] & IFF_UP),
            master=int(master) if master else None,
            vxlan=settings,
            addresses=addresses,
        )

    async def _addresses(self, index: int) -> frozenset[str]:
        found = set()
        async for msg in await self._ipr.addr("dump", family=socket.AF_INET):
            if msg["index"] == index:
                found.add(f"{msg.get('address')}/{msg['prefixlen']}")
        return frozenset(found)

    # ---- reading the helper's state ----------------------------------------------------------------

    async def read_state(self) -> KernelState:
        links: dict[str, Link | None] = {}
        indexes: dict[str, int] = {}
        for name in (plan.BRIDGE, plan.VXLAN):
            msg = await self._link_msg(name)
            if msg is None:
                links[name] = None
                continue
            indexes[name] = int(msg["index"])
            links[name] = self._parse_link(msg, await self._addresses(indexes[name]))
        forwarding = forwarding_enabled()
        vx = indexes.get(plan.VXLAN)
        if vx is None:
            return KernelState(forwarding=forwarding, bridge=links[plan.BRIDGE])
        fdb = set()
        async for msg in await self._ipr.fdb("dump", ifindex=vx):
            if msg["ifindex"] == vx and msg.get("NDA_DST"):
                fdb.add(Fdb(mac=str(msg.get("NDA_LLADDR")), dst=str(msg.get("NDA_DST"))))
        neighbours = set()
        async for msg in await self._ipr.neigh("dump", family=socket.AF_INET):
            if msg["ifindex"] == vx and msg.get("NDA_DST"):
                neighbours.add(
                    Neighbour(
                        ip=str(msg.get("NDA_DST")),
                        mac=str(msg.get("NDA_LLADDR") or ""),
                        permanent=bool(msg["state"] & NUD_PERMANENT),
                    )
                )
        routes = set()
        async for msg in await self._ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
            if msg.get("oif") != vx or msg.get("table") != MAIN_TABLE:
                continue
            dst = msg.get("dst") or "0.0.0.0"
            routes.add(
                Route(
                    dst=str(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)),
                    via=str(msg.get("gateway") or ""),
                    onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                    metric=int(msg.get("priority") or 0),
                )
            )
        return KernelState(
            forwarding=forwarding,
            bridge=links[plan.BRIDGE],
            vxlan=links[plan.VXLAN],
            fdb=frozenset(fdb),
            neighbours=frozenset(neighbours),
            routes=frozenset(routes),
        )

    # ---- applying operations -------------------------------------------------------------------

    async def _need(self, name: str) -> int:
        index = await self.index(name)
        if index is None:
            raise NetlinkOpError(f"{name} does not exist (deleted meanwhile?): resync")
        return index

    async def apply(self, op: Op) -> None:
        """Make the kernel do ``op``; repeating it is harmless."""
        ipr = self._ipr
        match op:
            case SetForwarding(enabled=enabled):
                ensure_forwarding(enabled)
            case DeleteLink(name=name):
                index = await self.index(name)
                if index is not None:
                    await self._call(f"delete {name}", ipr.link("del", index=index), ok=_GONE)
            case CreateBridge(name=name, mtu=mtu, mac=mac):
                await self.ensure_link(name, {"kind": "bridge"}, mtu=mtu, mac=mac)
            case CreateVxlan(name=name, settings=s, mtu=mtu, mac=mac):
                spec: dict[str, Any] = {
                    "kind": "vxlan",
                    "vxlan_id": s.vni,
                    "vxlan_port": s.port,
                    "vxlan_learning": int(s.learning),
                    "vxlan_local": s.local,
                }
                if s.link is not None:
                    spec["vxlan_link"] = s.link
                await self.ensure_link(name, spec, mtu=mtu, mac=mac)
            case SetLink(name=name, mtu=mtu, mac=mac):
                await self.ensure_link_settings(name, mtu=mtu, mac=mac)
            case AddAddress(link=name, address=address) | RemoveAddress(link=name, address=address):
                net = ipaddress.IPv4Interface(address)
                command = "add" if isinstance(op, AddAddress) else "del"
                await self._call(
                    f"{command} address {address} on {name}",
                    ipr.addr(
                        command,
                        index=await self._need(name),
                        address=str(net.ip),
                        prefixlen=net.network.prefixlen,
                    ),
                    ok={errno.EEXIST} if command == "add" else _GONE,
                )
            case AddFdb(entry=e) | RemoveFdb(entry=e):
                command = "append" if isinstance(op, AddFdb) else "del"
                await self._call(
                    f"fdb {command} {e.mac} dst {e.dst}",
                    ipr.fdb(
                        command,
                        ifindex=await self._need(plan.VXLAN),
                        lladdr=e.mac,
                        dst=e.dst,
                        state=NUD_PERMANENT,
                    ),
                    ok={errno.EEXIST} if command == "append" else _GONE,
                )
            case SetNeighbour(entry=n):
                await self._call(
                    f"neighbour {n.ip} lladdr {n.mac}",
                    ipr.neigh(
                        "replace",
                        ifindex=await self._need(plan.VXLAN),
                        dst=n.ip,
                        lladdr=n.mac,
                        state=NUD_PERMANENT,
                    ),
                )
            case RemoveNeighbour(ip=ip):
                await self._call(
                    f"delete neighbour {ip}",
                    ipr.neigh("del", ifindex=await self._need(plan.VXLAN), dst=ip),
                    ok=_GONE,
                )
            case SetRoute(entry=r):
                spec = {"dst": r.dst, "gateway": r.via, "table": MAIN_TABLE}
                if r.onlink:
                    spec["flags"] = RTNH_F_ONLINK
                if r.metric:
                    spec["priority"] = r.metric
                await self._call(
                    f"route {r.dst} via {r.via}",
                    ipr.route("replace", oif=await self._need(plan.VXLAN), **spec),
                )
            case RemoveRoute(dst=dst, metric=metric):
                spec = {"dst": dst, "table": MAIN_TABLE}
                if metric:
                    spec["priority"] = metric
                await self._call(f"delete route {dst}", ipr.route("del", **spec), ok=_GONE)

    async def ensure_link(self, name: str, spec: dict[str, Any], *, mtu: int, mac: str) -> int:
        """Create link ``name`` (an existing one is fine), then make it match and bring it up."""
        what = f"create {spec['kind']} {name}"
        await self._call(
            what,
            self._ipr.link("add", ifname=name, mtu=mtu, address=mac, **spec),
            ok={errno.EEXIST},
        )
        if await self.index(name) is None:  # EEXIST, yet not under this name
            raise NetlinkOpError(
                f"{what}: another device already has these settings (for VXLAN: the same VNI "
                "and port): delete it, or choose another --vni or --port"
            )
        return await self.ensure_link_settings(name, mtu=mtu, mac=mac)

    async def ensure_link_settings(
        self, name: str, *, mtu: int, mac: str | None = None, master: int = 0
    ) -> int:
        """MTU, MAC, master (0: none) as given, and up."""
        msg = await self._link_msg(name)
        if msg is None:
            raise NetlinkOpError(f"{name} does not exist (deleted meanwhile?): resync")
        index = int(msg["index"])
        ipr = self._ipr
        if mac is not None and msg.get("address") != mac:
            await self._call(f"set {name} down", ipr.link("set", index=index, state="down"))
            await self._call(f"set {name} address", ipr.link("set", index=index, address=mac))
        if int(msg.get("mtu")) != mtu:
            await self._call(f"set {name} mtu {mtu}", ipr.link("set", index=index, mtu=mtu))
        if int(msg.get("master") or 0) != master:
            await self._call(f"set {name} master", ipr.link("set", index=index, master=master))
        await self._call(f"set {name} up", ipr.link("set", index=index, state="up"))
        return index

    # ---- for attach / detach ------------------------------------------------------------------

    async def add_veth(self, name: str, peer: str, peer_netns: str, *, mtu: int) -> None:
        """A veth pair: ``name`` here, ``peer`` born inside ``peer_netns``."""
        fd = os.open(netns_path(peer_netns), os.O_RDONLY)
        try:
            await self._call(
                f"create veth {name} with {peer} in {peer_netns}",
                self._ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    mtu=mtu,
                    peer={"ifname": peer, "net_ns_fd": fd, "mtu": mtu},
                ),
            )
        finally:
            os.close(fd)

    async def delete_link(self, name: str) -> bool:
        """Delete ``name`` if it exists; whether it did."""
        index = await self.index(name)
        if index is None:
            return False
        await self._call(f"delete {name}", self._ipr.link("del", index=index), ok=_GONE)
        return True

    async def link_kind(self, name: str) -> str | None:
        msg = await self._link_msg(name)
        if msg is None:
            return None
        return str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "")

    async def ipv4_addresses(self, name: str) -> frozenset[str]:
        index = await self.index(name)
        return frozenset() if index is None else await self._addresses(index)

    async def ensure_interface(self, name: str, address: str, *, mtu: int) -> None:
        """``name`` has exactly the IPv4 address ``address`` (a.b.c.d/len), this MTU, is up."""
        index = await self._need(name)
        for other in await self._addresses(index) - {address}:
            net = ipaddress.IPv4Interface(other)
            await self._call(
                f"delete address {other} on {name}",
                self._ipr.addr(
                    "del", index=index, address=str(net.ip), prefixlen=net.network.prefixlen
                ),
                ok=_GONE,
            )
        net = ipaddress.IPv4Interface(address)
        await self._call(
            f"add address {address} on {name}",
            self._ipr.addr(
                "add", index=index, address=str(net.ip), prefixlen=net.network.prefixlen
            ),
            ok={errno.EEXIST},
        )
        await self.ensure_link_settings(name, mtu=mtu)
        lo = await self.index("lo")
        if lo is not None:
            await self._call("set lo up", self._ipr.link("set", index=lo, state="up"))

    async def ensure_default_route(self, name: str, gateway: str) -> None:
        await self._call(
            f"default route via {gateway} dev {name}",
            self._ipr.route(
                "replace",
                dst="0.0.0.0/0",
                gateway=gateway,
                oif=await self._need(name),
                table=MAIN_TABLE,
            ),
        )


def forwarding_enabled() -> bool:
    return FORWARDING.read_text().strip() == "1"


def ensure_forwarding(enabled: bool) -> None:
    """net.ipv4.ip_forward of this network namespace (a /proc/sys file, not a command)."""
    value = "1" if enabled else "0"
    try:
        if FORWARDING.read_text().strip() != value:
            FORWARDING.write_text(value + "\n")
    except OSError as e:
        raise NetlinkOpError(
            f"cannot set net.ipv4.ip_forward={value} ({e.strerror}): the overlay routes "
            "containers' packets through this host; enable it (sysctl -w "
            "net.ipv4.ip_forward=1) or run the helper as root with /proc/sys writable"
        ) from None
