"""`meshlet node ...`: the node helper's commands.

``run`` builds and keeps the VXLAN overlay of this host (node.app); ``attach`` / ``detach``
plug a container's network namespace into it (node.attach). This module only parses flags
and prints; it must never catch MeshError (the dispatcher in meshlet/cli.py prints it as
one `meshlet: error: ...` line and exits 1, or 2 for bad input).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import click

from meshlet.addresses import format_hostport, parse_hostport
from meshlet.errors import InputError
from meshlet.model import check_dns_label
from node.state import DEFAULT_DIR

PathArg = click.Path(path_type=Path)
StateDir = click.option(
    "--state-dir",
    type=PathArg,
    default=DEFAULT_DIR,
    show_default=True,
    help="Where `node run` writes NAME.json and attach keeps its leases.",
)
VNI_MAX = 2**24 - 1


@click.group("node")
def main() -> None:
    """The node helper: the VXLAN overlay and container attachment."""


@main.command("run")
@click.option("--name", required=True, help="This node's name (a DNS label), stable for the host.")
@click.option(
    "--control-plane",
    required=True,
    metavar="HOST:PORT",
    help="The control plane's gRPC (TLS) address; authenticated with the join token.",
)
@click.option("--ca-bundle", type=PathArg, required=True, help="Trust bundle: verifies it.")
@click.option("--join-token", type=PathArg, required=True, help="File with the join token.")
@click.option(
    "--underlay-address",
    required=True,
    metavar="IP",
    help="This host's IPv4 address the other nodes send VXLAN packets to.",
)
@click.option(
    "--underlay-dev",
    metavar="DEV",
    help="The underlay interface (default: the one holding --underlay-address).",
)
@click.option("--vni", type=int, default=4096, show_default=True, help="VXLAN network id.")
@click.option("--port", type=int, default=4789, show_default=True, help="VXLAN UDP port.")
@StateDir
@click.option(
    "--teardown-on-exit",
    is_flag=True,
    help="On SIGTERM, deregister and remove the bridge, the VXLAN device and every entry "
    "(default: leave the overlay for the next start to re-sync).",
)
@click.option(
    "--resync",
    default="30s",
    show_default=True,
    help="Also re-read and repair the kernel state this often.",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(
    name: str,
    control_plane: str,
    ca_bundle: Path,
    join_token: Path,
    underlay_address: str,
    underlay_dev: str | None,
    vni: int,
    port: int,
    state_dir: Path,
    teardown_on_exit: bool,
    resync: str,
    log_level: str,
) -> None:
    """Build this host's overlay from the control plane's node map and keep it in sync."""
    from meshlet import logs
    from meshlet.durations import parse_duration
    from node.app import NodeConfig
    from node.app import run as run_app

    try:
        check_dns_label(name, "--name")
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        underlay = str(ipaddress.IPv4Address(underlay_address))
    except ValueError:
        raise InputError(
            f"--underlay-address {underlay_address!r} is not an IPv4 address"
        ) from None
    if not 1 <= vni <= VNI_MAX:
        raise InputError(f"--vni {vni} is out of range 1-{VNI_MAX}")
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port} is out of range 1-65535")
    cfg = NodeConfig(
        name=name,
        control_plane=format_hostport(*parse_hostport(control_plane, what="--control-plane")),
        ca_bundle=ca_bundle,
        join_token=join_token,
        underlay_address=underlay,
        underlay_dev=underlay_dev,
        vni=vni,
        port=port,
        state_dir=state_dir,
        teardown_on_exit=teardown_on_exit,
        resync_s=parse_duration(resync, what="--resync"),
    )
    logs.setup(log_level)
    asyncio.run(run_app(cfg))  # not uvloop: it cannot open pyroute2's netlink sockets


@main.command("attach")
@click.option(
    "--netns",
    required=True,
    help="The container's network namespace: a name (ip netns) or a path (/proc/PID/ns/net).",
)
@click.option("--service", required=True, metavar="NS/NAME", help="The service it runs.")
@StateDir
@click.option("--name", "node", help="The node (default: the only one in --state-dir).")
@click.option("--json", "as_json", is_flag=True, help="Print every detail as JSON.")
def attach(netns: str, service: str, state_dir: Path, node: str | None, as_json: bool) -> None:
    """Give a container's namespace an eth0 on this node's bridge; print its address."""
    from node.attach import attach as do_attach

    attached = asyncio.run(do_attach(state_dir=state_dir, node=node, netns=netns, service=service))
    click.echo(json.dumps(attached.to_data()) if as_json else attached.address)


@main.command("detach")
@click.option("--netns", required=True, help="The namespace given to attach.")
@StateDir
@click.option("--name", "node", help="The node (default: the only one in --state-dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def detach(netns: str, state_dir: Path, node: str | None, as_json: bool) -> None:
    """Remove a container's eth0 and free its address (nothing to do is fine)."""
    from node.attach import detach as do_detach

    detached = asyncio.run(do_detach(state_dir=state_dir, node=node, netns=netns))
    if as_json:
        click.echo(json.dumps(detached.to_data()))
    elif detached.address is not None:
        click.echo(f"detached {netns}: freed {detached.address}")
    else:
        click.echo(f"{netns} was not attached: nothing to do")
