"""The admin REST API (aiohttp): services, endpoints, nodes, VIPs, the snapshot, the CA.

Handlers translate HTTP into registry commands and back; they decide nothing
themselves. Every GET is a blocking query (``?index=N&wait=30s``) and answers with
``X-Mesh-Index``; list GETs also stream (``?watch=1&since=REV``). The route table at
the bottom is also the source of /openapi.json.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from control_plane import http, openapi
from control_plane.core import ControlPlane
from control_plane.health import HealthTracker
from control_plane.registry import (
    DeleteNode,
    DeleteService,
    DeregisterEndpoint,
    PutNode,
    PutService,
    RegisterEndpoint,
    SetEndpointHealth,
)
from meshlet import wire
from meshlet.errors import InputError
from meshlet.model import Endpoint, Health, Kind, Node, Service, ServicePort


class CaView(Protocol):
    """What the API needs of the certificate authority (control_plane.ca.Authority)."""

    def report(self) -> dict[str, Any]: ...
    def reload(self) -> bool: ...


@dataclass(slots=True, kw_only=True)
class ApiContext:
    cp: ControlPlane
    health: HealthTracker
    ca: CaView | None = None
    rng: random.Random = field(default_factory=random.Random)
    monotonic: Callable[[], float] = time.monotonic
    bookmark_s: float = 15.0
    ready: bool = True
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)


CTX = web.AppKey("ctx", ApiContext)
GAUGES = web.AppKey("gauges", dict)
REQUESTS = web.AppKey("requests", tuple)


def _ctx(request: web.Request) -> ApiContext:
    return request.app[CTX]


def _items(
    objs: list[Any], revision: int, render: Callable[[Any], Any] = wire.to_data
) -> web.Response:
    return http.json_response(
        {"revision": revision, "items": [render(o) for o in objs]}, revision=revision
    )


def _result_header(events: list[Any], created: bool) -> dict[str, str]:
    return {"X-Mesh-Result": "unchanged" if not events else "created" if created else "updated"}


# ---- services -------------------------------------------------------------------------------


async def list_services(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if request.query.get("watch"):
        return await http.watch_stream(
            request, ctx.cp, frozenset({Kind.SERVICE}), bookmark_s=ctx.bookmark_s
        )
    revision = await http.block(request, ctx.cp, ctx.rng)
    services = ctx.cp.state.services
    return _items([services[k] for k in sorted(services)], revision)


def _service_key(request: web.Request) -> tuple[str, str]:
    return request.match_info["namespace"], request.match_info["name"]


async def get_service(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    revision = await http.block(request, ctx.cp, ctx.rng)
    ns, name = _service_key(request)
    svc = ctx.cp.state.services.get(f"{ns}/{name}")
    if svc is None:
        return http.error_response(404, "not_found", f"service {ns}/{name} does not exist")
    return http.json_response(wire.to_data(svc), revision=revision)


SERVICE_BODY_FIELDS = {"ports", "policy", "namespace", "name", "vip"}


async def put_service(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    ns, name = _service_key(request)
    body = await http.read_json(request)
    if not isinstance(body, dict):
        raise InputError(
            'the body must be a JSON object like {"ports": [{"port": 8080, "protocol": "http"}]}'
        )
    unknown = sorted(set(body) - SERVICE_BODY_FIELDS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}: a service takes ports and policy")
    for key, want in (("namespace", ns), ("name", name)):
        if key in body and body[key] != want:
            raise InputError(f"{key} {body[key]!r} in the body does not match the path ({want!r})")
    existing = ctx.cp.state.services.get(f"{ns}/{name}")
    if "vip" in body and (existing is None or body["vip"] != existing.vip):
        raise InputError("vip is allocated by the control plane and cannot be set")
    if "ports" not in body:
        raise InputError(
            'ports: required field is missing (e.g. [{"port": 8080, "protocol": "http"}])'
        )
    # Validate the whole service once, so errors name the fields as the user wrote them.
    svc = wire.from_data(
        Service,
        {"namespace": ns, "name": name, "ports": body["ports"], "policy": body.get("policy", {})},
    )
    revision, events = await ctx.cp.execute(
        PutService(namespace=ns, name=name, ports=svc.ports, policy=svc.policy)
    )
    stored = ctx.cp.state.services[svc.key]
    return http.json_response(
        wire.to_data(stored),
        status=201 if existing is None else 200,
        revision=revision,
        headers=_result_header(events, existing is None),
    )


async def delete_service(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    ns, name = _service_key(request)
    revision, events = await ctx.cp.execute(DeleteService(namespace=ns, name=name))
    return http.json_response(
        {"deleted": [f"{e.kind.value}/{e.key}" for e in events], "revision": revision},
        revision=revision,
    )


def _render_endpoint(ctx: ApiContext) -> Callable[[Endpoint], dict[str, Any]]:
    now = ctx.monotonic()

    def render(ep: Endpoint) -> dict[str, Any]:
        data: dict[str, Any] = wire.to_data(ep)
        seen = ctx.health.last_seen(ep.id)
        data["last_heartbeat_age_s"] = None if seen is None else round(now - seen, 3)
        return data

    return render


async def service_endpoints(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    revision = await http.block(request, ctx.cp, ctx.rng)
    ns, name = _service_key(request)
    if f"{ns}/{name}" not in ctx.cp.state.services:
        return http.error_response(404, "not_found", f"service {ns}/{name} does not exist")
    passing = "passing" in request.query
    return _items(
        ctx.cp.snapshot.endpoints_of(ns, name, passing=passing), revision, _render_endpoint(ctx)
    )


# ---- endpoints --------------------------------------------------------------------------------


async def list_endpoints(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if request.query.get("watch"):
        return await http.watch_stream(
            request, ctx.cp, frozenset({Kind.ENDPOINT}), bookmark_s=ctx.bookmark_s
        )
    revision = await http.block(request, ctx.cp, ctx.rng)
    eps = ctx.cp.state.endpoints
    return _items([eps[k] for k in sorted(eps)], revision, _render_endpoint(ctx))


async def register_endpoint(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    body = await http.read_json(request)
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object describing the endpoint")
    ports_data = body.pop("service_ports", [])
    ep = wire.from_data(Endpoint, body)
    ports = tuple(
        wire.from_data(ServicePort, p, what=f"service_ports.{i}") for i, p in enumerate(ports_data)
    )
    existed = ep.id in ctx.cp.state.endpoints
    revision, events = await ctx.cp.execute(
        RegisterEndpoint(endpoint=ep, create_service_ports=ports)
    )
    ctx.health.endpoint_heartbeat(ctx.cp.state, ep.id, ctx.monotonic())
    stored = ctx.cp.state.endpoints[ep.id]
    return http.json_response(
        _render_endpoint(ctx)(stored),
        status=200 if existed else 201,
        revision=revision,
        headers=_result_header(events, not existed),
    )


async def deregister_endpoint(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    revision, _ = await ctx.cp.execute(DeregisterEndpoint(id=request.match_info["id"]))
    return http.json_response(
        {"deregistered": request.match_info["id"], "revision": revision}, revision=revision
    )


async def endpoint_heartbeat(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    id_ = request.match_info["id"]
    if id_ not in ctx.cp.state.endpoints:
        return http.error_response(
            404, "not_found", f"endpoint {id_!r} is not registered: register it again"
        )
    revision = await ctx.cp.execute_all(
        ctx.health.endpoint_heartbeat(ctx.cp.state, id_, ctx.monotonic())
    )
    return http.json_response(
        {"id": id_, "health": ctx.cp.state.endpoints[id_].health.value}, revision=revision
    )


async def set_endpoint_health(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    body = await http.read_json(request)
    if not isinstance(body, dict) or set(body) != {"health"}:
        raise InputError('the body must be {"health": "healthy|unhealthy|draining"}')
    try:
        health = Health(body["health"])
    except ValueError:
        raise InputError(
            f"health {body['health']!r} is not one of healthy, unhealthy, draining"
        ) from None
    id_ = request.match_info["id"]
    revision, _ = await ctx.cp.execute(SetEndpointHealth(id=id_, health=health))
    return http.json_response({"id": id_, "health": health.value}, revision=revision)


# ---- nodes, vips, snapshot ------------------------------------------------------------------------


async def list_nodes(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if request.query.get("watch"):
        return await http.watch_stream(
            request, ctx.cp, frozenset({Kind.NODE}), bookmark_s=ctx.bookmark_s
        )
    revision = await http.block(request, ctx.cp, ctx.rng)
    nodes = ctx.cp.state.nodes
    now = ctx.monotonic()

    def render(node: Node) -> dict[str, Any]:
        data: dict[str, Any] = wire.to_data(node)
        seen = ctx.health.nodes_seen.get(node.name)
        data["last_seen_age_s"] = None if seen is None else round(now - seen, 3)
        return data

    return _items([nodes[k] for k in sorted(nodes)], revision, render)


NODE_BODY_FIELDS = {"underlay_address", "vtep_mac"}


async def put_node(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    name = request.match_info["name"]
    body = await http.read_json(request)
    if (
        not isinstance(body, dict)
        or set(body) - NODE_BODY_FIELDS
        or not set(body) >= NODE_BODY_FIELDS
    ):
        raise InputError(
            'the body must be {"underlay_address": "198.18.0.2", "vtep_mac": "02:..."} and nothing else'
        )
    wire.from_data(Node, {"name": name, **body})  # validates every field with its name
    existed = name in ctx.cp.state.nodes
    revision, events = await ctx.cp.execute(PutNode(name=name, **body))
    ctx.health.node_heartbeat(ctx.cp.state, name, ctx.monotonic())
    return http.json_response(
        wire.to_data(ctx.cp.state.nodes[name]),
        status=200 if existed else 201,
        revision=revision,
        headers=_result_header(events, not existed),
    )


async def delete_node(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    revision, events = await ctx.cp.execute(DeleteNode(name=request.match_info["name"]))
    return http.json_response(
        {"deleted": [f"{e.kind.value}/{e.key}" for e in events], "revision": revision},
        revision=revision,
    )


async def node_heartbeat(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    name = request.match_info["name"]
    if name not in ctx.cp.state.nodes:
        return http.error_response(
            404, "not_found", f"node {name!r} is not registered: register it again"
        )
    revision = await ctx.cp.execute_all(
        ctx.health.node_heartbeat(ctx.cp.state, name, ctx.monotonic())
    )
    return http.json_response(
        {"name": name, "health": ctx.cp.state.nodes[name].health.value}, revision=revision
    )


async def list_vips(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    revision = await http.block(request, ctx.cp, ctx.rng)
    rows = [
        {"vip": s.vip, "service": s.key, "ports": [wire.to_data(p) for p in s.ports]}
        for s in sorted(ctx.cp.state.services.values(), key=lambda s: s.key)
    ]
    return http.json_response({"revision": revision, "items": rows}, revision=revision)


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if request.query.get("watch"):
        return await http.watch_stream(request, ctx.cp, frozenset(Kind), bookmark_s=ctx.bookmark_s)
    revision = await http.block(request, ctx.cp, ctx.rng)
    snap = ctx.cp.snapshot
    data = {
        "revision": snap.revision,
        "services": [wire.to_data(snap.services[k]) for k in sorted(snap.services)],
        "endpoints": [wire.to_data(snap.endpoints[k]) for k in sorted(snap.endpoints)],
        "nodes": [wire.to_data(snap.nodes[k]) for k in sorted(snap.nodes)],
    }
    return http.json_response(data, revision=revision)


# ---- CA, health, metrics, openapi ------------------------------------------------------------------


async def get_ca(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if ctx.ca is None:
        return http.error_response(503, "unavailable", "the certificate authority is not running")
    return http.json_response(ctx.ca.report(), revision=ctx.cp.revision)


async def reload_ca(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if ctx.ca is None:
        return http.error_response(503, "unavailable", "the certificate authority is not running")
    changed = ctx.ca.reload()
    return http.json_response({"reloaded": True, "changed": changed, **ctx.ca.report()})


async def healthz(request: web.Request) -> web.StreamResponse:
    return http.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    if not ctx.ready:
        return http.json_response({"status": "starting"}, status=503)
    return http.json_response(
        {"status": "ready", "revision": ctx.cp.revision}, revision=ctx.cp.revision
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    state = ctx.cp.state
    gauges = request.app[GAUGES]
    gauges["revision"].set(ctx.cp.revision)
    gauges["services"].set(len(state.services))
    gauges["nodes"].set(len(state.nodes))
    for health in Health:
        gauges["endpoints"].labels(health=health.value).set(
            sum(1 for e in state.endpoints.values() if e.health is health)
        )
    return web.Response(
        body=generate_latest(ctx.metrics), content_type="text/plain", charset="utf-8"
    )


async def openapi_doc(request: web.Request) -> web.StreamResponse:
    return http.json_response(openapi.document(ROUTES))


ROUTES: list[openapi.Route] = [
    openapi.Route("GET", "/healthz", healthz, "Liveness: the process answers."),
    openapi.Route("GET", "/readyz", readyz, "Readiness: the state is loaded."),
    openapi.Route("GET", "/openapi.json", openapi_doc, "This document."),
    openapi.Route("GET", "/metrics", metrics, "Prometheus metrics."),
    openapi.Route(
        "GET",
        "/v1/services",
        list_services,
        "List services (blocking query; ?watch=1&since=REV streams).",
        response=Service,
        listing=True,
        watch=True,
    ),
    openapi.Route(
        "GET",
        "/v1/services/{namespace}/{name}",
        get_service,
        "Get one service with its VIP.",
        response=Service,
    ),
    openapi.Route(
        "PUT",
        "/v1/services/{namespace}/{name}",
        put_service,
        "Create or update a service; the answer shows its VIP.",
        request=openapi.ServiceBody,
        response=Service,
    ),
    openapi.Route(
        "DELETE",
        "/v1/services/{namespace}/{name}",
        delete_service,
        "Delete a service and its endpoints.",
    ),
    openapi.Route(
        "GET",
        "/v1/services/{namespace}/{name}/endpoints",
        service_endpoints,
        "A service's endpoints; ?passing for healthy ones only.",
        response=Endpoint,
        listing=True,
    ),
    openapi.Route(
        "GET",
        "/v1/endpoints",
        list_endpoints,
        "List endpoints (blocking query; ?watch=1 streams).",
        response=Endpoint,
        listing=True,
        watch=True,
    ),
    openapi.Route(
        "POST",
        "/v1/endpoints",
        register_endpoint,
        "Register (or re-register) an endpoint.",
        request=openapi.EndpointBody,
        response=Endpoint,
    ),
    openapi.Route("DELETE", "/v1/endpoints/{id}", deregister_endpoint, "Deregister an endpoint."),
    openapi.Route(
        "PUT",
        "/v1/endpoints/{id}/heartbeat",
        endpoint_heartbeat,
        "Heartbeat (default every 5 s; TTL 15 s).",
    ),
    openapi.Route(
        "PUT",
        "/v1/endpoints/{id}/health",
        set_endpoint_health,
        "Set health, e.g. draining.",
        request=openapi.HealthBody,
    ),
    openapi.Route(
        "GET",
        "/v1/nodes",
        list_nodes,
        "List nodes (blocking query; ?watch=1 streams).",
        response=Node,
        listing=True,
        watch=True,
    ),
    openapi.Route(
        "PUT",
        "/v1/nodes/{name}",
        put_node,
        "Register a node; the answer shows its overlay subnet.",
        request=openapi.NodeBody,
        response=Node,
    ),
    openapi.Route("DELETE", "/v1/nodes/{name}", delete_node, "Remove a node and its endpoints."),
    openapi.Route("PUT", "/v1/nodes/{name}/heartbeat", node_heartbeat, "Node heartbeat."),
    openapi.Route("GET", "/v1/vips", list_vips, "Every VIP and its service."),
    openapi.Route(
        "GET",
        "/v1/snapshot",
        get_snapshot,
        "Everything at one revision (?watch=1 streams every kind).",
    ),
    openapi.Route("GET", "/v1/ca", get_ca, "Trust bundle roots and what each sidecar runs."),
    openapi.Route("POST", "/v1/ca/reload", reload_ca, "Re-read the CA directory now."),
]


def make_app(ctx: ApiContext, *, admin_token: str) -> web.Application:
    app = web.Application(
        client_max_size=http.MAX_BODY, middlewares=[_count, http.errors, http.auth(admin_token)]
    )
    app[CTX] = ctx
    app[GAUGES] = {
        "revision": Gauge(
            "meshlet_control_plane_revision", "Current store revision.", registry=ctx.metrics
        ),
        "services": Gauge(
            "meshlet_control_plane_services", "Registered services.", registry=ctx.metrics
        ),
        "nodes": Gauge("meshlet_control_plane_nodes", "Registered nodes.", registry=ctx.metrics),
        "endpoints": Gauge(
            "meshlet_control_plane_endpoints",
            "Registered endpoints by health.",
            ["health"],
            registry=ctx.metrics,
        ),
    }
    app[REQUESTS] = (
        Counter(
            "meshlet_api_requests_total",
            "Admin API requests.",
            ["method", "route", "status"],
            registry=ctx.metrics,
        ),
        Histogram(
            "meshlet_api_request_duration_seconds",
            "Admin API latency (blocking queries included).",
            ["method", "route"],
            registry=ctx.metrics,
        ),
    )
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return app


@web.middleware
async def _count(request: web.Request, handler: http.Handler) -> web.StreamResponse:
    start = time.perf_counter()
    resp = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    counter, histogram = request.app[REQUESTS]
    counter.labels(request.method, route, str(resp.status)).inc()
    histogram.labels(request.method, route).observe(time.perf_counter() - start)
    return resp
