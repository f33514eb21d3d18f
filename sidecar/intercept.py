"""Traffic interception for one container, decided as an nftables script.

Pure: an ``InterceptConfig`` (parsed and validated here, at the edge) becomes the text
that ``nft -f -`` applies (``ruleset``) or the text that takes it away (``removal``).
This module must never run nft, open sockets or read the system; ``sidecar/nft.py``
applies what it decides.

What the rules do, in the container's network namespace (first match wins):

1. the sidecar's own traffic (socket owner ``--proxy-uid``, or packet mark
   ``--proxy-mark`` set with SO_MARK) is left alone, so the sidecar never captures itself;
2. nothing whose source port is the inbound port (15006) is captured;
3. DNS (UDP and TCP port 53, to any address) goes to the sidecar's DNS (``--dns``) by
   DNAT. NAT cannot change the address family, so only DNS of the ``--dns`` address's
   family is captured; DNS of the other family goes where the app sent it;
4. traffic that stays in the namespace (out via ``lo``: 127.0.0.0/8, ::1 and the
   container's own addresses) is left alone, unless ``capture_loopback``;
5. excluded destination ports and CIDRs are left alone;
6. every other new TCP connection, IPv4 or IPv6, is redirected to the outbound
   listener (15001), where SO_ORIGINAL_DST gives the VIP:port the app dialled.

The chain hooks NAT ``output``, which sees only the first packet of each new locally
made connection: replies, connections the sidecar accepted (inbound 15006) and
forwarded traffic never pass through it. Inbound is not captured at all: peers dial
the inbound port explicitly.

The rules live in their own table, ``inet meshlet``, so removal is deleting that table
and no other table is ever touched. Every script starts with ``table inet meshlet {}``
(declare: a no-op if it exists) and ``delete table inet meshlet``, then declares the
whole table; ``nft -f`` runs a file as one transaction, so applying twice leaves one
set of rules, and there is no moment with half of them.

DNAT to a loopback DNS address (127.0.0.53) needs no ``route_localnet``: a locally
made packet rerouted to ``lo`` by the output hook keeps its route and is never
checked as a martian (verified by tests/integration/test_interception_netns.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from meshlet.errors import InputError

TABLE = "meshlet"
FAMILY = "inet"
CHAIN = "output"
# nft's symbolic "dstnat" is only valid on prerouting; output NAT uses the number. Below
# -100 (where iptables-nft's nat OUTPUT chain sits, e.g. Docker's embedded-DNS DNAT) so
# our redirect runs first whatever order the rules were loaded in.
PRIORITY = -110
DNS_PORT = 53

PREAMBLE = f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"

_MAX_PORT = 65535
_MAX_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptConfig:
    """What ``meshlet sidecar init`` installs. Lists are normalised (sorted, unique)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    dns: tuple[str, int] | None = None
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    proxy_uid: int | None = None
    proxy_mark: int = 0x539
    capture_loopback: bool = False

    def __post_init__(self) -> None:
        _check_port(self.outbound_port, "--outbound-port")
        _check_port(self.inbound_port, "--inbound-port")
        if self.outbound_port == self.inbound_port:
            raise InputError(
                f"--inbound-port {self.inbound_port} is the same as --outbound-port: "
                "the two listeners need different ports"
            )
        if self.dns is not None:
            host, port = self.dns
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                raise InputError(f"--dns {host!r} is not an IP address") from None
            _check_port(port, "--dns port")
            object.__setattr__(self, "dns", (str(addr), port))
        for port in self.exclude_ports:
            _check_port(port, "--exclude-ports")
        object.__setattr__(self, "exclude_ports", tuple(sorted(set(self.exclude_ports))))
        networks = sorted(
            {_network(text) for text in self.exclude_cidrs},
            key=lambda n: (n.version, n.network_address, n.prefixlen),
        )
        object.__setattr__(self, "exclude_cidrs", tuple(str(n) for n in networks))
        if self.proxy_uid is not None and (
            not _is_int(self.proxy_uid) or not 0 <= self.proxy_uid < _MAX_U32
        ):
            raise InputError(f"--proxy-uid {self.proxy_uid!r} is not a user id (0-4294967294)")
        if not _is_int(self.proxy_mark) or not 0 < self.proxy_mark <= _MAX_U32:
            raise InputError(
                f"--proxy-mark {self.proxy_mark!r} must be 1-0xffffffff "
                "(0 is every unmarked packet: it would exempt all traffic)"
            )


