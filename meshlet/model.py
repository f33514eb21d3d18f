"""The mesh's data model, shared by the control plane, the sidecar and the node helper.

Frozen dataclasses validated in ``__post_init__`` (the API, YAML files and gRPC all get
the same checks). ``meshlet.wire`` turns them into JSON and back. Pure: no I/O, no
clock; runtime facts such as the last heartbeat live with the health tracker, not here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum

from meshlet.policy import Policy

_FORBID = {"extra": "forbid"}
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_ENDPOINT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")

INBOUND_PORT = 15006


def check_dns_label(value: str, what: str) -> None:
    if not DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS label: use 1-63 lowercase letters, digits and "
            "'-', starting and ending with a letter or digit"
        )


def check_port(value: int, what: str) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"{what} {value} is out of range 1-65535")


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if not _LABEL_KEY.fullmatch(k):
            raise ValueError(f"label key {k!r} is not valid: letters, digits, '.', '_', '-', '/'")
        if not _LABEL_VALUE.fullmatch(v):
            raise ValueError(f"label {k}={v!r}: the value may use letters, digits, '.', '_', '-'")


def service_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


class Protocol(StrEnum):
    """What a service port speaks. ``auto`` (the default) lets the outbound sidecar look
    at each connection's first bytes: an HTTP/1 request line or the HTTP/2 preface is
    proxied per request, anything else is relayed as bytes. ``tcp`` turns detection off
    (Linkerd's "opaque"): declare it for protocols where the server speaks first (SMTP,
    MySQL, ...), which would otherwise wait out the detect timeout on every connection."""

    TCP = "tcp"
    HTTP = "http"
    GRPC = "grpc"
    AUTO = "auto"


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    __pydantic_config__ = _FORBID
    port: int
    protocol: Protocol = Protocol.AUTO

    def __post_init__(self) -> None:
        check_port(self.port, "port")


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    __pydantic_config__ = _FORBID
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    vip: str | None = None  # allocated by the control plane; stable while the service exists
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        check_dns_label(self.namespace, "namespace")
        check_dns_label(self.name, "service name")
        if not self.ports:
            raise ValueError(f"service {self.key} needs at least one port")
        numbers = [p.port for p in self.ports]
        if len(numbers) != len(set(numbers)):
            raise ValueError(f"service {self.key} lists a port twice")
        if self.vip is not None:
            ipaddress.IPv4Address(self.vip)

    @property
    def key(self) -> str:
        return service_key(self.namespace, self.name)

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One replica of a service: where its sidecar accepts mTLS, and who it is."""

    __pydantic_config__ = _FORBID
    id: str
    namespace: str
    service: str
    address: str  # overlay (or loopback) address of the replica's sidecar
    app_port: int
    inbound_port: int = INBOUND_PORT
    identity: str = ""  # SPIFFE ID the sidecar presents; filled in from the service if empty
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    health: Health = Health.HEALTHY

    def __post_init__(self) -> None:
        if not _ENDPOINT_ID.fullmatch(self.id):
            raise ValueError(
                f"endpoint id {self.id!r} must be 1-128 letters, digits, '.', '_', ':', '-'"
            )
        check_dns_label(self.namespace, "namespace")
        check_dns_label(self.service, "service name")
        ipaddress.ip_address(self.address)
        check_port(self.app_port, "app_port")
        check_port(self.inbound_port, "inbound_port")
        if self.node is not None:
            check_dns_label(self.node, "node name")
        check_labels(self.labels)

    @property
    def service_key(self) -> str:
        return service_key(self.namespace, self.service)

    @property
    def target(self) -> tuple[str, int]:
        return self.address, self.inbound_port


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A host: its underlay address, VTEP MAC and the overlay /24 it leases."""

    __pydantic_config__ = _FORBID
    name: str
    underlay_address: str
    vtep_mac: str
    subnet: str | None = None  # leased by the control plane; stable for the node's name
    health: Health = Health.HEALTHY

    def __post_init__(self) -> None:
        check_dns_label(self.name, "node name")
        ipaddress.IPv4Address(self.underlay_address)
        if not _MAC.fullmatch(self.vtep_mac):
            raise ValueError(
                f"vtep_mac {self.vtep_mac!r} must look like 02:42:c6:12:00:01 (lowercase)"
            )
        if self.subnet is not None:
            ipaddress.IPv4Network(self.subnet)


class Kind(StrEnum):
    SERVICE = "service"
    ENDPOINT = "endpoint"
    NODE = "node"


Object = Service | Endpoint | Node


def kind_of(obj: Object) -> Kind:
    if isinstance(obj, Service):
        return Kind.SERVICE
    if isinstance(obj, Endpoint):
        return Kind.ENDPOINT
    return Kind.NODE


def key_of(obj: Object) -> str:
    """The object's name within its kind: ``ns/name``, the endpoint id, the node name."""
    if isinstance(obj, Service):
        return obj.key
    if isinstance(obj, Endpoint):
        return obj.id
    return obj.name


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One change to one object. DELETED events carry the object as it was."""

    type: EventType
    object: Object
    revision: int = 0

    @property
    def kind(self) -> Kind:
        return kind_of(self.object)

    @property
    def key(self) -> str:
        return key_of(self.object)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything the control plane knows, at one revision."""

    revision: int
    services: dict[str, Service] = field(default_factory=dict)  # by "ns/name"
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # by id
    nodes: dict[str, Node] = field(default_factory=dict)  # by name

    def table(self, kind: Kind) -> dict[str, Object]:
        tables: dict[Kind, dict[str, Object]] = {
            Kind.SERVICE: self.services,  # type: ignore[dict-item]
            Kind.ENDPOINT: self.endpoints,  # type: ignore[dict-item]
            Kind.NODE: self.nodes,  # type: ignore[dict-item]
        }
        return tables[kind]

    def endpoints_of(self, namespace: str, name: str, *, passing: bool = False) -> list[Endpoint]:
        return sorted(
            (
                e
                for e in self.endpoints.values()
                if e.namespace == namespace
                and e.service == name
                and (not passing or e.health is Health.HEALTHY)
            ),
            key=lambda e: e.id,
        )
