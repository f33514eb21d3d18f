"""`meshlet sidecar ...`: the sidecar's commands. `init` installs (or removes) traffic
interception in the current network namespace.

Flags become an InterceptConfig (validated in sidecar/intercept.py), the script comes
from intercept.ruleset, and sidecar/nft.py applies it. This module only parses flags and
prints one line; it must never build rules itself or catch MeshError (the dispatcher in
meshlet/cli.py prints it as `meshlet: error: ...`). Other commands (`run`) join the group
with ``@main.command()``.
"""

from __future__ import annotations

import click

from sidecar import intercept, nft
from sidecar.cli_run import run as run_command


@click.group("sidecar")
def main() -> None:
    """The per-container sidecar proxy and its traffic interception."""


@main.command("init")
@click.option(
    "--outbound-port",
    type=int,
    metavar="PORT",
    default=15001,
    show_default=True,
    help="Outbound listener: the app's TCP connections are redirected here.",
)
@click.option(
    "--inbound-port",
    type=int,
    metavar="PORT",
    default=15006,
    show_default=True,
    help="Inbound mTLS listener: its traffic is never captured.",
)
@click.option(
    "--dns",
    "dns_text",
    metavar="ADDR[:PORT]",
    help="The sidecar's DNS (like 127.0.0.53:53): the app's DNS (port 53) goes "
    "there. Omit to leave DNS alone.",
)
@click.option(
    "--exclude-ports",
    multiple=True,
    metavar="PORT[,PORT...]",
    help="Destination ports the app reaches directly (comma-separated, repeatable).",
)
@click.option(
    "--exclude-cidrs",
    multiple=True,
    metavar="CIDR[,CIDR...]",
    help="Destination networks the app reaches directly (comma-separated, repeatable).",
)
@click.option(
    "--proxy-uid",
    type=int,
    metavar="UID",
    help="User id the sidecar runs as: its own traffic is never captured.",
)
@click.option(
    "--proxy-mark",
    default="0x539",
    metavar="MARK",
    show_default=True,
    help="Packet mark (SO_MARK) the sidecar may set instead: never captured.",
)
@click.option(
    "--capture-loopback",
    is_flag=True,
    help="Also capture TCP that stays in the namespace (127.0.0.0/8, ::1, own addresses).",
)
@click.option(
    "--remove",
    is_flag=True,
    help="Remove what `init` installed (table inet meshlet) and nothing else; "
    "other flags are ignored.",
)
@click.option("--dry-run", is_flag=True, help="Print the nft script instead of applying it.")
def init(
    outbound_port: int,
    inbound_port: int,
    dns_text: str | None,
    exclude_ports: tuple[str, ...],
    exclude_cidrs: tuple[str, ...],
    proxy_uid: int | None,
    proxy_mark: str,
    capture_loopback: bool,
    remove: bool,
    dry_run: bool,
) -> None:
    """Install nftables interception in this network namespace (needs NET_ADMIN).

    The app's outbound TCP goes to the outbound listener, its DNS to the sidecar's DNS;
    the sidecar's own traffic (--proxy-uid or --proxy-mark) is left alone. Running it
    again replaces the rules; --remove deletes exactly what it added.
    """
    if remove:
        if dry_run:
            click.echo(intercept.removal(), nl=False)
            return
        existed = nft.remove()
        table = f"table {intercept.FAMILY} {intercept.TABLE}"
        click.echo(
            f"removed {table}" if existed else f"nothing to remove: {table} is not installed"
        )
        return
    cfg = intercept.InterceptConfig(
        outbound_port=outbound_port,
        inbound_port=inbound_port,
        dns=intercept.parse_dns(dns_text) if dns_text is not None else None,
        exclude_ports=intercept.parse_ports(exclude_ports),
        exclude_cidrs=intercept.parse_cidrs(exclude_cidrs),
        proxy_uid=proxy_uid,
        proxy_mark=intercept.parse_mark(proxy_mark),
        capture_loopback=capture_loopback,
    )
    if dry_run:
        click.echo(intercept.ruleset(cfg), nl=False)
        return
    nft.ensure(cfg)
    click.echo(f"installed {intercept.summary(cfg)}")


main.add_command(run_command)
