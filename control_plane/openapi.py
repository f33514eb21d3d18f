"""The OpenAPI 3.1 document of the admin API, generated from the route table and the
model's JSON schemas, so the document cannot drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshlet import __version__, wire
from meshlet.model import Health, ServicePort
from meshlet.policy import Policy


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceBody:
    """PUT /v1/services/{namespace}/{name}."""

    __pydantic_config__ = {"extra": "forbid"}
    ports: tuple[ServicePort, ...]
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointBody:
    """POST /v1/endpoints: an endpoint, plus the ports to create its service with if absent."""

    __pydantic_config__ = {"extra": "forbid"}
    id: str
    namespace: str
    service: str
    address: str
    app_port: int
    inbound_port: int = 15006
    identity: str = ""
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    health: Health = Health.HEALTHY
    service_ports: tuple[ServicePort, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeBody:
    __pydantic_config__ = {"extra": "forbid"}
    underlay_address: str
    vtep_mac: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthBody:
    __pydantic_config__ = {"extra": "forbid"}
    health: Health


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[Any] | None = None
    response: type[Any] | None = None
    listing: bool = False
    watch: bool = False


_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
}
_QUERY = [
    {
        "name": "index",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0},
        "description": "Blocking query: hold until the revision passes this index.",
    },
    {
        "name": "wait",
        "in": "query",
        "schema": {"type": "string", "example": "30s"},
        "description": "How long a blocking query may hold (capped at 5m).",
    },
]
_WATCH = [
    {
        "name": "watch",
        "in": "query",
        "schema": {"type": "string", "enum": ["1"]},
        "description": "Stream newline-delimited JSON events (ADDED, MODIFIED, DELETED, BOOKMARK).",
    },
    {
        "name": "since",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0},
        "description": "Resume after this revision; 410 when it has been compacted.",
    },
]


def _schema_ref(cls: type[Any], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = wire.json_schema(cls)
    schemas.update(schema.pop("$defs", {}))
    schemas[cls.__name__] = schema
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def document(routes: list[Route]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", r.path)
        ]
        if r.method == "GET" and r.path.startswith("/v1/"):
            params += _QUERY + (_WATCH if r.watch else [])
        if r.path == "/v1/services/{namespace}/{name}/endpoints":
            params.append(
                {
                    "name": "passing",
                    "in": "query",
                    "allowEmptyValue": True,
                    "schema": {"type": "boolean"},
                    "description": "Only healthy endpoints.",
                }
            )
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema_ref(r.request, schemas)}},
            }
        ok: dict[str, Any] = {
            "description": "OK",
            "headers": {
                "X-Mesh-Index": {
                    "schema": {"type": "integer"},
                    "description": "The store revision.",
                }
            },
        }
        if r.response is not None:
            item = _schema_ref(r.response, schemas)
            body = (
                {
                    "type": "object",
                    "properties": {
                        "revision": {"type": "integer"},
                        "items": {"type": "array", "items": item},
                    },
                }
                if r.listing
                else item
            )
            ok["content"] = {"application/json": {"schema": body}}
        err = {
            "description": "Error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        op["responses"] = {"200": ok, "4XX": err}
        if not r.path.startswith(("/healthz", "/readyz")):
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "meshlet control plane admin API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "DATA_DIR/admin-token",
                }
            },
        },
    }
