"""`meshlet sidecar run`: flags → SidecarConfig → sidecar.app.run on uvloop."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import click

from meshlet.addresses import format_hostport, parse_hostport
from meshlet.errors import InputError

PathArg = click.Path(path_type=Path)
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep:
            raise InputError(f"--label {v!r} must be KEY=VALUE, like version=v2")
        labels[key] = value
    return labels


def _control_plane_address(text: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` where HOST may also be a DNS name, like ``meshlet-control-plane:15010``
    in docker compose: gRPC resolves it on every connect, so a control plane that comes
    back with another address is found again."""
    host, sep, port_text = text.rpartition(":")
    if not (sep and _DNS_NAME.fullmatch(host) and not host.replace(".", "").isdigit()):
        return parse_hostport(text, what=what)
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise InputError(f"{what} {text!r}: port {port} is out of range 1-65535")
    return host, port


def _source_address(destination: str) -> str | None:
    """The address this namespace would send from to ``destination`` (an IPv4 address).
    Connecting a UDP socket only asks the kernel for the route; it sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((destination, 9))
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return address


def _auto_address(toward: str, route_table: str = "/proc/net/route") -> str:
    """``--address auto``: the address of the interface that reaches the control plane
    (``toward``, an IP or a name), else the source address of the default route. In a
    compose container that is its address on the network it shares with its peers."""
    try:
        targets = [socket.getaddrinfo(toward, None, socket.AF_INET)[0][4][0]]
    except (OSError, IndexError):
        targets = []  # not resolvable yet: the default route decides
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
            targets.append(socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little")))
    for target in targets:
        address = _source_address(str(target))
        if address is not None and not address.startswith("127."):
            return address
    raise InputError(
        f"--address auto: neither the control plane ({toward}) nor an IPv4 default route "
        "is reached from a non-loopback address here; pass the address peers dial, like "
        "--address 198.19.0.5"
    )


@click.command("run")
@click.option(
    "--service", required=True, metavar="NS/NAME", help="The service this replica belongs to."
)
@click.option(
    "--control-plane",
    required=True,
    metavar="HOST:PORT",
    help="The control plane's gRPC (TLS) address; HOST may be a DNS name.",
)
@click.option(
    "--control-plane-mtls",
    metavar="HOST:PORT",
    help="Its mutual-TLS gRPC address (default: same host, port 15012).",
)
@click.option(
    "--ca-bundle",
    type=PathArg,
    required=True,
    help="Trust bundle: verifies the control plane and peers.",
)
@click.option("--join-token", type=PathArg, help="File with the join token (first certificate).")
@click.option(
    "--cert-dir",
    type=PathArg,
    help="Where the key and certificate live (0700). Default: /var/lib/meshlet/NS-NAME.",
)
@click.option(
    "--app-port",
    type=int,
    help="The app's port on 127.0.0.1. Omit it for a workload that only calls others: "
    "no inbound listener, no endpoint registered.",
)
@click.option(
    "--app-protocol",
    type=click.Choice(["auto", "tcp", "http", "grpc"]),
    default="auto",
    show_default=True,
    help="What the app's port speaks, if this replica creates its service: auto detects "
    "per connection; tcp for server-speaks-first protocols (no detection).",
)
@click.option(
    "--mode",
    type=click.Choice(["transparent", "explicit"]),
    default="transparent",
    show_default=True,
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="NS/NAME:PORT=127.0.0.1:LOCALPORT",
    help="Explicit mode: a local port for a mesh service (repeatable).",
)
@click.option("--admin", default="127.0.0.1:15000", show_default=True)
@click.option("--inbound", default="0.0.0.0:15006", show_default=True)
@click.option("--outbound", default="127.0.0.1:15001", show_default=True)
@click.option(
    "--address",
    default=None,
    help="The address peers dial (this replica's overlay IP); `auto`: this namespace's "
    "address toward the control plane (in a container). Default: the inbound host, or "
    "127.0.0.1.",
)
@click.option(
    "--endpoint-id",
    default="",
    help="This replica's endpoint id (default: derived from service and address).",
)
@click.option("--node", default=None, help="The node this replica runs on.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Endpoint label, e.g. version=v2 (repeatable).",
)
@click.option(
    "--dns", default=None, metavar="ADDR[:PORT]", help="Serve mesh DNS here (e.g. 127.0.0.53:53)."
)
@click.option(
    "--unknown-destination",
    type=click.Choice(["pass", "reject"]),
    default="pass",
    show_default=True,
)
@click.option("--drain-timeout", default="30s", show_default=True)
@click.option(
    "--cert-ttl",
    default=None,
    help="Ask for certificates of this lifetime (default: the CA's, 24h).",
)
@click.option(
    "--access-log",
    default="-",
    show_default=True,
    metavar="-|off|PATH",
    help="L7 access log, one JSON line per request: stdout (-), off, or a file.",
)
@click.option(
    "--http-header-timeout",
    default="10s",
    show_default=True,
    help="HTTP/1.1: a request head must arrive within this, or the connection closes.",
)
@click.option(
    "--detect-timeout",
    default="200ms",
    show_default=True,
    help="Ports not declared: how long to wait for the app's first bytes before relaying "
    "the connection as TCP (server-speaks-first protocols wait this once per connection).",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(
    service: str,
    control_plane: str,
    control_plane_mtls: str | None,
    ca_bundle: Path,
    join_token: Path | None,
    cert_dir: Path | None,
    app_port: int | None,
    app_protocol: str,
    mode: str,
    upstreams: tuple[str, ...],
    admin: str,
    inbound: str,
    outbound: str,
    address: str | None,
    endpoint_id: str,
    node: str | None,
    labels: tuple[str, ...],
    dns: str | None,
    unknown_destination: str,
    drain_timeout: str,
    cert_ttl: str | None,
    access_log: str,
    http_header_timeout: str,
    detect_timeout: str,
    log_level: str,
) -> None:
    """Run the sidecar until SIGTERM (then drain and exit)."""
    import uvloop

    from meshlet import logs
    from meshlet.durations import parse_duration
    from meshlet.model import Protocol
    from sidecar.app import run as run_app
    from sidecar.config import Mode, SidecarConfig, UnknownDestination, parse_upstream
    from sidecar.intercept import parse_dns

    ns, slash, name = service.partition("/")
    if not slash:
        raise InputError(f"--service {service!r} must be NS/NAME, like shop/orders")
    cp_host, cp_port = _control_plane_address(control_plane, what="--control-plane")
    if control_plane_mtls is not None:
        control_plane_mtls = format_hostport(
            *_control_plane_address(control_plane_mtls, what="--control-plane-mtls")
        )
    inbound_addr = parse_hostport(inbound, what="--inbound", default_host="0.0.0.0")
    if address == "auto":
        address = _auto_address(cp_host)
    elif address is None:
        address = inbound_addr[0] if inbound_addr[0] not in ("0.0.0.0", "::") else "127.0.0.1"
    if join_token is None and cert_dir is None:
        raise InputError(
            "pass --join-token FILE (first certificate) or --cert-dir DIR (existing one)"
        )
    cfg = SidecarConfig(
        namespace=ns,
        service=name,
        control_plane=format_hostport(cp_host, cp_port),
        control_plane_mtls=control_plane_mtls or format_hostport(cp_host, 15012),
        ca_bundle=ca_bundle,
        cert_dir=cert_dir or Path("/var/lib/meshlet") / f"{ns}-{name}",
        join_token=join_token,
        app_port=app_port,
        app_protocol=Protocol(app_protocol),
        mode=Mode(mode),
        upstreams=tuple(parse_upstream(u) for u in upstreams),
        admin=parse_hostport(admin, what="--admin"),
        inbound=inbound_addr,
        outbound=parse_hostport(outbound, what="--outbound"),
        address=address,
        endpoint_id=endpoint_id,
        node=node,
        labels=_labels(labels),
        dns=parse_dns(dns) if dns else None,
        unknown_destination=UnknownDestination(unknown_destination),
        drain_timeout_s=parse_duration(drain_timeout, what="--drain-timeout"),
        cert_ttl_s=int(parse_duration(cert_ttl, what="--cert-ttl")) if cert_ttl else None,
        access_log=access_log,
        http_header_timeout_s=parse_duration(http_header_timeout, what="--http-header-timeout"),
        detect_timeout_s=parse_duration(detect_timeout, what="--detect-timeout"),
    )
    logs.setup(log_level)
    uvloop.run(run_app(cfg))
