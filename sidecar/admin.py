"""The sidecar's admin endpoint on 127.0.0.1 (Envoy's paths): /ready, /stats/prometheus,
/clusters, /config_dump, /certs, and POST /drain_listeners, /healthcheck/fail|ok,
/quitquitquit. A GET on a mutating path is 405. Never serves a key.

For: what each path answers (``respond``), free of any HTTP server. ``admin_server``
serves it on a small asyncio HTTP/1.1 server (no aiohttp in an idle sidecar: ~11 MiB).
Must never: import aiohttp at module level.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from meshlet import wire
from sidecar.breaker import Breaker
from sidecar.catalog import Catalog
from sidecar.clusters import Clusters
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics


@dataclass(slots=True, kw_only=True)
class AdminState:
    cfg: SidecarConfig
    metrics: SidecarMetrics
    clusters: Clusters
    catalog: Callable[[], Catalog]
    certs: Callable[[], dict[str, Any] | None]  # None until the first certificate
    discovery: Callable[[], dict[str, Any]]  # connected, revision, has_snapshot
    drain: Callable[[], Coroutine[Any, Any, None]]
    quit: Callable[[], None]
    failing: bool = False
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(data: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(data, option=orjson.OPT_INDENT_2))


async def _app_accepts(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def ready(st: AdminState) -> Reply:
    reasons = []
    if st.certs() is None:
        reasons.append("no workload certificate yet")
    if not st.discovery()["has_snapshot"]:
        reasons.append("no mesh map yet (control plane not reached, no cache)")
    if st.cfg.app_port is not None and not await _app_accepts(st.cfg.app_host, st.cfg.app_port):
        reasons.append(
            f"the app does not accept connections on {st.cfg.app_host}:{st.cfg.app_port}"
        )
    if st.draining:
        reasons.append("draining")
    if st.failing:
        reasons.append("health check failed by POST /healthcheck/fail")
    if reasons:
        return _json({"ready": False, "reasons": reasons}, status=503)
    return _json({"ready": True})


async def prometheus(st: AdminState) -> Reply:
    cert = st.certs()
    if cert is not None:
        st.metrics.cert_expiry.set(cert["expires_in_s"])
    disc = st.discovery()
    st.metrics.discovery_connected.set(1 if disc["connected"] else 0)
    st.metrics.discovery_revision.set(disc["revision"])
    for key, cluster in st.clusters.by_service.items():
        st.metrics.ejected.labels(key).set(len(cluster.outlier.ejected()))
    return Reply(200, st.metrics.render(), "text/plain; charset=utf-8")


async def clusters(st: AdminState) -> Reply:
    catalog = st.catalog()
    out = []
    for key in sorted(catalog.services):
        svc = catalog.services[key]
        cluster = st.clusters.by_service.get(key)
        endpoints = []
        for ep in catalog.everyone.get(key, ()):
            state = cluster.outlier.state(ep.id) if cluster else None
            endpoints.append(
                {
                    "id": ep.id,
                    "address": f"{ep.address}:{ep.inbound_port}",
                    "identity": ep.identity,
                    "health": ep.health.value,
                    "labels": ep.labels,
                    "ejected_until": state.ejected_until if state else None,
                    "consecutive_failures": state.consecutive_failures if state else 0,
                }
            )
        # A service nobody has called yet has no runtime state: show its policy's limits.
        stats = (cluster.breaker if cluster else Breaker(svc.policy.circuit_breaker)).stats()
        breaker = {
            s.kind.value: {"in_use": s.in_use, "limit": s.limit, "overflows": s.overflows}
            for s in stats
        }
        out.append(
            {
                "service": key,
                "vip": svc.vip,
                "ports": [p.port for p in svc.ports],
                "endpoints": endpoints,
                "circuit_breaker": breaker,
            }
        )
    return _json({"revision": catalog.revision, "clusters": out})


async def config_dump(st: AdminState) -> Reply:
    catalog = st.catalog()
    cfg = st.cfg
    return _json(
        {
            "sidecar": {
                "service": f"{cfg.namespace}/{cfg.service}",
                "mode": cfg.mode.value,
                "app_port": cfg.app_port,  # None: outbound only
                "outbound_only": cfg.outbound_only,
                "inbound": list(cfg.inbound),
                "outbound": list(cfg.outbound),
                "admin": list(cfg.admin),
                "address": cfg.address,
                "endpoint_id": cfg.resolved_endpoint_id,
                "upstreams": [
                    f"{u.service_key}:{u.port}={u.listen[0]}:{u.listen[1]}" for u in cfg.upstreams
                ],
            },
            "discovery": st.discovery(),
            "revision": catalog.revision,
            "services": [wire.to_data(catalog.services[k]) for k in sorted(catalog.services)],
            "endpoints": {
                k: [wire.to_data(e) for e in v] for k, v in sorted(catalog.everyone.items())
            },
        }
    )


async def certs(st: AdminState) -> Reply:
    cert = st.certs()
    if cert is None:
        return _json({"error": "no certificate yet"}, status=503)
    return _json(cert)


async def drain_listeners(st: AdminState) -> Reply:
    st.draining = True
    asyncio.get_running_loop().create_task(st.drain())
    return _json({"draining": True})


async def healthcheck_fail(st: AdminState) -> Reply:
    st.failing = True
    return _json({"failing": True})


async def healthcheck_ok(st: AdminState) -> Reply:
    st.failing = False
    return _json({"failing": False})


async def quitquitquit(st: AdminState) -> Reply:
    asyncio.get_running_loop().call_soon(st.quit)
    return _json({"quitting": True})


ROUTES: dict[str, tuple[str, Callable[[AdminState], Awaitable[Reply]]]] = {
    "/ready": ("GET", ready),
    "/stats/prometheus": ("GET", prometheus),
    "/clusters": ("GET", clusters),
    "/config_dump": ("GET", config_dump),
    "/certs": ("GET", certs),
    "/drain_listeners": ("POST", drain_listeners),
    "/healthcheck/fail": ("POST", healthcheck_fail),
    "/healthcheck/ok": ("POST", healthcheck_ok),
    "/quitquitquit": ("POST", quitquitquit),
}


async def respond(state: AdminState, method: str, path: str) -> tuple[Reply, str | None]:
    """The reply to ``method path`` (query ignored) and, for a 405, the allowed method."""
    route = ROUTES.get(path.partition("?")[0])
    if route is None:
        return _json({"error": f"no admin path {path}"}, status=404), None
    allowed, handler = route
    if method == allowed or (method == "HEAD" and allowed == "GET"):
        return await handler(state), None
    return _json({"error": f"{path} takes {allowed}"}, status=405), allowed
