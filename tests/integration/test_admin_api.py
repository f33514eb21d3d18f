"""The admin REST API over real HTTP on 127.0.0.1, backed by a real SQLite store."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from control_plane.api import ApiContext, make_app
from control_plane.core import ControlPlane
from control_plane.health import HealthTracker
from control_plane.registry import Config
from control_plane.store.sqlite import SqliteStore

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORDERS = {"ports": [{"port": 8080, "protocol": "http"}]}


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    cp: ControlPlane
    store: SqliteStore

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kw: object
    ) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
        headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}  # type: ignore[dict-item]
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:  # type: ignore[arg-type]
            body = await r.read()
            return r.status, (json.loads(body) if body else {}), r.headers

    async def index(self) -> int:
        _, _, headers = await self.call("GET", "/v1/services")
        return int(headers["X-Mesh-Index"])


async def start_api(tmp_path: Path, cfg: Config, bookmark_s: float = 15.0) -> AsyncIterator[Api]:
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    cp = ControlPlane(store, cfg)
    await cp.load()
    ctx = ApiContext(cp=cp, health=HealthTracker(), bookmark_s=bookmark_s)
    runner = web.AppRunner(make_app(ctx, admin_token=TOKEN), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        try:
            yield Api(f"http://127.0.0.1:{port}", session, cp, store)
        finally:
            await runner.cleanup()
            await store.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async for a in start_api(tmp_path, Config(trust_domain="mesh.test")):
        yield a


async def test_a_service_gets_a_vip_that_get_shows_and_a_reput_keeps(api: Api) -> None:
    status, body, headers = await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
    assert status == 201 and headers["X-Mesh-Result"] == "created"
    vip = body["vip"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("198.19.128.0/17")
    assert body["policy"]["balancing"]["algorithm"] == "p2c_ewma"  # defaults filled in
    status, got, _ = await api.call("GET", "/v1/services/shop/orders")
    assert status == 200 and got["vip"] == vip
    before = await api.index()
    status, again, headers = await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
    assert status == 200 and headers["X-Mesh-Result"] == "unchanged" and again["vip"] == vip
    assert await api.index() == before
    status, listing, _ = await api.call("GET", "/v1/vips")
    assert listing["items"] == [
        {"vip": vip, "service": "shop/orders", "ports": [{"port": 8080, "protocol": "http"}]}
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("PUT", "/v1/services/shop/orders", b"{not json", 400, "not valid JSON"),
        (
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080}], "colour": "red"},
            400,
            "colour",
        ),
        (
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080}], "policy": {"retries": {"attempts": 3, "tries": 2}}},
            400,
            "policy.retries.tries: unknown field",
        ),
        ("PUT", "/v1/services/Shop/orders", ORDERS, 400, "namespace 'Shop' is not a DNS label"),
        (
            "PUT",
            "/v1/services/shop/or_ders",
            ORDERS,
            400,
            "service name 'or_ders' is not a DNS label",
        ),
        (
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 70000}]},
            400,
            "ports.0: port 70000 is out of range",
        ),
        ("PUT", "/v1/services/shop/orders", {"ports": []}, 400, "at least one port"),
        ("PUT", "/v1/services/shop/orders", {"policy": {}}, 400, "ports: required"),
        ("PUT", "/v1/services/shop/orders", [1, 2], 400, "JSON object"),
        (
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 80}], "vip": "198.19.128.77"},
            400,
            "vip is allocated",
        ),
        (
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 80, "protocol": "udp"}]},
            400,
            "ports.0.protocol",
        ),
        ("DELETE", "/v1/services/shop/nothing", None, 404, "service shop/nothing does not exist"),
        (
            "POST",
            "/v1/endpoints",
            {
                "id": "x",
                "namespace": "shop",
                "service": "nothing",
                "address": "198.19.0.5",
                "app_port": 80,
            },
            404,
            "does not exist",
        ),
        (
            "POST",
            "/v1/endpoints",
            {
                "id": "x",
                "namespace": "shop",
                "service": "orders",
                "address": "not-an-ip",
                "app_port": 80,
            },
            400,
            "address",
        ),
        (
            "PUT",
            "/v1/nodes/n1",
            {"underlay_address": "198.18.0.2", "vtep_mac": "zz"},
            400,
            "vtep_mac",
        ),
        ("PUT", "/v1/endpoints/nope/heartbeat", None, 404, "not registered"),
        ("GET", "/v1/services?index=abc", None, 400, "index='abc' is not a whole number"),
        ("GET", "/v1/services?index=1&wait=forever", None, 400, "wait 'forever' is not a duration"),
        ("GET", "/v1/nothing-here", None, 404, "Not Found"),
    ],
)
async def test_bad_requests_get_a_4xx_naming_the_problem_and_change_nothing(
    api: Api, method: str, path: str, body: object, status: int, needle: str
) -> None:
    await api.call("PUT", "/v1/services/shop/pay", json=ORDERS)
    before = await api.index()
    kw = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    got, err, _ = await api.call(method, path, **kw)
    assert got == status, err
    assert needle in err["error"]["message"], err
    assert await api.index() == before
    _, services, _ = await api.call("GET", "/v1/services")
    assert [s["name"] for s in services["items"]] == ["pay"]


async def test_body_size_is_limited(api: Api) -> None:
    status, err, _ = await api.call(
        "PUT",
        "/v1/services/shop/orders",
        data=b"{" + b" " * (2 << 20) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and err["error"]["code"] == "too_large"
    assert (await api.call("GET", "/v1/services"))[1]["items"] == []


async def test_a_full_vip_range_is_a_409_and_nothing_changes(tmp_path: Path) -> None:
    async for api in start_api(
        tmp_path, Config(trust_domain="mesh.test", vip_cidr="198.19.128.0/30")
    ):
        for name in ("a", "b"):
            assert (await api.call("PUT", f"/v1/services/shop/{name}", json=ORDERS))[0] == 201
        before = await api.index()
        status, err, _ = await api.call("PUT", "/v1/services/shop/c", json=ORDERS)
        assert status == 409 and "198.19.128.0/30 is full" in err["error"]["message"]
        assert await api.index() == before


async def test_duplicate_endpoint_is_refused(api: Api) -> None:
    await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
    ep = {
        "id": "o1",
        "namespace": "shop",
        "service": "orders",
        "address": "198.19.0.5",
        "app_port": 8080,
    }
    assert (await api.call("POST", "/v1/endpoints", json=ep))[0] == 201
    assert (await api.call("POST", "/v1/endpoints", json=ep))[0] == 200  # the same one again: fine
    before = await api.index()
    status, err, _ = await api.call("POST", "/v1/endpoints", json={**ep, "id": "o2"})
    assert (
        status == 409
        and "198.19.0.5:15006 is already registered as 'o1'" in err["error"]["message"]
    )
    assert await api.index() == before


async def test_auth_is_required_everywhere_but_health(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with api.session.put(
            api.base + "/v1/services/shop/orders", json=ORDERS, headers=headers
        ) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json())["error"]["code"] == "unauthorized"
        async with api.session.get(api.base + "/v1/services", headers=headers) as r:
            assert r.status == 401
    assert (await api.call("GET", "/v1/services"))[1]["items"] == []
    for path in ("/healthz", "/readyz"):
        async with api.session.get(api.base + path) as r:
            assert r.status == 200


async def test_endpoints_passing_filter_and_heartbeats(api: Api) -> None:
    await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
    for i in (1, 2):
        ep = {
            "id": f"o{i}",
            "namespace": "shop",
            "service": "orders",
            "address": f"198.19.0.{i}",
            "app_port": 8080,
            "labels": {"version": f"v{i}"},
        }
        await api.call("POST", "/v1/endpoints", json=ep)
    status, body, _ = await api.call("PUT", "/v1/endpoints/o2/health", json={"health": "draining"})
    assert status == 200 and body["health"] == "draining"
    _, passing, _ = await api.call("GET", "/v1/services/shop/orders/endpoints?passing")
    assert [e["id"] for e in passing["items"]] == ["o1"]
    _, everyone, _ = await api.call("GET", "/v1/services/shop/orders/endpoints")
    assert {e["id"]: e["health"] for e in everyone["items"]} == {"o1": "healthy", "o2": "draining"}
    assert everyone["items"][0]["identity"] == "spiffe://mesh.test/ns/shop/sa/orders"
    assert everyone["items"][0]["last_heartbeat_age_s"] is not None
    status, beat, _ = await api.call("PUT", "/v1/endpoints/o1/heartbeat")
    assert status == 200 and beat["health"] == "healthy"


async def test_blocking_query_holds_until_the_revision_moves(api: Api) -> None:
    index = await api.index()
    started = time.monotonic()
    status, _, headers = await api.call("GET", f"/v1/services?index={index}&wait=300ms")
    assert status == 200 and int(headers["X-Mesh-Index"]) == index
    assert time.monotonic() - started >= 0.3

    async def change_later() -> None:
        await asyncio.sleep(0.3)
        await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)

    task = asyncio.create_task(change_later())
    status, body, headers = await api.call("GET", f"/v1/services?index={index}&wait=20s")
    await task
    assert int(headers["X-Mesh-Index"]) > index
    assert [s["name"] for s in body["items"]] == ["orders"]


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[dict]:
    events = []
    async with asyncio.timeout(10):
        while len(events) < count:
            line = await resp.content.readline()
            assert line, "stream ended early"
            events.append(json.loads(line))
    return events


async def test_watch_streams_events_in_order_with_bookmarks_and_resumes(tmp_path: Path) -> None:
    async for api in start_api(tmp_path, Config(trust_domain="mesh.test"), bookmark_s=0.3):
        await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
        since = await api.index()
        async with api.session.get(
            api.base + f"/v1/services?watch=1&since={since}", headers=AUTH
        ) as resp:
            assert resp.status == 200
            await api.call("PUT", "/v1/services/shop/web", json=ORDERS)
            await api.call("PUT", "/v1/services/shop/web", json={"ports": [{"port": 9090}]})
            await api.call("DELETE", "/v1/services/shop/orders")
            events = [e for e in await read_events(resp, 4) if e["type"] != "BOOKMARK"][:3]
            assert [(e["type"], e["key"]) for e in events] == [
                ("ADDED", "shop/web"),
                ("MODIFIED", "shop/web"),
                ("DELETED", "shop/orders"),
            ]
            revisions = [e["revision"] for e in events]
            assert revisions == sorted(revisions) and revisions[0] > since
            bookmark = (await read_events(resp, 1))[0]
            assert bookmark["type"] == "BOOKMARK" and bookmark["revision"] == revisions[-1]
        # Without since, the stream starts with the current objects.
        async with api.session.get(api.base + "/v1/services?watch=1", headers=AUTH) as resp:
            first = (await read_events(resp, 1))[0]
            assert (first["type"], first["key"]) == ("ADDED", "shop/web")
        # A compacted revision answers 410 with the current revision: list again.
        await api.store.compact(api.cp.revision)
        status, err, _ = await api.call("GET", f"/v1/services?watch=1&since={since}")
        assert status == 410 and err["error"]["revision"] == api.cp.revision


async def test_nodes_get_subnets_and_snapshot_has_everything(api: Api) -> None:
    status, node, _ = await api.call(
        "PUT",
        "/v1/nodes/n1",
        json={"underlay_address": "198.18.0.2", "vtep_mac": "02:00:00:00:00:01"},
    )
    assert status == 201 and node["subnet"] == "198.19.0.0/24"
    await api.call("PUT", "/v1/services/shop/orders", json=ORDERS)
    _, snap, headers = await api.call("GET", "/v1/snapshot")
    assert snap["revision"] == int(headers["X-Mesh-Index"])
    assert [n["name"] for n in snap["nodes"]] == ["n1"] and [
        s["name"] for s in snap["services"]
    ] == ["orders"]
    assert (await api.call("PUT", "/v1/nodes/n1/heartbeat"))[1]["health"] == "healthy"


async def test_openapi_document_is_valid_and_metrics_count_requests(api: Api) -> None:
    _, doc, _ = await api.call("GET", "/openapi.json")
    validate(doc)
    assert "/v1/services/{namespace}/{name}" in doc["paths"]
    assert "Policy" in doc["components"]["schemas"]
    await api.call("GET", "/v1/services")
    async with api.session.get(api.base + "/metrics", headers=AUTH) as r:
        text = await r.text()
    assert 'meshlet_api_requests_total{method="GET",route="/v1/services",status="200"}' in text
    assert "meshlet_control_plane_revision" in text
