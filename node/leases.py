"""Container address leases on one node: which network namespace has which address of the
node's subnet, and the next free one.

For: `meshlet node attach` / `detach`. A lease table is a value (``Leases``) with its JSON
shape; ``next_free`` hands out the lowest address that is neither the subnet's network
address (the VTEP's), its gateway (the bridge's), its broadcast address nor leased, so a
freed address is the first one reused. ``host_interface`` names the bridge end of a
container's veth pair from its namespace name (stable, at most 15 characters).

Must never: do I/O or touch the kernel; the caller reads and writes the file under a lock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshlet.errors import ConflictError, InputError

VERSION = 1
HOST_IF_PREFIX = "mv"


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    netns: str
    address: str  # a.b.c.d, in the node's subnet
    service: str  # NS/NAME
    host_interface: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Leases:
    subnet: str
    by_netns: Mapping[str, Lease] = field(default_factory=dict)

    def with_lease(self, lease: Lease) -> Leases:
        return Leases(subnet=self.subnet, by_netns={**self.by_netns, lease.netns: lease})

    def without(self, netns: str) -> Leases:
        return Leases(
            subnet=self.subnet, by_netns={k: v for k, v in self.by_netns.items() if k != netns}
        )


def host_interface(netns: str) -> str:
    """The bridge-side veth name for ``netns``: ``mv`` + 12 hex digits of its hash."""
    return HOST_IF_PREFIX + hashlib.sha256(netns.encode()).hexdigest()[:12]


def next_free(leases: Leases) -> str:
    """The lowest address of the subnet that is free for a container."""
    net = ipaddress.IPv4Network(leases.subnet)
    reserved = {net.network_address, net.network_address + 1, net.broadcast_address}
    used = {ipaddress.IPv4Address(lease.address) for lease in leases.by_netns.values()}
    for host in net.hosts():
        if host not in reserved and host not in used:
            return str(host)
    raise ConflictError(
        f"the node's subnet {leases.subnet} has no free address for another container "
        f"({len(used)} attached): detach containers that are gone"
    )


def rebase(leases: Leases, subnet: str) -> Leases:
    """The table for ``subnet``: leases outside it are dropped (the node got a new subnet)."""
    if subnet == leases.subnet:
        return leases
    net = ipaddress.IPv4Network(subnet)
    kept = {k: v for k, v in leases.by_netns.items() if ipaddress.IPv4Address(v.address) in net}
    return Leases(subnet=subnet, by_netns=kept)


def encode(leases: Leases) -> bytes:
    body = {
        "version": VERSION,
        "subnet": leases.subnet,
        "leases": [
            {
                "netns": lease.netns,
                "address": lease.address,
                "service": lease.service,
                "host_interface": lease.host_interface,
            }
            for lease in sorted(leases.by_netns.values(), key=lambda x: x.netns)
        ],
    }
    return orjson.dumps(body, option=orjson.OPT_INDENT_2)


def decode(raw: bytes, *, source: str) -> Leases:
    """The table in a lease file; InputError saying what is wrong with it."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{source} is not valid JSON: {e}: move it away to start over") from None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise InputError(f"{source} is not a version-{VERSION} lease file: move it away")
    try:
        subnet = str(ipaddress.IPv4Network(body["subnet"]))
        items = body["leases"]
        leases = [
            Lease(
                netns=str(item["netns"]),
                address=str(ipaddress.IPv4Address(item["address"])),
                service=str(item["service"]),
                host_interface=str(item["host_interface"]),
            )
            for item in items
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{source} is damaged ({e!r}): move it away to start over") from None
    return Leases(subnet=subnet, by_netns={lease.netns: lease for lease in leases})
