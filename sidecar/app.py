"""One sidecar process: wiring only (STYLE.md rule 8).

Start order: identity (a certificate, from cert-dir or the control plane), the mesh map
(from the disk cache at once, then the live stream), listeners, DNS, admin, then the
registration. SIGTERM drains: the endpoint is marked draining, inbound stops
accepting, open connections get up to the drain timeout, the endpoint is deregistered,
and the process exits 0. The event loop is uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import resource
import signal
from pathlib import Path
from typing import Any

import grpc

from certs import pki
from certs.spiffe import SpiffeId
from meshlet.errors import InputError, MeshError
from meshlet.model import Endpoint
from meshlet.runtime import Runtime
from sidecar.accesslog_sink import AccessLogSink
from sidecar.admin import AdminState
from sidecar.admin_server import AdminServer
from sidecar.backoff import delay
from sidecar.clusters import Clusters
from sidecar.config import SidecarConfig
from sidecar.discovery import Discovery
from sidecar.h2_inbound import H2Inbound
from sidecar.h2_outbound import H2Outbound
from sidecar.identity import Identity
from sidecar.inbound import Inbound
from sidecar.l7_inbound import L7Inbound
from sidecar.l7_outbound import L7Outbound, ServiceState
from sidecar.metrics import SidecarMetrics
from sidecar.outbound import Open, Outbound
from sidecar.registration import Registrar

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror}") from None


class ChannelHolder:
    """The mTLS channel to the control plane, remade whenever our certificate changes."""

    def __init__(self, address: str, identity: Identity) -> None:
        self.address = address
        self.identity = identity
        self._channel: grpc.aio.Channel | None = None
        self._serial: str | None = None
        self._old: list[grpc.aio.Channel] = []

    def __call__(self) -> grpc.aio.Channel:
        serial = self.identity.contexts.serial
        if self._channel is None or serial != self._serial:
            if self._channel is not None:
                self._old.append(self._channel)
            self._channel = self.identity.channel(self.address)
            self._serial = serial
        return self._channel

    async def close(self) -> None:
        for ch in [*self._old, *([self._channel] if self._channel else [])]:
            await ch.close()


async def _ensure_identity(identity: Identity, stop: asyncio.Event, rt: Runtime) -> bool:
    attempt = 0
    while not stop.is_set():
        try:
            await identity.ensure()
            return True
        except InputError:
            raise
        except MeshError as e:
            attempt += 1
            wait = delay(attempt, 0.5, 30.0, rt.rng)
            log.warning(
                "no certificate yet; retrying",
                extra={"error": str(e), "retry_in_s": round(wait, 2)},
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
    return False


def _raise_fd_limit() -> None:
    """Each proxied connection holds two descriptors: allow as many as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(cfg: SidecarConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    _raise_fd_limit()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rt = Runtime.system()
    bundle = _read(cfg.ca_bundle, "--ca-bundle")
    roots = pki.load_certs(bundle, source=str(cfg.ca_bundle))
    trust_domain = pki.trust_domain_of(roots[0])
    token = _read(cfg.join_token, "--join-token").decode().strip() if cfg.join_token else None
    identity = Identity(
        cfg.cert_dir,
        SpiffeId.for_workload(trust_domain, cfg.namespace, cfg.service),
        control_plane=cfg.control_plane,
        control_plane_mtls=cfg.control_plane_mtls,
        bundle_pem=bundle,
        join_token=token,
        ttl_s=cfg.cert_ttl_s,
        clock=rt.clock,
        rng=rt.rng,
    )
    if not await _ensure_identity(identity, stop, rt):
        return
    clusters = Clusters(rt.clock, rt.rng)
    discovery = Discovery(
        identity,
        control_plane_mtls=cfg.control_plane_mtls,
        client_id=cfg.resolved_endpoint_id,
        cache_path=cfg.cache_path,
        clock=rt.clock,
        rng=rt.rng,
        on_catalog=clusters.update,
    )
    discovery.load_cache()
    connections: set[Open] = set()
    metrics = SidecarMetrics(
        live=lambda: [
            (c.direction, c.service, c.stats.bytes_a_to_b, c.stats.bytes_b_to_a)
            for c in connections
        ]
    )
    try:
        access_log = AccessLogSink(cfg.access_log)
    except OSError as e:
        raise InputError(f"--access-log {cfg.access_log}: {e.strerror}") from None
    service_states: dict[str, ServiceState] = {}  # one retry budget per service, h1 and h2
    l7_outbound = L7Outbound(
        states=service_states,
        catalog=lambda: discovery.catalog,
        clusters=clusters,
        contexts=lambda: identity.contexts,
        metrics=metrics,
        runtime=rt,
        access_log=access_log,
        header_timeout_s=cfg.http_header_timeout_s,
    )
    l7_inbound = L7Inbound(
        cfg,
        catalog=lambda: discovery.catalog,
        metrics=metrics,
        runtime=rt,
        access_log=access_log,
        identity=str(identity.spiffe_id),
        header_timeout_s=cfg.http_header_timeout_s,
    )
    h2_outbound = H2Outbound(
        states=service_states,
        catalog=lambda: discovery.catalog,
        clusters=clusters,
        contexts=lambda: identity.contexts,
        metrics=metrics,
        runtime=rt,
        access_log=access_log,
    )
    h2_inbound = H2Inbound(
        cfg,
        catalog=lambda: discovery.catalog,
        metrics=metrics,
        runtime=rt,
        access_log=access_log,
        identity=str(identity.spiffe_id),
    )
    outbound = Outbound(
        cfg,
        catalog=lambda: discovery.catalog,
        clusters=clusters,
        contexts=lambda: identity.contexts,
        metrics=metrics,
        connections=connections,
        l7=l7_outbound.serve,
        h2=h2_outbound.serve,
    )
    inbound = Inbound(
        cfg,
        trust_domain=trust_domain,
        catalog=lambda: discovery.catalog,
        contexts=lambda: identity.contexts,
        metrics=metrics,
        connections=connections,
        l7=l7_inbound.serve,
        h2=h2_inbound.serve,
    )
    if not cfg.outbound_only:
        await inbound.start()
    await outbound.start()
    dns_server = await _start_dns(cfg, lambda: discovery.catalog)
    channels = ChannelHolder(cfg.control_plane_mtls, identity)
    # An outbound-only workload serves nothing, so it has no endpoint to register.
    registrar = (
        None if cfg.app_port is None else _registrar(cfg, cfg.app_port, inbound.port, channels, rt)
    )
    drained = asyncio.Event()

    async def drain() -> None:
        if drained.is_set():
            return
        drained.set()
        admin_state.draining = True
        log.info("draining", extra={"open": len(connections), "timeout_s": cfg.drain_timeout_s})
        if registrar is not None:
            await registrar.drain()
        inbound.stop_accepting()
        open_inbound: list[asyncio.Future[None]] = [
            c.relay.done for c in connections if c.direction == "inbound"
        ]
        open_inbound += l7_inbound.drain()
        open_inbound += h2_inbound.drain(cfg.drain_timeout_s)
        if open_inbound:
            await asyncio.wait(open_inbound, timeout=cfg.drain_timeout_s)

    def certs() -> dict[str, Any] | None:
        try:
            ctx = identity.contexts
        except MeshError:
            return None
        left = (ctx.not_after - dt.datetime.now(dt.UTC)).total_seconds()
        return {
            "spiffe_id": str(identity.spiffe_id),
            "serial": ctx.serial,
            "not_after": ctx.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expires_in_s": int(left),
            "bundle_fingerprint": ctx.bundle_fingerprint,
        }

    admin_state = AdminState(
        cfg=cfg,
        metrics=metrics,
        clusters=clusters,
        catalog=lambda: discovery.catalog,
        certs=certs,
        discovery=lambda: {
            "connected": discovery.connected,
            "revision": discovery.revision,
            "has_snapshot": discovery.first_snapshot.is_set(),
        },
        drain=drain,
        quit=stop.set,
    )
    admin_server = AdminServer(admin_state)
    await admin_server.start(cfg.admin[0], cfg.admin[1])
    log.info(
        "sidecar serving",
        extra={
            "service": f"{cfg.namespace}/{cfg.service}",
            "inbound": None if cfg.outbound_only else inbound.port,
            "outbound": outbound.bound(),
            "admin": admin_server.port,
            "mode": cfg.mode.value,
        },
    )
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(identity.run()), tg.create_task(discovery.run())]
            if registrar is not None:
                tasks.append(tg.create_task(registrar.run()))
            await stop.wait()
            await drain()
            if registrar is not None:
                await registrar.deregister()
            for t in tasks:
                t.cancel()
    finally:
        await outbound.stop()
        await inbound.stop()
        for c in list(connections):
            c.relay.abort()
        l7_outbound.close()
        l7_inbound.close()
        h2_outbound.close()
        h2_inbound.close()
        access_log.close()
        if dns_server is not None:
            await dns_server.stop()
        await admin_server.close()
        await channels.close()
        log.info("sidecar stopped")


def _registrar(
    cfg: SidecarConfig, app_port: int, inbound_port: int, channels: ChannelHolder, rt: Runtime
) -> Registrar:
    endpoint = Endpoint(
        id=cfg.resolved_endpoint_id,
        namespace=cfg.namespace,
        service=cfg.service,
        address=cfg.address,
        app_port=app_port,
        inbound_port=inbound_port,
        node=cfg.node,
        labels=dict(cfg.labels),
    )
    return Registrar(
        channels, endpoint, service_ports=cfg.service_ports, clock=rt.clock, rng=rt.rng
    )


async def _start_dns(cfg: SidecarConfig, catalog: Any) -> Any:
    if cfg.dns is None:
        return None
    from sidecar.dns import parse_resolv_conf
    from sidecar.dns_server import DnsServer

    try:
        text = await asyncio.to_thread(Path("/etc/resolv.conf").read_text)
    except OSError:
        text = ""
    upstreams = [(a, 53) for a in parse_resolv_conf(text, exclude=[cfg.dns[0]])]
    server = DnsServer(cfg.dns, catalog, cfg.namespace, upstreams)
    await server.start()
    return server
