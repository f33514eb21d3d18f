"""The sidecar's configuration, parsed once at the edge (STYLE.md rule 4).

``SidecarConfig.from_flags`` turns CLI values into frozen data with every check done,
so each component receives only its part and never re-validates.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from meshlet.addresses import parse_hostport
from meshlet.errors import InputError
from meshlet.model import DNS_LABEL, Protocol, ServicePort, check_labels


class Mode(StrEnum):
    TRANSPARENT = "transparent"
    EXPLICIT = "explicit"


class UnknownDestination(StrEnum):
    PASS = "pass"
    REJECT = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """Explicit mode: a local port that leads to a mesh service's port."""

    namespace: str
    name: str
    port: int
    listen: tuple[str, int]

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.name}"


_UPSTREAM = re.compile(r"(?P<ns>[^/=]+)/(?P<name>[^:=]+):(?P<port>\d+)=(?P<listen>.+)")


def parse_upstream(text: str) -> Upstream:
    m = _UPSTREAM.fullmatch(text.strip())
    if m is None:
        raise InputError(
            f"--upstream {text!r} must look like NS/NAME:PORT=127.0.0.1:LOCALPORT "
            "(e.g. shop/orders:8080=127.0.0.1:18080)"
        )
    ns, name = m["ns"], m["name"]
    for value, what in ((ns, "namespace"), (name, "service name")):
        if not DNS_LABEL.fullmatch(value):
            raise InputError(f"--upstream {text!r}: {what} {value!r} is not a DNS label")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise InputError(f"--upstream {text!r}: port {port} is out of range 1-65535")
    return Upstream(
        namespace=ns, name=name, port=port, listen=parse_hostport(m["listen"], what="--upstream")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    namespace: str
    service: str
    control_plane: str  # gRPC TLS address (join-token signing)
    control_plane_mtls: str  # gRPC mTLS address (renewal, discovery, registration)
    ca_bundle: Path
    cert_dir: Path
    join_token: Path | None = None
    app_port: int | None = None  # None: outbound only (no inbound, no endpoint)
    app_host: str = "127.0.0.1"
    app_protocol: Protocol = Protocol.AUTO
    mode: Mode = Mode.TRANSPARENT
    upstreams: tuple[Upstream, ...] = ()
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    inbound: tuple[str, int] = ("0.0.0.0", 15006)
    outbound: tuple[str, int] = ("127.0.0.1", 15001)
    address: str = "127.0.0.1"  # what peers dial: the overlay address of this replica
    endpoint_id: str = ""
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    dns: tuple[str, int] | None = None
    unknown_destination: UnknownDestination = UnknownDestination.PASS
    drain_timeout_s: float = 30.0
    connect_attempts: int = 3
    cert_ttl_s: int | None = None
    proxy_mark: int = 0x539
    state_dir: Path | None = None
    access_log: str = "-"  # L7 access log: "-" stdout, "off", or a file path
    http_header_timeout_s: float = 10.0  # a request head must arrive within this
    detect_timeout_s: float = 0.2  # ports not declared: peek this long, then relay as TCP

    def __post_init__(self) -> None:
        for value, what in ((self.namespace, "namespace"), (self.service, "service name")):
            if not DNS_LABEL.fullmatch(value):
                raise InputError(f"--service: {what} {value!r} is not a DNS label")
        if self.app_port is None:
            self._check_outbound_only()
        elif not 1 <= self.app_port <= 65535:
            raise InputError(f"--app-port {self.app_port} is out of range 1-65535")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise InputError(f"--address {self.address!r} is not an IP address") from None
        try:
            check_labels(self.labels)
        except ValueError as e:
            raise InputError(f"--label: {e}") from None
        if not 1 <= self.connect_attempts <= 10:
            raise InputError("--connect-attempts must be 1-10")
        if not self.http_header_timeout_s > 0:
            raise InputError("--http-header-timeout must be greater than 0")
        if not self.detect_timeout_s > 0:
            raise InputError("--detect-timeout must be greater than 0 (e.g. 200ms)")

    def _check_outbound_only(self) -> None:
        """Without --app-port nothing is served, so nothing describes a served port."""
        given = [
            what
            for what, set_ in (
                ("--app-protocol", self.app_protocol is not Protocol.AUTO),
                ("--label", bool(self.labels)),
            )
            if set_
        ]
        if given:
            raise InputError(
                f"{' and '.join(given)} describe the app's served port, and there is no "
                "--app-port: pass --app-port PORT, or drop them for a workload that only "
                "calls others"
            )

    @property
    def outbound_only(self) -> bool:
        """No app port: the workload only calls others. It has an identity and the mesh
        map, but no inbound listener and no endpoint in the control plane (Linkerd's and
        Istio's client-only workloads)."""
        return self.app_port is None

    @property
    def app_address(self) -> tuple[str, int]:
        """Where the inbound side dials the app (it never runs when outbound only)."""
        if self.app_port is None:
            raise RuntimeError("an outbound-only sidecar has no app to dial")
        return self.app_host, self.app_port

    @property
    def spiffe_path(self) -> str:
        return f"/ns/{self.namespace}/sa/{self.service}"

    @property
    def resolved_endpoint_id(self) -> str:
        return self.endpoint_id or f"{self.service}-{self.address}-{self.inbound[1]}".replace(
            ":", "-"
        )

    @property
    def service_ports(self) -> tuple[ServicePort, ...]:
        if self.app_port is None:
            return ()
        return (ServicePort(port=self.app_port, protocol=self.app_protocol),)

    @property
    def cache_path(self) -> Path:
        return (self.state_dir or self.cert_dir) / "discovery-cache.json"
