"""`meshlet control-plane run`: flags → RunConfig → app.run on uvloop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from meshlet.addresses import parse_hostport


@click.group("control-plane")
def main() -> None:
    """Run the control plane."""


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="State, CA (DIR/ca) and tokens live here.",
)
@click.option("--api", default="127.0.0.1:15080", show_default=True, help="Admin REST API address.")
@click.option(
    "--grpc",
    "grpc_addr",
    default="127.0.0.1:15010",
    show_default=True,
    help="gRPC discovery + signing address.",
)
@click.option(
    "--grpc-mtls",
    default="127.0.0.1:15012",
    show_default=True,
    help="gRPC for clients with an SVID (renewal).",
)
@click.option(
    "--trust-domain",
    default="mesh.local",
    show_default=True,
    help="SPIFFE trust domain (used when creating the CA).",
)
@click.option("--store", default="sqlite", show_default=True, help="State backend.")
@click.option(
    "--vip-cidr", default="198.19.128.0/17", show_default=True, help="Range service VIPs come from."
)
@click.option(
    "--overlay-cidr",
    default="198.19.0.0/17",
    show_default=True,
    help="Range node /24 subnets come from.",
)
@click.option(
    "--endpoint-ttl",
    default="15s",
    show_default=True,
    help="Missed heartbeats for this long mark an endpoint unhealthy.",
)
@click.option(
    "--deregister-after", default="60s", show_default=True, help="…and for this long deregister it."
)
@click.option(
    "--public-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep DIR/bundle.pem and DIR/join-token current here (and nothing else), "
    "for sidecars to mount instead of --data-dir.",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def run(
    data_dir: Path,
    api: str,
    grpc_addr: str,
    grpc_mtls: str,
    trust_domain: str,
    store: str,
    vip_cidr: str,
    overlay_cidr: str,
    endpoint_ttl: str,
    deregister_after: str,
    public_dir: Path | None,
    log_level: str,
) -> None:
    """Serve the admin API and gRPC until SIGTERM."""
    import uvloop

    from certs.spiffe import validate_trust_domain
    from control_plane.app import RunConfig
    from control_plane.app import run as run_app
    from control_plane.registry import Config
    from meshlet import logs
    from meshlet.durations import parse_duration

    validate_trust_domain(trust_domain)
    Config(trust_domain=trust_domain, vip_cidr=vip_cidr, overlay_cidr=overlay_cidr)  # validates
    cfg = RunConfig(
        data_dir=data_dir,
        api=parse_hostport(api, what="--api"),
        grpc=parse_hostport(grpc_addr, what="--grpc"),
        grpc_mtls=parse_hostport(grpc_mtls, what="--grpc-mtls"),
        trust_domain=trust_domain,
        store=store,
        vip_cidr=vip_cidr,
        overlay_cidr=overlay_cidr,
        ttl_s=parse_duration(endpoint_ttl, what="--endpoint-ttl"),
        deregister_after_s=parse_duration(deregister_after, what="--deregister-after"),
        public_dir=public_dir,
    )
    logs.setup(log_level)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run_app(cfg))
