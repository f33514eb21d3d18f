"""Discovery over real gRPC with TLS on 127.0.0.1: a real SQLite store, a real control plane,
a real CA directory, and grpc.aio clients built with meshlet.discovery_client."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import cadir, pki
from certs.bundle import bundle_fingerprint, bundle_fingerprint_pem
from certs.spiffe import parse
from control_plane.ca import Authority
from control_plane.core import ControlPlane
from control_plane.discovery import DiscoveryServicer, GrpcServer
from control_plane.registry import (
    Config,
    DeregisterEndpoint,
    PutService,
    RegisterEndpoint,
    SetEndpointHealth,
)
from control_plane.store.sqlite import SqliteStore
from meshlet import discovery_client as dc
from meshlet.errors import ConflictError
from meshlet.model import Endpoint, EventType, Health, ServicePort
from meshlet.proto import mesh_pb2
from meshlet.runtime import SystemClock

TD = "mesh.test"
WAIT_S = 10.0
pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    data: Path
    store: SqliteStore
    cp: ControlPlane
    authority: Authority
    server: GrpcServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def channel(self, bundle_pem: bytes | None = None) -> grpc.aio.Channel:
        return dc.channel(
            self.address,
            bundle_pem or self.authority.bundle_pem,
            join_token=self.authority.join_token,
        )


async def start_server(mesh: Mesh, bookmark_s: float) -> GrpcServer:
    server = GrpcServer(mesh.cp, mesh.authority, bookmark_s=bookmark_s)
    await server.start("127.0.0.1:0", mtls_address="127.0.0.1:0")
    return server


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    try:
        cp = ControlPlane(store, Config(trust_domain=TD))
        await cp.load()
        authority = Authority(
            tmp_path / "data", trust_domain=TD, clock=SystemClock(), rng=random.Random(7)
        )
        authority.start()
        mesh = Mesh(tmp_path / "data", store, cp, authority, None)  # type: ignore[arg-type]
        mesh.server = await start_server(mesh, bookmark_s=30.0)
        try:
            yield mesh
        finally:
            await mesh.server.stop(0)
    finally:
        await store.close()


def put_service(name: str, port: int = 8080) -> PutService:
    return PutService(namespace="shop", name=name, ports=(ServicePort(port=port),))


def register(id_: str, service: str, address: str) -> RegisterEndpoint:
    return RegisterEndpoint(
        endpoint=Endpoint(id=id_, namespace="shop", service=service, address=address, app_port=8080)
    )


def request(client_id: str = "web-1", since: int = 0, **kw: object) -> object:
    return dc.watch_request(client_id=client_id, kind="sidecar", since_revision=since, **kw)  # type: ignore[arg-type]


async def next_update(
    updates: AsyncIterator[dc.Update], *, skip_bookmarks: bool = True
) -> dc.Update:
    async with asyncio.timeout(WAIT_S):
        while True:
            update = await anext(updates)
            if not (
                skip_bookmarks and isinstance(update, dc.Bookmark) and not update.trust_bundle_pem
            ):
                return update


async def meshlet_certs(*args: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshlet", "certs", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def tables(snapshot: object) -> tuple[dict, dict, dict]:
    return snapshot.services, snapshot.endpoints, snapshot.nodes  # type: ignore[attr-defined]


# ---- snapshot, deltas, resume ---------------------------------------------------------------


async def test_first_message_is_a_full_snapshot_with_the_trust_bundle(mesh: Mesh) -> None:
    await mesh.cp.execute(put_service("web"))
    await mesh.cp.execute(register("web-1", "web", "127.0.0.2"))
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request())
        first = await next_update(updates)
        assert isinstance(first, dc.Reset)
        assert first.revision == mesh.cp.revision == 2
        assert tables(first.snapshot) == tables(mesh.cp.snapshot)
        assert first.snapshot.services["shop/web"].vip is not None
        assert first.trust_bundle_pem == mesh.authority.bundle_pem
        roots = x509.load_pem_x509_certificates(first.trust_bundle_pem)
        assert bundle_fingerprint(roots) == mesh.authority.bundle_fingerprint
        await updates.aclose()


async def test_deltas_arrive_in_revision_order(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request())
        state = dc.apply_update(None, await next_update(updates))
        assert state.revision == 0 and not state.services
        commands = [
            put_service("web"),
            register("web-1", "web", "127.0.0.2"),
            register("web-2", "web", "127.0.0.3"),
            SetEndpointHealth(id="web-1", health=Health.UNHEALTHY),
            DeregisterEndpoint(id="web-2"),
        ]
        for command in commands:
            await mesh.cp.execute(command)
        seen = []
        while state.revision < mesh.cp.revision:
            update = await next_update(updates)
            assert isinstance(update, dc.Delta)
            assert update.trust_bundle_pem is None  # sent once, with the first message
            seen.append((update.revision, [(e.type, e.key) for e in update.events]))
            state = dc.apply_update(state, update)
        assert seen == [
            (1, [(EventType.ADDED, "shop/web")]),
            (2, [(EventType.ADDED, "web-1")]),
            (3, [(EventType.ADDED, "web-2")]),
            (4, [(EventType.MODIFIED, "web-1")]),
            (5, [(EventType.DELETED, "web-2")]),
        ]
        assert tables(state) == tables(mesh.cp.snapshot)
        assert state.endpoints["web-1"].health is Health.UNHEALTHY
        await updates.aclose()


async def test_reconnect_with_revision_gets_exactly_the_missed_changes(mesh: Mesh) -> None:
    await mesh.cp.execute(put_service("web"))
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request())
        state = dc.apply_update(None, await next_update(updates))
        await updates.aclose()  # disconnect
    await mesh.cp.execute(register("web-1", "web", "127.0.0.2"))
    await mesh.cp.execute(put_service("orders", 9090))
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request(since=state.revision))
        first = await next_update(updates, skip_bookmarks=False)
        assert isinstance(first, dc.Delta), "a resuming client gets no snapshot"
        assert first.revision == state.revision + 1
        assert [(e.type, e.key) for e in first.events] == [(EventType.ADDED, "web-1")]
        assert first.trust_bundle_pem == mesh.authority.bundle_pem
        state = dc.apply_update(state, first)
        second = await next_update(updates, skip_bookmarks=False)
        assert isinstance(second, dc.Delta)
        assert [(e.type, e.key) for e in second.events] == [(EventType.ADDED, "shop/orders")]
        state = dc.apply_update(state, second)
        assert state.revision == mesh.cp.revision
        assert tables(state) == tables(mesh.cp.snapshot)
        await updates.aclose()


async def test_resume_when_up_to_date_gets_a_bookmark_with_the_bundle(mesh: Mesh) -> None:
    await mesh.cp.execute(put_service("web"))
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request(since=mesh.cp.revision))
        first = await next_update(updates, skip_bookmarks=False)
        assert isinstance(first, dc.Bookmark)
        assert first.revision == mesh.cp.revision
        assert first.trust_bundle_pem == mesh.authority.bundle_pem
        await updates.aclose()


@pytest.mark.parametrize("since", ["compacted", "future"])
async def test_resume_from_a_lost_revision_gets_a_full_snapshot(mesh: Mesh, since: str) -> None:
    await mesh.cp.execute(put_service("web"))
    old = mesh.cp.revision
    await mesh.cp.execute(register("web-1", "web", "127.0.0.2"))
    await mesh.cp.execute(put_service("orders", 9090))
    if since == "compacted":
        await mesh.store.compact(mesh.store.revision)
    else:
        old = mesh.cp.revision + 100  # a control plane whose history was wiped
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request(since=old))
        first = await next_update(updates, skip_bookmarks=False)
        assert isinstance(first, dc.Reset)
        assert first.revision == mesh.cp.revision
        assert tables(first.snapshot) == tables(mesh.cp.snapshot)
        assert first.trust_bundle_pem == mesh.authority.bundle_pem
        await mesh.cp.execute(put_service("db", 5432))  # and deltas follow the snapshot
        update = await next_update(updates)
        assert isinstance(update, dc.Delta) and update.revision == first.revision + 1
        await updates.aclose()


async def test_bookmarks_keep_an_idle_stream_alive(mesh: Mesh) -> None:
    await mesh.cp.execute(put_service("web"))
    server = await start_server(mesh, bookmark_s=0.2)
    try:
        async with dc.channel(
            f"127.0.0.1:{server.port}",
            mesh.authority.bundle_pem,
            join_token=mesh.authority.join_token,
        ) as ch:
            updates = dc.watch(dc.DiscoveryStub(ch), request(), idle_timeout_s=2.0)
            assert isinstance(await next_update(updates), dc.Reset)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(3):
                update = await next_update(updates, skip_bookmarks=False)
                assert isinstance(update, dc.Bookmark)
                assert update.revision == mesh.cp.revision
                assert update.trust_bundle_pem is None
            assert loop.time() - started >= 0.4  # spaced by the interval, not a flood
            await updates.aclose()
    finally:
        await server.stop(0)


async def test_a_watcher_that_falls_behind_the_history_gets_a_new_snapshot(
    mesh: Mesh, tmp_path: Path
) -> None:
    # A store that keeps one revision of history and buffers one batch per watcher.
    store = SqliteStore(tmp_path / "short.db", history=1, watch_buffer=1)
    await store.open()
    try:
        cp = ControlPlane(store, Config(trust_domain=TD))
        servicer = DiscoveryServicer(cp, mesh.authority, bookmark_s=30.0)
        raw = servicer._stream(0, asyncio.Event())  # responses encoded once, shared as bytes
        stream = (mesh_pb2.WatchResponse.FromString(r) async for r in raw)
        async with asyncio.timeout(WAIT_S):
            assert (await anext(stream)).WhichOneof("body") == "snapshot"
            await cp.execute(put_service("web"))
            delta = await anext(stream)
            assert (delta.revision, delta.WhichOneof("body")) == (1, "delta")
            for name in ("a", "b", "c"):  # while the client is busy: buffer and history overrun
                await cp.execute(put_service(name))
            again = await anext(stream)
            assert (again.revision, again.WhichOneof("body")) == (4, "snapshot")
            assert len(again.snapshot.objects) == 4
            await cp.execute(put_service("d"))
            assert (await anext(stream)).revision == 5
        await stream.aclose()
        await raw.aclose()
    finally:
        await store.close()


async def test_a_silent_stream_counts_as_lost(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request(), idle_timeout_s=0.3)
        assert isinstance(await next_update(updates), dc.Reset)
        with pytest.raises(dc.ControlPlaneError, match=r"no message for 0\.3s") as err:
            await next_update(updates)  # the fixture's server bookmarks every 30 s
        assert err.value.code == "UNAVAILABLE"


async def test_invalid_watch_request_is_invalid_argument(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        bad = dc.watch_request(client_id="web-1", kind="pod")
        updates = dc.watch(dc.DiscoveryStub(ch), bad)
        with pytest.raises(dc.ControlPlaneError) as err:
            await next_update(updates)
        assert err.value.code == "INVALID_ARGUMENT"
        assert "kind 'pod'" in str(err.value)


async def test_stopping_the_server_ends_watches_with_unavailable(mesh: Mesh) -> None:
    server = await start_server(mesh, bookmark_s=30.0)
    async with dc.channel(
        f"127.0.0.1:{server.port}", mesh.authority.bundle_pem, join_token=mesh.authority.join_token
    ) as ch:
        updates = dc.watch(dc.DiscoveryStub(ch), request())
        assert isinstance(await next_update(updates), dc.Reset)
        async with asyncio.timeout(WAIT_S):
            await server.stop(grace=5.0)  # returns quickly: streams end themselves
        with pytest.raises(dc.ControlPlaneError) as err:
            await next_update(updates)
        assert err.value.code == "UNAVAILABLE"


# ---- health and TLS -------------------------------------------------------------------------


async def test_grpc_health_check_reports_serving(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "meshlet.v1.Discovery", "meshlet.v1.CertificateAuthority"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def check_fails(ch: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return err.value


async def test_clients_without_the_mesh_bundle_fail_tls(mesh: Mesh, tmp_path: Path) -> None:
    system_roots = grpc.ssl_channel_credentials()
    options = [("grpc.ssl_target_name_override", dc.SERVER_NAME)]
    async with grpc.aio.secure_channel(mesh.address, system_roots, options=options) as ch:
        assert (await check_fails(ch)).code() == grpc.StatusCode.UNAVAILABLE
    other = cadir.init(tmp_path / "other-ca", TD, mesh.authority.state.root.not_valid_before_utc)
    async with mesh.channel(pki.dump_certs(other.bundle)) as ch:
        assert (await check_fails(ch)).code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(mesh.address) as ch:  # plaintext: refused too
        assert (await check_fails(ch)).code() == grpc.StatusCode.UNAVAILABLE


async def test_a_second_server_on_the_same_port_is_refused(mesh: Mesh) -> None:
    second = GrpcServer(mesh.cp, mesh.authority)
    with pytest.raises(ConflictError, match="port is in use"):
        await second.start(mesh.address)
    await second.stop(0)


async def test_mtls_port_refuses_clients_without_a_certificate(mesh: Mesh) -> None:
    address = f"127.0.0.1:{mesh.server.mtls_port}"
    async with dc.channel(address, mesh.authority.bundle_pem) as ch:
        assert (await check_fails(ch)).code() == grpc.StatusCode.UNAVAILABLE


# ---- the trust bundle in a running mesh -------------------------------------------------------


async def test_root_rotation_pushes_the_new_bundle_to_watchers(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        watchers = [dc.watch(dc.DiscoveryStub(ch), request(f"web-{i}")) for i in (1, 2)]
        for updates in watchers:
            first = await next_update(updates)
            assert len(x509.load_pem_x509_certificates(first.trust_bundle_pem or b"")) == 1
        await meshlet_certs("rotate", "root", "--step", "add", "--dir", mesh.data / "ca")
        assert mesh.authority.reload() is True
        state = mesh.authority.state
        assert state.next_root is not None
        for updates in watchers:
            update = await next_update(updates)
            assert isinstance(update, dc.Bookmark)
            assert update.trust_bundle_pem == mesh.authority.bundle_pem
            roots = x509.load_pem_x509_certificates(update.trust_bundle_pem)
            assert set(roots) == {state.root, state.next_root}
        # The new bundle also reaches a client that connects only now.
        async with mesh.channel(mesh.authority.bundle_pem) as ch2:
            late = dc.watch(dc.DiscoveryStub(ch2), request("late"))
            assert (await next_update(late)).trust_bundle_pem == mesh.authority.bundle_pem
            await late.aclose()
        for updates in watchers:
            await updates.aclose()


async def test_report_lists_each_watching_client_and_its_bundle(mesh: Mesh) -> None:
    old_bundle = mesh.authority.bundle_pem
    chain, _, _ = cadir.issue(
        mesh.authority.state, parse(f"spiffe://{TD}/ns/shop/sa/web"), SystemClock().now()
    )
    leaf_pem = pki.dump_certs(chain)
    async with mesh.channel() as ch:
        stub = dc.DiscoveryStub(ch)
        current = dc.watch(stub, request("web-1", bundle_pem=old_bundle, leaf_chain_pem=leaf_pem))
        stale = dc.watch(
            stub,
            dc.watch_request(client_id="node-a", kind="node", bundle_pem=b""),
        )
        await next_update(current)
        await next_update(stale)
        report = mesh.authority.report()
        rows = {c["client_id"]: c for c in report["clients"]}
        assert rows["web-1"]["bundle_current"] is True
        assert rows["web-1"]["kind"] == "sidecar"
        assert rows["web-1"]["spiffe_id"] == f"spiffe://{TD}/ns/shop/sa/web"
        assert rows["web-1"]["leaf_serial"] == format(chain[0].serial_number, "x")
        assert rows["web-1"]["leaf_under_current_root"] is True
        assert rows["web-1"]["connected"] is True
        assert rows["node-a"]["bundle_current"] is False
        assert rows["node-a"]["kind"] == "node"
        assert rows["node-a"]["leaf_under_current_root"] is None
        assert report["bundle_fingerprint"] == bundle_fingerprint_pem(old_bundle)
        assert [r["role"] for r in report["roots"]] == ["active"]

        # After `rotate root --step add`, nobody runs the new bundle until it reports so.
        await meshlet_certs("rotate", "root", "--step", "add", "--dir", mesh.data / "ca")
        mesh.authority.reload()
        new_bundle = (await next_update(current)).trust_bundle_pem
        assert new_bundle == mesh.authority.bundle_pem
        rows = {c["client_id"]: c for c in mesh.authority.report()["clients"]}
        assert rows["web-1"]["bundle_current"] is False
        await dc.report(stub, request("web-1", bundle_pem=new_bundle, leaf_chain_pem=leaf_pem))
        report = mesh.authority.report()
        rows = {c["client_id"]: c for c in report["clients"]}
        assert rows["web-1"]["bundle_current"] is True
        assert rows["node-a"]["bundle_current"] is False
        assert [r["role"] for r in report["roots"]] == ["active", "next"]

        await current.aclose()
        await stale.aclose()

    def connected() -> dict[str, bool]:
        return {c["client_id"]: c["connected"] for c in mesh.authority.report()["clients"]}

    for _ in range(int(WAIT_S / 0.05)):  # the server notices the streams are gone
        if not any(connected().values()):
            break
        await asyncio.sleep(0.05)
    assert connected() == {"node-a": False, "web-1": False}  # remembered after they left


async def test_watching_without_a_credential_is_unauthenticated(mesh: Mesh) -> None:
    for token in (None, "not-the-join-token"):
        async with dc.channel(mesh.address, mesh.authority.bundle_pem, join_token=token) as ch:
            with pytest.raises(dc.ControlPlaneError) as info:
                await anext(dc.watch(dc.DiscoveryStub(ch), request()))
            assert info.value.code == "UNAUTHENTICATED"
            assert "join token" in str(info.value)
