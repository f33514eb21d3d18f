"""SO_ORIGINAL_DST: the VIP:port the app dialled, for a connection nft redirected to the
outbound listener.

``original_dst(sock)`` asks the kernel (conntrack) once per accepted connection;
``parse_sockaddr(data)`` is the pure part that decodes the sockaddr the kernel returns.
This module must never do anything else with the socket (no reads, writes or options).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from meshlet.errors import MeshError

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6 (= IPPROTO_IPV6)
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
AF_INET = 2  # Linux values; sockaddr's first field, in host byte order
AF_INET6 = 10


def parse_sockaddr(data: bytes) -> tuple[str, int]:
    """A Linux ``sockaddr_in`` / ``sockaddr_in6`` → ``(address, port)``."""
    if len(data) < 2:
        raise MeshError(f"SO_ORIGINAL_DST returned {len(data)} bytes, too short for a sockaddr")
    (family,) = struct.unpack_from("=H", data)
    if family == AF_INET and len(data) >= 8:
        (port,) = struct.unpack_from("!H", data, 2)
        return str(ipaddress.IPv4Address(data[4:8])), port
    if family == AF_INET6 and len(data) >= 24:
        (port,) = struct.unpack_from("!H", data, 2)
        return str(ipaddress.IPv6Address(data[8:24])), port
    raise MeshError(
        f"SO_ORIGINAL_DST returned an unexpected sockaddr (family {family}, {len(data)} bytes)"
    )


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the app meant to connect, before nft's redirect to the outbound listener.

    On an IPv6 listener, an IPv4 client (a v4-mapped peer) is asked at the IPv4 level, so
    one dual-stack listener serves both families; its answer is a plain IPv4 address.
    """
    v4 = sock.family == socket.AF_INET or (
        sock.family == socket.AF_INET6 and _peer_is_v4_mapped(sock)
    )
    try:
        if v4:
            data = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN)
        else:
            data = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_LEN)
    except OSError as e:
        raise MeshError(
            f"no original destination for the connection from {_peer(sock)}: {e.strerror} "
            "(was it redirected by `meshlet sidecar init`, or did it dial the listener directly?)"
        ) from e
    return parse_sockaddr(data)


def _peer_is_v4_mapped(sock: socket.socket) -> bool:
    try:
        host = sock.getpeername()[0]
    except OSError:
        return False
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    return isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "an unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
