"""What `meshlet inject` decides for one compose service, from plain values.

For: compose/inject.py, which hands this module the service's settings (already read
out of the YAML) and gets back either a reason to skip the service or the validated
``MeshOptions`` the generated sidecar is built from: the app's TCP ports, the one port
the sidecar serves, its protocol, the mesh name (identity), labels, excluded ports and
the replica count. Every mistake is an ``InputError`` naming the service and the key.

Must never: touch YAML nodes, comments or files; decide anything about the layout of
the generated services (that is compose/inject_build.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshlet.errors import InputError
from meshlet.model import DNS_LABEL, check_labels

OPTIONS = "x-meshlet"
KNOWN_OPTIONS = ("inject", "ports", "protocol", "exclude-ports", "identity", "labels", "replicas")
PROTOCOLS = ("auto", "tcp", "http", "grpc")
MAX_REPLICAS = 64
# The sidecar's own listeners share the app's network namespace: the app must not use them.
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
DNS_PORT = 15053
SIDECAR_PORTS = (ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, DNS_PORT)
# docker-compose reads YAML 1.1, where these spellings are booleans too.
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
_PORT_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
# Docker refuses these on a container that joins another's network namespace, so inject
# moves them from the app to its sidecar.
MOVED = (
    "ports",
    "expose",
    "networks",
    "hostname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "links",
    "external_links",
    "mac_address",
)
# What the sidecar of each further replica repeats (the first replica's has them all).
COPIED_TO_REPLICAS = ("dns", "dns_search", "dns_opt", "extra_hosts", "links", "external_links")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshOptions:
    """A service to inject, validated."""

    name: str  # the mesh service name and SPIFFE service account (x-meshlet.identity)
    ports: tuple[int, ...]  # the app's TCP ports, in the order they were found
    port: int | None  # the one the sidecar serves (--app-port): the first of ``ports``;
    # None: the service has no port, so its sidecar is outbound only (it only calls others)
    protocol: str | None  # x-meshlet.protocol for ``port``; None: the sidecar detects it
    labels: tuple[tuple[str, str], ...]
    exclude_ports: tuple[int, ...]  # outbound ports that bypass the sidecar
    replicas: int
    unknown_ports: tuple[str, ...] = ()  # ports set from the environment: not known here

    @property
    def unmeshed_ports(self) -> tuple[int, ...]:
        return tuple(p for p in self.ports if p != self.port)


@dataclass(frozen=True, slots=True)
class Skip:
    """A service left as it is, and why (printed as ``svc: skipped (reason)``)."""

    reason: str


def as_bool(value: Any, *, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise InputError(f"{where} must be true or false, not {value!r}")


def decide(
    name: str,
    *,
    options: Any,
    network_mode: Any,
    expose: Any,
    ports: Any,
    replicas_setting: tuple[str, Any] | None,
    source: str,
) -> MeshOptions | Skip:
    """Skip ``name`` (with the reason) or say how to inject it.

    ``options`` is the service's ``x-meshlet`` value (None when absent); ``expose`` and
    ``ports`` its compose settings; ``replicas_setting`` is ``("scale", N)`` or
    ``("deploy.replicas", N)`` when the service sets one.
    """
    where = f"{source}: service {name!r}"
    opts = _options(options, where=where)
    if "inject" in opts and not as_bool(opts["inject"], where=f"{where}: {OPTIONS}.inject"):
        return Skip(f"{OPTIONS}.inject: false")
    if network_mode is not None:
        raise InputError(
            f"{where} already uses network_mode: {network_mode}: its sidecar would need to own "
            f"the network namespace; set {OPTIONS}.inject: false to leave {name} out of the mesh"
        )
    found, unknown = _listening_ports(opts, expose=expose, ports=ports, where=where)
    excluded = _port_list(opts.get("exclude-ports", []), where=f"{where}: {OPTIONS}.exclude-ports")
    listening = tuple(p for p in found if p not in excluded)
    if not listening and opts.get("labels"):
        raise InputError(
            f"{where}: {OPTIONS}.labels describe the replicas that serve a port, and {name} "
            f"has no TCP port, so its sidecar only calls others: add expose: [PORT] or "
            f"{OPTIONS}.ports: [PORT], or drop the labels"
        )
    clash = sorted(set(listening) & set(SIDECAR_PORTS))
    if clash:
        raise InputError(
            f"{where} listens on port {clash[0]}, which its sidecar uses "
            f"({', '.join(map(str, SIDECAR_PORTS))}): move the app to another port, or set "
            f"{OPTIONS}.inject: false"
        )
    mesh_name = _identity(name, opts, where=where)
    protocols = _protocols(opts.get("protocol", {}), listening, where=where)
    return MeshOptions(
        name=mesh_name,
        ports=listening,
        port=listening[0] if listening else None,
        protocol=protocols.get(listening[0]) if listening else None,
        labels=_labels(opts.get("labels", {}), where=f"{where}: {OPTIONS}.labels"),
        exclude_ports=excluded,
        replicas=_replicas(opts, replicas_setting, where=where),
        unknown_ports=tuple(unknown) if not listening else (),
    )


def _options(value: Any, *, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(
            f"{where}: {OPTIONS} must be a mapping like {{inject: true, protocol: {{8080: http}}}}"
        )
    unknown = [str(k) for k in value if k not in KNOWN_OPTIONS]
    if unknown:
        raise InputError(
            f"{where}: unknown {OPTIONS} key(s) {', '.join(unknown)}: "
            f"the keys are {', '.join(KNOWN_OPTIONS)}"
        )
    return value


def container_ports(entry: Any) -> tuple[list[int], str | None]:
    """The container-side TCP ports of one ``ports:``/``expose:`` entry, or the entry
    itself (as text) when it cannot be known before the environment is read."""
    if isinstance(entry, bool):
        return [], str(entry)
    if isinstance(entry, int):
        return [entry], None
    if isinstance(entry, Mapping):  # long syntax: {target: 80, published: 8080, protocol: tcp}
        if str(entry.get("protocol", "tcp")).lower() != "tcp":
            return [], None
        target = entry.get("target")
        return ([target], None) if isinstance(target, int) else ([], str(target))
    text = str(entry).strip()
    text, _, proto = text.partition("/")
    if proto and proto.lower() != "tcp":
        return [], None
    container = text.rpartition(":")[2]  # HOST_IP:PUBLISHED:CONTAINER; [v6]:P:C too
    m = _PORT_RANGE.fullmatch(container)
    if m is None:
        return [], str(entry)
    first, last = int(m[1]), int(m[2] or m[1])
    if last < first or last - first > 1000:
        return [], str(entry)
    return list(range(first, last + 1)), None


def _listening_ports(
    opts: Mapping[str, Any], *, expose: Any, ports: Any, where: str
) -> tuple[tuple[int, ...], list[str]]:
    if "ports" in opts:
        return _port_list(opts["ports"], where=f"{where}: {OPTIONS}.ports"), []
    found: list[int] = []
    unknown: list[str] = []
    for key, value in (("expose", expose), ("ports", ports)):
        if value is None:
            continue
        if not isinstance(value, list):
            raise InputError(f"{where}: {key} must be a list")
        for entry in value:
            numbers, not_known = container_ports(entry)
            if not_known is not None:
                unknown.append(not_known)
            for p in numbers:
                if not 1 <= p <= 65535:
                    raise InputError(f"{where}: {key}: port {p} is out of range 1-65535")
                if p not in found:
                    found.append(p)
    return tuple(found), unknown


def _port_list(value: Any, *, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InputError(f"{where} must be a list of ports, like [8080, 9090]")
    out: list[int] = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise InputError(f"{where}: {p!r} is not a port (1-65535)")
        if p not in out:
            out.append(p)
    return tuple(out)


def _identity(name: str, opts: Mapping[str, Any], *, where: str) -> str:
    if "identity" in opts:
        value = opts["identity"]
        if not isinstance(value, str) or not DNS_LABEL.fullmatch(value):
            raise InputError(
                f"{where}: {OPTIONS}.identity {value!r} is not a DNS label: use 1-63 "
                "lowercase letters, digits and '-'"
            )
        return value
    if not DNS_LABEL.fullmatch(name):
        suggestion = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "app"
        raise InputError(
            f"{where}: the name is not a DNS label, and the mesh names the service and its "
            f"identity after it: add {OPTIONS}.identity: {suggestion}"
        )
    return name


def _protocols(value: Any, ports: tuple[int, ...], *, where: str) -> dict[int, str]:
    key = f"{where}: {OPTIONS}.protocol"
    if not isinstance(value, Mapping):
        raise InputError(f"{key} must map ports to protocols, like {{8080: http}}")
    out: dict[int, str] = {}
    for port, proto in value.items():
        try:
            number = int(port) if not isinstance(port, bool) else -1
        except (TypeError, ValueError):
            number = -1
        if number not in ports:
            known = ", ".join(map(str, ports)) or "it has none: add expose: [PORT]"
            raise InputError(f"{key}: {port!r} is not one of the service's ports ({known})")
        if proto not in PROTOCOLS:
            raise InputError(f"{key}: {port}: {proto!r} is not one of {', '.join(PROTOCOLS)}")
        out[number] = str(proto)
    return out


def _labels(value: Any, *, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise InputError(f"{where} must be a mapping, like {{version: v2}}")
    labels: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int) or not isinstance(k, str):
            raise InputError(f"{where}: {k}: {v!r} must be a word, like v2")
        labels[k] = str(v)
    try:
        check_labels(labels)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    return tuple(labels.items())


def _replicas(opts: Mapping[str, Any], setting: tuple[str, Any] | None, *, where: str) -> int:
    if setting is not None and setting[1] != 1:
        key, value = setting
        raise InputError(
            f"{where}: {key}: {value!r}: compose would join every replica to the first "
            f"replica's sidecar; use {OPTIONS}.replicas: {value} instead (one sidecar per replica)"
        )
    value = opts.get("replicas", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
        raise InputError(f"{where}: {OPTIONS}.replicas must be a number from 1 to {MAX_REPLICAS}")
    return value


def project_name(directory: str) -> str:
    """The compose project name docker-compose derives from a directory name."""
    return re.sub(r"[^-_a-z0-9]", "", directory.lower())


def check_project(name: str, *, origin: str) -> str:
    """The project name is the mesh namespace: it must be a DNS label."""
    if not DNS_LABEL.fullmatch(name):
        raise InputError(
            f"project name {name!r} ({origin}) is not a DNS label, and it becomes the mesh "
            "namespace: pass --project NAME with lowercase letters, digits and '-'"
        )
    return name