def parse_dns(text: str) -> tuple[str, int]:
    """``ADDR`` or ``ADDR:PORT`` (``[v6]:PORT`` for IPv6) → ``(address, port)``."""
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]"))), DNS_PORT
    except ValueError:
        pass
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise InputError(f"--dns {text!r} must be ADDR or ADDR:PORT, like 127.0.0.53:53")
    if ":" in host and not host.startswith("["):
        raise InputError(f"--dns {text!r}: write an IPv6 address with a port as [ADDR]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"--dns {text!r}: port {port_text!r} is not a number") from None
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise InputError(f"--dns {text!r}: {host!r} is not an IP address") from None
    _check_port(port, f"--dns {text!r}: port")
    return str(addr), port


def parse_ports(values: Iterable[str], *, what: str = "--exclude-ports") -> tuple[int, ...]:
    """Comma-separated and/or repeated port lists (``22,80`` ``--x 443``) → sorted ports."""
    ports: set[int] = set()
    for item in _items(values):
        try:
            port = int(item)
        except ValueError:
            raise InputError(f"{what}: {item!r} is not a port number") from None
        _check_port(port, what)
        ports.add(port)
    return tuple(sorted(ports))


def parse_cidrs(values: Iterable[str], *, what: str = "--exclude-cidrs") -> tuple[str, ...]:
    """Comma-separated and/or repeated CIDRs → normalised CIDR strings."""
    return tuple(str(_network(item, what=what)) for item in _items(values))


def parse_mark(text: str) -> int:
    """``0x539`` or ``1337`` → an int (range checked by InterceptConfig)."""
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise InputError(f"--proxy-mark {text!r} is not a number (like 0x539)") from None


def ruleset(cfg: InterceptConfig) -> str:
    """The nft script that installs (or replaces) table ``inet meshlet`` for ``cfg``."""
    rules = [f"type nat hook {CHAIN} priority {PRIORITY}; policy accept;"]
    if cfg.proxy_uid is not None:
        rules.append(f'meta skuid {cfg.proxy_uid} return comment "the sidecar\'s own traffic"')
    rules.append(f'meta mark {cfg.proxy_mark:#x} return comment "sockets the sidecar marked"')
    rules.append(f'tcp sport {cfg.inbound_port} return comment "inbound listener: never captured"')
    if cfg.dns is not None:
        host, port = cfg.dns
        v6 = ipaddress.ip_address(host).version == 6
        family, target = ("ipv6", f"[{host}]:{port}") if v6 else ("ipv4", f"{host}:{port}")
        rules.append(
            f"meta nfproto {family} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} "
            f'dnat {"ip6" if v6 else "ip"} to {target} comment "DNS to the sidecar"'
        )
        rules.append(
            f"meta l4proto {{ tcp, udp }} th dport {DNS_PORT} return "
            'comment "DNS of the other family: not captured"'
        )
    if not cfg.capture_loopback:
        rules.append('oifname "lo" return comment "stays in this namespace"')
    if cfg.exclude_ports:
        ports = ", ".join(str(p) for p in cfg.exclude_ports)
        rules.append(f'tcp dport {{ {ports} }} return comment "--exclude-ports"')
    for version, selector in ((4, "ip"), (6, "ip6")):
        nets = [c for c in cfg.exclude_cidrs if ipaddress.ip_network(c).version == version]
        if nets:
            rules.append(
                f'{selector} daddr {{ {", ".join(nets)} }} return comment "--exclude-cidrs"'
            )
    rules.append(
        f"meta l4proto tcp redirect to :{cfg.outbound_port} "
        'comment "app TCP to the outbound listener"'
    )
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return (
        f"{PREAMBLE}"
        f"table {FAMILY} {TABLE} {{\n"
        f'\tcomment "installed by meshlet sidecar init; remove with --remove"\n'
        f"\tchain {CHAIN} {{\n{body}\t}}\n"
        "}\n"
    )


def removal() -> str:
    """The nft script that deletes table ``inet meshlet``; a no-op if it is absent."""
    return PREAMBLE


def summary(cfg: InterceptConfig) -> str:
    """One line saying what ``ruleset(cfg)`` captures, for the CLI."""
    exempt = [f"mark {cfg.proxy_mark:#x}"]
    if cfg.proxy_uid is not None:
        exempt.insert(0, f"uid {cfg.proxy_uid}")
    parts = [f"app TCP → :{cfg.outbound_port}"]
    if cfg.dns is not None:
        host, port = cfg.dns
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        parts.append(f"DNS → {target}")
    else:
        parts.append("DNS not captured")
    parts.append(f"exempt {' and '.join(exempt)}")
    if cfg.exclude_ports:
        parts.append(f"excluded ports {','.join(map(str, cfg.exclude_ports))}")
    if cfg.exclude_cidrs:
        parts.append(f"excluded {','.join(cfg.exclude_cidrs)}")
    if cfg.capture_loopback:
        parts.append("loopback captured")
    return f"table {FAMILY} {TABLE}: " + "; ".join(parts)


def _items(values: Iterable[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _network(
    text: str, *, what: str = "--exclude-cidrs"
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a CIDR like 198.18.5.0/24") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_port(port: object, what: str) -> None:
    if not _is_int(port):
        raise InputError(f"{what} {port!r} is not a port number")
    assert isinstance(port, int)
    if not 1 <= port <= _MAX_PORT:
        raise InputError(f"{what} {port} is out of range 1-{_MAX_PORT}")
