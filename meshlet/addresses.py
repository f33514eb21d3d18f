"""Parse ``HOST:PORT`` flags (``127.0.0.1:15080``, ``[::1]:15080``, ``:15080``)."""

from __future__ import annotations

import ipaddress

from meshlet.errors import InputError


def parse_hostport(text: str, *, what: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise InputError(f"{what} {text!r} must be HOST:PORT, like 127.0.0.1:15080")
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise InputError(f"{what} {text!r}: port {port} is out of range 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise InputError(f"{what} {text!r}: {host!r} is not an IP address") from None
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
