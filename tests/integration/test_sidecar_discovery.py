"""The sidecar's discovery against a real `meshlet control-plane run` process on 127.0.0.1:
services and endpoints made through the admin API reach the Catalog; the map is kept on
disk and served while the control plane is down; after a restart the watch resumes from
its revision (Deltas, no new Reset)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_plane_helpers import ControlPlaneProcess

from certs.spiffe import SpiffeId
from meshlet.model import Endpoint, Service, ServicePort, Snapshot
from meshlet.runtime import SystemClock
from sidecar.catalog import Catalog
from sidecar.discovery import Discovery, decode_cache, encode_cache
from sidecar.identity import Identity

TD = "disco.test"
WAIT_S = 30.0
VIP = "198.19.128.9"
ORDERS = {"ports": [{"port": 8080, "protocol": "http"}]}
pytestmark = pytest.mark.integration
_QUIET_HEALTH = ("--endpoint-ttl", "600s", "--deregister-after", "900s")


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "cp", "--trust-domain", TD, *_QUIET_HEALTH)
    try:
        yield cp.start()
    finally:
        cp.kill()


def identity_for(cp: ControlPlaneProcess, cert_dir: Path, *, token: bool = True) -> Identity:
    return Identity(
        cert_dir,
        SpiffeId.for_workload(TD, "shop", "web"),
        control_plane=cp.info["grpc"],
        control_plane_mtls=cp.info["grpc_mtls"],
        bundle_pem=(cp.data_dir / "ca" / "bundle.pem").read_bytes(),
        join_token=(cp.data_dir / "join-token").read_text().strip() if token else None,
        clock=SystemClock(),
        rng=random.Random(1),
    )


def discovery_for(
    cp: ControlPlaneProcess, identity: Identity, client_id: str, **kw: Any
) -> Discovery:
    return Discovery(
        identity,
        control_plane_mtls=cp.info["grpc_mtls"],
        client_id=client_id,
        cache_path=identity.cert_dir / "discovery-cache.json",
        clock=SystemClock(),
        rng=random.Random(3),
        **kw,
    )


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> float:
    """Wait for ``predicate``; return how long it took."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None
    return time.monotonic() - start


async def api(cp: ControlPlaneProcess, method: str, path: str, body: Any = None) -> Any:
    answer = await asyncio.to_thread(cp.call, method, path, body)
    assert answer.status in (200, 201), answer.data
    return answer.data


def endpoint(id_: str, service: str, address: str) -> dict[str, Any]:
    return {
        "id": id_,
        "namespace": "shop",
        "service": service,
        "address": address,
        "app_port": 8080,
    }


def healthy_ids(catalog: Catalog, key: str) -> list[str]:
    return [e.id for e in catalog.healthy.get(key, ())]


def cached_revision(path: Path) -> int:
    try:
        return decode_cache(path.read_bytes(), source=str(path)).revision
    except (OSError, Exception):
        return -1


def serves(discovery: Discovery, vip: str) -> Callable[[], bool]:
    return lambda: discovery.catalog.service_at(vip, 8080) is not None


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- the live map ----------------------------------------------------------------------------------


async def test_services_and_endpoints_reach_the_catalog_and_the_cache(
    control_plane: ControlPlaneProcess, tmp_path: Path
) -> None:
    cp = control_plane
    identity = identity_for(cp, tmp_path / "web")
    await identity.ensure()
    published: list[Catalog] = []
    discovery = discovery_for(cp, identity, "web-1", on_catalog=published.append)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(discovery.run())
        try:
            async with asyncio.timeout(WAIT_S):
                await discovery.first_snapshot.wait()
            assert discovery.connected and discovery.resets == 1

            vip = (await api(cp, "PUT", "/v1/services/shop/orders", ORDERS))["vip"]
            await api(cp, "POST", "/v1/endpoints", endpoint("orders-1", "orders", "127.0.0.2"))
            await api(cp, "POST", "/v1/endpoints", endpoint("orders-2", "orders", "127.0.0.3"))
            took = await until(
                lambda: healthy_ids(discovery.catalog, "shop/orders") == ["orders-1", "orders-2"],
                "endpoints in the catalog",
            )
            assert took < 2.0
            service = discovery.catalog.service_at(vip, 8080)
            assert service is not None and service.key == "shop/orders"
            assert discovery.catalog.service_at(vip, 9090) is None
            assert published[-1] is discovery.catalog

            # Health changes narrow the healthy set; the endpoint stays known.
            await api(cp, "PUT", "/v1/endpoints/orders-2/health", {"health": "unhealthy"})
            await until(
                lambda: healthy_ids(discovery.catalog, "shop/orders") == ["orders-1"],
                "the unhealthy endpoint gone from rotation",
            )
            assert [e.id for e in discovery.catalog.everyone["shop/orders"]] == [
                "orders-1",
                "orders-2",
            ]
            assert discovery.resets == 1 and discovery.deltas >= 4
            assert discovery.revision == cp.revision()
            assert discovery.last_update_age is not None and discovery.last_update_age < 20

            # A burst of changes: the cache ends at the latest revision, written sparingly.
            writes_before, started = discovery.cache_writes, time.monotonic()
            for i in range(10):
                address = f"127.0.1.{i + 1}"
                await api(cp, "POST", "/v1/endpoints", endpoint(f"burst-{i}", "orders", address))
            latest = cp.revision()
            cache = identity.cert_dir / "discovery-cache.json"
            await until(lambda: cached_revision(cache) == latest, "the latest map on disk")
            elapsed = time.monotonic() - started
            assert discovery.cache_writes - writes_before <= elapsed / 1.0 + 2
            snapshot = decode_cache(cache.read_bytes(), source="cache")
            assert snapshot == discovery.snapshot
            assert cache.stat().st_mode & 0o777 == 0o600
        finally:
            task.cancel()
    assert not discovery.connected


