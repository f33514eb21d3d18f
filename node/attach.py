"""`meshlet node attach` / `detach`: plug a container's network namespace into the node.

For: the lab and compose, which create a namespace per container and then call attach.
Attach makes a veth pair whose bridge end (``mv`` + hash of the namespace) joins ``mesh0``
and whose other end is born inside the container's namespace as ``eth0``; gives it the
next free address of the node's /24 (``node.leases``), the overlay MTU and a default route
via the gateway; records the lease in STATE_DIR/NODE.leases.json (under NODE.lock) and
returns it. Attaching a namespace that is attached already converges to the same lease.
Detach deletes the pair (from the container's side when its namespace still exists, so it
works from anywhere) and frees the address; detaching twice is fine. Leases of namespaces
that no longer exist are freed on the next attach.

Must never: hand out an address twice, touch an ``eth0`` that is not the one it made, or
create a network namespace (a wrong name is an error).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from certs.files import PUBLIC, write_files
from meshlet.errors import InputError, MeshError
from meshlet.model import check_dns_label
from node import leases as lease_table
from node import state
from node.leases import Lease, Leases
from node.netlink import Kernel, netns_path, require_net_admin

log = logging.getLogger(__name__)

CONTAINER_IF = "eth0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attached:
    node: str
    netns: str
    service: str
    address: str
    prefixlen: int
    gateway: str
    interface: str
    host_interface: str
    bridge: str
    mtu: int

    def to_data(self) -> dict[str, object]:
        return {
            "node": self.node,
            "netns": self.netns,
            "service": self.service,
            "address": self.address,
            "prefixlen": self.prefixlen,
            "gateway": self.gateway,
            "interface": self.interface,
            "host_interface": self.host_interface,
            "bridge": self.bridge,
            "mtu": self.mtu,
        }


def check_service(text: str) -> str:
    namespace, slash, name = text.partition("/")
    if not slash:
        raise InputError(f"--service {text!r} must be NS/NAME, like shop/orders")
    for value, what in ((namespace, "namespace"), (name, "service name")):
        try:
            check_dns_label(value, what)
        except ValueError as e:
            raise InputError(f"--service: {e}") from None
    return text


def check_netns(netns: str) -> str:
    if not netns or netns in (".", "..") or ("/" in netns and not netns.startswith("/")):
        raise InputError(
            f"--netns {netns!r} must be a namespace name (ip netns) or an absolute path such "
            "as /proc/PID/ns/net"
        )
    return netns


def _read_leases(path: Path, subnet: str) -> Leases:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Leases(subnet=subnet)
    return lease_table.rebase(lease_table.decode(raw, source=str(path)), subnet)


def _write_leases(state_dir: Path, node: str, table: Leases) -> None:
    path = state.leases_path(state_dir, node)
    write_files(state_dir, {path.name: (lease_table.encode(table), PUBLIC)})


def _prune(table: Leases) -> Leases:
    """Forget namespaces that no longer exist (their veth pairs went with them)."""
    for netns in list(table.by_netns):
        if not netns_path(netns).exists():
            log.info("freeing the lease of a namespace that is gone", extra={"netns": netns})
            table = table.without(netns)
    return table


async def attach(*, state_dir: Path, node: str | None, netns: str, service: str) -> Attached:
    require_net_admin("meshlet node attach")
    check_netns(netns)
    check_service(service)
    info = state.read_info(state_dir, node)
    if not netns_path(netns).exists():
        raise InputError(
            f"network namespace {netns!r} does not exist ({netns_path(netns)}): create it first"
        )
    prefixlen = int(info.subnet.rsplit("/", 1)[1])
    host_if = lease_table.host_interface(netns)
    with state.locked(state_dir, info.name):
        path = state.leases_path(state_dir, info.name)
        table = _prune(_read_leases(path, info.subnet))
        lease = table.by_netns.get(netns)
        async with Kernel() as here:
            bridge = await here.index(info.bridge)
            if bridge is None:
                raise MeshError(
                    f"there is no bridge {info.bridge} in this network namespace: run `meshlet "
                    f"node attach` where `meshlet node run --name {info.name}` runs (e.g. "
                    "nsenter --net=...), after it has started"
                )
            if lease is None:
                await here.delete_link(host_if)  # left by an attach that failed half-way
                lease = Lease(
                    netns=netns,
                    address=lease_table.next_free(table),
                    service=service,
                    host_interface=host_if,
                )
            if await here.index(host_if) is None:
                await _fresh_eth0(netns, lease.address)
                await here.add_veth(host_if, CONTAINER_IF, netns, mtu=info.mtu)
            try:
                await here.ensure_link_settings(host_if, mtu=info.mtu, master=bridge)
                async with Kernel(netns) as inside:
                    await inside.ensure_interface(
                        CONTAINER_IF, f"{lease.address}/{prefixlen}", mtu=info.mtu
                    )
                    await inside.ensure_default_route(CONTAINER_IF, info.gateway)
            except BaseException:
                if netns not in table.by_netns:  # a new attachment: leave nothing behind
                    with contextlib.suppress(MeshError):
                        await here.delete_link(host_if)
                raise
        if table.by_netns.get(netns) != lease:
            _write_leases(state_dir, info.name, table.with_lease(lease))
    log.info(
        "attached",
        extra={"netns": netns, "service": service, "address": lease.address, "node": info.name},
    )
    return Attached(
        node=info.name,
        netns=netns,
        service=service,
        address=lease.address,
        prefixlen=prefixlen,
        gateway=info.gateway,
        interface=CONTAINER_IF,
        host_interface=host_if,
        bridge=info.bridge,
        mtu=info.mtu,
    )


async def _fresh_eth0(netns: str, address: str) -> None:
    """Before a new pair: an ``eth0`` in the namespace is refused, unless it is a veth left
    by an earlier attach of the same address (then it goes)."""
    async with Kernel(netns) as inside:
        kind = await inside.link_kind(CONTAINER_IF)
        if kind is None:
            return
        mine = kind == "veth" and any(
            a.split("/")[0] == address for a in await inside.ipv4_addresses(CONTAINER_IF)
        )
        if not mine:
            raise MeshError(
                f"network namespace {netns!r} already has an {CONTAINER_IF} ({kind or 'unknown'} "
                "device) that meshlet did not make: attach a fresh namespace"
            )
        await inside.delete_link(CONTAINER_IF)


@dataclass(frozen=True, slots=True, kw_only=True)
class Detached:
    netns: str
    address: str | None  # the freed address; None when nothing was attached

    def to_data(self) -> dict[str, object]:
        return {"netns": self.netns, "address": self.address, "detached": self.address is not None}


def _node_for_detach(state_dir: Path, node: str | None) -> str:
    if node is not None:
        return node
    names = set(state.node_names(state_dir))
    names |= {
        p.name.removesuffix(state.LEASES_SUFFIX)
        for p in state_dir.glob(f"*{state.LEASES_SUFFIX}")
        if not p.name.startswith(".")
    }
    if len(names) == 1:
        return names.pop()
    if not names:
        raise InputError(f"no node in {state_dir}: pass --state-dir (and --name) as for attach")
    raise InputError(f"{state_dir} holds several nodes ({', '.join(sorted(names))}): pass --name")


async def detach(*, state_dir: Path, node: str | None, netns: str) -> Detached:
    require_net_admin("meshlet node detach")
    check_netns(netns)
    name = _node_for_detach(state_dir, node)
    host_if = lease_table.host_interface(netns)
    with state.locked(state_dir, name):
        path = state.leases_path(state_dir, name)
        try:
            table: Leases | None = lease_table.decode(path.read_bytes(), source=str(path))
        except FileNotFoundError:
            table = None
        lease = table.by_netns.get(netns) if table is not None else None
        if lease is not None and netns_path(netns).exists():
            async with Kernel(netns) as inside:
                addresses = await inside.ipv4_addresses(CONTAINER_IF)
                if await inside.link_kind(CONTAINER_IF) == "veth" and any(
                    a.split("/")[0] == lease.address for a in addresses
                ):
                    await inside.delete_link(CONTAINER_IF)  # takes the bridge end with it
        async with Kernel() as here:
            await here.delete_link(host_if)
        if table is not None and lease is not None:
            _write_leases(state_dir, name, table.without(netns))
    if lease is not None:
        log.info("detached", extra={"netns": netns, "address": lease.address, "node": name})
    return Detached(netns=netns, address=lease.address if lease is not None else None)
