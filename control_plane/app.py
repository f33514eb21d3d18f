"""One control-plane process: wiring only (STYLE.md rule 8).

Opens the store, loads the registry, starts the CA, the admin API and gRPC, runs the
health and CA-rotation loops, and on SIGTERM stops accepting, drains and closes the
store. Writes DATA_DIR/control-plane.json with the bound addresses once serving. With a
public dir, keeps DIR/bundle.pem and DIR/join-token current (at start and whenever the
CA directory changes) and writes nothing else there: sidecars mount that instead of
DATA_DIR, which holds the CA's keys and the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from certs.files import PUBLIC, SECRET, ensure_private_dir, write_files
from control_plane.api import ApiContext, make_app
from control_plane.ca import Authority
from control_plane.core import ControlPlane
from control_plane.discovery import GrpcServer
from control_plane.health import HealthTracker
from control_plane.node_rpc import SERVICE_NAME as NODES_SERVICE
from control_plane.node_rpc import NodesServicer
from control_plane.registry import Config
from control_plane.store import open_store
from meshlet.addresses import format_hostport
from meshlet.errors import InputError, MeshError, NotFoundError
from meshlet.proto import mesh_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    data_dir: Path
    api: tuple[str, int] = ("127.0.0.1", 15080)
    grpc: tuple[str, int] = ("127.0.0.1", 15010)
    grpc_mtls: tuple[str, int] = ("127.0.0.1", 15012)  # same services; clients present their SVID
    trust_domain: str = "mesh.local"
    store: str = "sqlite"
    vip_cidr: str = "198.19.128.0/17"
    overlay_cidr: str = "198.19.0.0/17"
    ttl_s: float = 15.0
    deregister_after_s: float = 60.0
    bookmark_s: float = 15.0
    ca_poll_s: float = 2.0
    public_dir: Path | None = None  # DIR/bundle.pem and DIR/join-token only, for sidecars


PUBLIC_BUNDLE, PUBLIC_TOKEN = "bundle.pem", "join-token"
PUBLIC_TOKEN_MODE = 0o640  # sidecars run as the control plane's uid (1337) in compose


def ensure_token(path: Path) -> str:
    """Read the token at ``path``, creating a random one (0600) on first start."""
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_files(path.parent, {path.name: (token.encode() + b"\n", SECRET)})
    return token


async def every(interval: float, stop: asyncio.Event, step: Callable[[], Awaitable[None]]) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if not stop.is_set():
            try:
                await step()
            except MeshError as e:
                log.warning("periodic step failed", extra={"step": step.__name__, "error": str(e)})


async def run(cfg: RunConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ensure_private_dir(cfg.data_dir)
    admin_token = ensure_token(cfg.data_dir / "admin-token")
    join_token = ensure_token(cfg.data_dir / "join-token")
    store = open_store(cfg.store, cfg.data_dir)
    async with store:
        cp = ControlPlane(
            store,
            Config(
                trust_domain=cfg.trust_domain, vip_cidr=cfg.vip_cidr, overlay_cidr=cfg.overlay_cidr
            ),
        )
        await cp.load()
        tracker = HealthTracker(
            ttl_s=cfg.ttl_s, deregister_after_s=cfg.deregister_after_s, node_ttl_s=cfg.ttl_s
        )
        authority, grpc_server = await _start_identity(cfg, cp, join_token, tracker)
        published = _publish(cfg.public_dir, authority, last=None)
        ctx = ApiContext(cp=cp, health=tracker, ca=authority, bookmark_s=cfg.bookmark_s)
        runner = web.AppRunner(
            make_app(ctx, admin_token=admin_token), access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, cfg.api[0], cfg.api[1], reuse_address=True)
        await site.start()
        api_port = runner.addresses[0][1]
        _write_addresses(cfg, api_port, grpc_server)
        log.info(
            "control plane serving",
            extra={
                "api": format_hostport(cfg.api[0], api_port),
                "revision": cp.revision,
                "data_dir": str(cfg.data_dir),
            },
        )

        async def check_health() -> None:
            for command in tracker.due(cp.state, time.monotonic()):
                with contextlib.suppress(NotFoundError):  # raced with a deregistration
                    await cp.execute(command)

        async def check_ca() -> None:
            if authority.poll():
                log.info(
                    "CA directory changed: signing with the current issuer, pushing the bundle"
                )
                grpc_server.bundle_changed()
            nonlocal published
            published = _publish(cfg.public_dir, authority, last=published)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(every(1.0, stop, check_health))
                tg.create_task(every(cfg.ca_poll_s, stop, check_ca))
                await stop.wait()
        finally:
            log.info("control plane stopping")
            await grpc_server.stop(grace=1.0)
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                (cfg.data_dir / "control-plane.json").unlink()


async def _start_identity(
    cfg: RunConfig, cp: ControlPlane, join_token: str, tracker: HealthTracker
) -> tuple[Authority, GrpcServer]:
    """The CA and the gRPC server (discovery + signing + registration and node registration,
    which heartbeat into the same tracker as the admin API)."""
    authority = Authority.open(cfg.data_dir, trust_domain=cfg.trust_domain, join_token=join_token)
    nodes = NodesServicer(cp, authority, tracker)
    server = GrpcServer(
        cp,
        authority,
        bookmark_s=cfg.bookmark_s,
        health_tracker=tracker,
        extra_services=[
            (NODES_SERVICE, lambda s: mesh_pb2_grpc.add_NodesServicer_to_server(nodes, s))  # type: ignore[no-untyped-call]
        ],
    )
    await server.start(format_hostport(*cfg.grpc), mtls_address=format_hostport(*cfg.grpc_mtls))
    return authority, server


def _publish(
    public_dir: Path | None, authority: Authority, *, last: tuple[bytes, bytes] | None
) -> tuple[bytes, bytes] | None:
    """Write the bundle and the join token to ``public_dir`` (atomically) if they differ
    from ``last``, what was written last; returns what is there now."""
    if public_dir is None:
        return None
    now = (authority.bundle_pem, authority.join_token.encode() + b"\n")
    if now != last:
        try:
            public_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create --public-dir {public_dir}: {e.strerror}") from e
        write_files(
            public_dir,
            {PUBLIC_BUNDLE: (now[0], PUBLIC), PUBLIC_TOKEN: (now[1], PUBLIC_TOKEN_MODE)},
        )
        log.info("public files written", extra={"public_dir": str(public_dir)})
    return now


def _write_addresses(cfg: RunConfig, api_port: int, grpc: GrpcServer) -> None:
    assert grpc.port is not None and grpc.mtls_port is not None, "gRPC is not listening"
    info = {
        "pid": os.getpid(),
        "api": format_hostport(cfg.api[0], api_port),
        "grpc": format_hostport(cfg.grpc[0], grpc.port),
        "grpc_mtls": format_hostport(cfg.grpc_mtls[0], grpc.mtls_port),
        "trust_domain": cfg.trust_domain,
    }
    write_files(cfg.data_dir, {"control-plane.json": (json.dumps(info).encode(), PUBLIC)})