async def test_a_corrupt_cache_is_ignored_and_a_good_one_round_trips(tmp_path: Path) -> None:
    identity = Identity(
        tmp_path / "web",
        SpiffeId.for_workload(TD, "shop", "web"),
        control_plane="127.0.0.1:1",
        control_plane_mtls="127.0.0.1:1",
        bundle_pem=b"",
        join_token=None,
        clock=SystemClock(),
        rng=random.Random(1),
    )
    cache = tmp_path / "cache.json"
    discovery = Discovery(
        identity,
        control_plane_mtls="127.0.0.1:1",
        client_id="web-1",
        cache_path=cache,
        clock=SystemClock(),
        rng=random.Random(1),
    )
    assert discovery.load_cache() is None  # missing
    for garbage in (b"{not json", b"[]", b'{"revision": -3}', b'{"revision": 4, "services": [{}]}'):
        cache.write_bytes(garbage)
        assert discovery.load_cache() is None
    assert not discovery.first_snapshot.is_set()
    assert discovery.revision == 0 and discovery.catalog.services == {}

    orders = Service(namespace="shop", name="orders", ports=(ServicePort(port=8080),), vip=VIP)
    ep = Endpoint(
        id="orders-1", namespace="shop", service="orders", address="127.0.0.2", app_port=80
    )
    saved = Snapshot(revision=7, services={orders.key: orders}, endpoints={ep.id: ep})
    cache.write_bytes(encode_cache(saved))
    catalog = discovery.load_cache()
    assert catalog is discovery.catalog and discovery.first_snapshot.is_set()
    assert discovery.snapshot == saved and discovery.revision == 7
    assert catalog.service_at(VIP, 8080) == orders and catalog.healthy["shop/orders"] == (ep,)


# ---- outage, cache, restart ------------------------------------------------------------------------


async def test_cache_serves_through_an_outage_and_the_watch_resumes_after_a_restart(
    tmp_path: Path,
) -> None:
    grpc_port, mtls_port = free_ports(2)
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        "--trust-domain",
        TD,
        *_QUIET_HEALTH,
        "--grpc",
        f"127.0.0.1:{grpc_port}",
        "--grpc-mtls",
        f"127.0.0.1:{mtls_port}",
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(cp.start)
        # The sidecar that lives through the outage.
        identity = identity_for(cp, tmp_path / "live")
        await identity.ensure()
        live = discovery_for(cp, identity, "web-live")
        tasks += [asyncio.create_task(identity.run()), asyncio.create_task(live.run())]
        vip = (await api(cp, "PUT", "/v1/services/shop/orders", ORDERS))["vip"]
        await api(cp, "POST", "/v1/endpoints", endpoint("orders-1", "orders", "127.0.0.2"))
        revision = cp.revision()
        cache = identity.cert_dir / "discovery-cache.json"
        await until(lambda: live.revision == revision, "the map")
        await until(lambda: cached_revision(cache) == revision, "the map on disk")
        # A second sidecar's state directory, as it was when the control plane went away.
        shutil.copytree(identity.cert_dir, tmp_path / "restarted")

        assert await asyncio.to_thread(cp.stop) == 0
        await until(lambda: not live.connected, "the lost stream noticed")
        assert live.catalog.service_at(vip, 8080) is not None  # traffic keeps its map
        assert healthy_ids(live.catalog, "shop/orders") == ["orders-1"]

        # A sidecar (re)starting now: its certificate and its map come from disk.
        identity2 = identity_for(cp, tmp_path / "restarted", token=False)
        await identity2.ensure()
        restarted = discovery_for(cp, identity2, "web-restarted")
        catalog = restarted.load_cache()
        assert catalog is not None and restarted.first_snapshot.is_set()
        assert restarted.revision == revision
        served = catalog.service_at(vip, 8080)
        assert served is not None and served.key == "shop/orders"
        assert healthy_ids(catalog, "shop/orders") == ["orders-1"]
        tasks.append(asyncio.create_task(restarted.run()))
        await until(lambda: restarted.reconnects >= 2, "reconnect attempts")
        assert not restarted.connected
        assert restarted.catalog.service_at(vip, 8080) == served  # nothing dropped meanwhile

        # The control plane comes back on the same ports and data: both resume.
        await asyncio.to_thread(cp.start)
        assert cp.info["grpc_mtls"] == f"127.0.0.1:{mtls_port}"
        await until(lambda: live.connected and restarted.connected, "both reconnected")
        pay = (await api(cp, "PUT", "/v1/services/shop/pay", ORDERS))["vip"]
        for d in (live, restarted):
            await until(serves(d, pay), "a new service")
            assert d.catalog.service_at(vip, 8080) is not None
        assert live.resets == 1 and live.reconnects >= 1  # resumed: Deltas, no new snapshot
        assert restarted.resets == 0 and restarted.deltas >= 1  # resumed from the cache
        assert live.revision == restarted.revision == cp.revision()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cp.kill()
