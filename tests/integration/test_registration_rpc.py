"""Registration over real gRPC against a real control-plane process on 127.0.0.1: a sidecar
gets its SVID with the join token (TLS port), then registers, heartbeats, drains and
deregisters its own endpoint over mTLS; the admin REST API shows what happened. Ends with
sidecar.registration.Registrar riding out a control-plane restart."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from control_plane_helpers import Answer, ControlPlaneProcess
from cryptography.hazmat.primitives import serialization

from certs import pki
from certs.spiffe import parse
from meshlet import discovery_client as dc
from meshlet import wire
from meshlet.model import Endpoint, Health, Protocol, ServicePort
from meshlet.proto import mesh_pb2
from meshlet.runtime import SystemClock
from sidecar.registration import Registrar

TD = "mesh.test"
TTL_ARGS = ("--trust-domain", TD, "--endpoint-ttl", "2s", "--deregister-after", "4s")
HTTP_8080 = (ServicePort(port=8080, protocol=Protocol.HTTP),)
WAIT_S = 15.0
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes


def bundle(cp: ControlPlaneProcess) -> bytes:
    return (cp.data_dir / "ca" / "bundle.pem").read_bytes()


async def get_svid(cp: ControlPlaneProcess, namespace: str, name: str) -> Svid:
    """Sign a fresh key's CSR with the join token over the TLS port, as a sidecar starts."""
    spiffe_id = f"spiffe://{TD}/ns/{namespace}/sa/{name}"
    key = pki.new_key()
    csr = pki.build_csr(key, parse(spiffe_id)).public_bytes(serialization.Encoding.PEM)
    token = (cp.data_dir / "join-token").read_text().strip()
    async with dc.channel(cp.info["grpc"], bundle(cp)) as ch:
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch), csr_pem=csr, spiffe_id=spiffe_id, join_token=token
        )
    return Svid(spiffe_id, signed.cert_chain_pem, pki.dump_key(key))


def mtls(cp: ControlPlaneProcess, svid: Svid) -> grpc.aio.Channel:
    return dc.channel(
        cp.info["grpc_mtls"], bundle(cp), svid.chain_pem, svid.key_pem, options=FAST_RECONNECT
    )


def endpoint(namespace: str, service: str, id_: str, port: int, **kw: Any) -> Endpoint:
    return Endpoint(
        id=id_,
        namespace=namespace,
        service=service,
        address="127.0.0.1",
        app_port=8080,
        inbound_port=port,
        **kw,
    )


async def rest(cp: ControlPlaneProcess, method: str, path: str) -> Answer:
    """The admin API (with the admin token), off the loop so heartbeats keep flowing."""
    return await asyncio.to_thread(cp.call, method, path)


async def listed(
    cp: ControlPlaneProcess, namespace: str, service: str, *, passing: bool = False
) -> dict[str, dict[str, Any]] | None:
    """The service's endpoints by id as GET /v1/services/NS/NAME/endpoints shows them."""
    query = "?passing" if passing else ""
    answer = await rest(cp, "GET", f"/v1/services/{namespace}/{service}/endpoints{query}")
    if answer.status == 404:
        return None
    assert answer.status == 200, answer.data
    return {item["id"]: item for item in answer.data["items"]}


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


async def health_of(cp: ControlPlaneProcess, namespace: str, service: str, id_: str) -> str | None:
    eps = await listed(cp, namespace, service)
    return None if eps is None or id_ not in eps else eps[id_]["health"]


async def refused(call: Awaitable[Any]) -> dc.ControlPlaneError:
    with pytest.raises(dc.ControlPlaneError) as err:
        await call
    return err.value


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess(tmp_path_factory.mktemp("registration") / "data", *TTL_ARGS)
    try:
        yield proc.start()
    finally:
        proc.kill()


# ---- Register -------------------------------------------------------------------------------


async def test_register_creates_the_service_and_the_endpoint_as_the_caller(
    cp: ControlPlaneProcess,
) -> None:
    svid = await get_svid(cp, "create", "web")
    assert (await rest(cp, "GET", "/v1/services/create/web")).status == 404
    async with mtls(cp, svid) as ch:
        stored = await dc.register(
            dc.RegistrationStub(ch), endpoint("create", "web", "create-web-1", 16001), HTTP_8080
        )
    assert stored.identity == svid.spiffe_id
    assert stored.health is Health.HEALTHY
    service = await rest(cp, "GET", "/v1/services/create/web")
    assert service.status == 200
    assert service.data["ports"] == [{"port": 8080, "protocol": "http"}]
    assert service.data["vip"]
    eps = await listed(cp, "create", "web")
    assert eps is not None and set(eps) == {"create-web-1"}
    assert eps["create-web-1"]["identity"] == svid.spiffe_id
    assert (
        eps["create-web-1"]["address"] == "127.0.0.1"
        and eps["create-web-1"]["inbound_port"] == 16001
    )
    assert eps["create-web-1"]["last_heartbeat_age_s"] is not None  # registering counts as a beat


async def test_heartbeats_keep_it_healthy_past_the_ttl_and_silence_expires_it(
    cp: ControlPlaneProcess,
) -> None:
    svid = await get_svid(cp, "beat", "web")
    async with mtls(cp, svid) as ch:
        stub = dc.RegistrationStub(ch)
        await dc.register(stub, endpoint("beat", "web", "beat-web-1", 16002), HTTP_8080)
        started = time.monotonic()
        while time.monotonic() - started < 3.5:  # well past the 2 s TTL
            assert await dc.heartbeat(stub, "beat-web-1") is Health.HEALTHY
            assert await health_of(cp, "beat", "web", "beat-web-1") == "healthy"
            await asyncio.sleep(0.5)

        def is_(health: str | None) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await health_of(cp, "beat", "web", "beat-web-1") == health

            return check

        await eventually(is_("unhealthy"), "silent endpoint marked unhealthy", 8)
        # A beat brings it back: the tracker's command (unhealthy → healthy) is executed.
        assert await dc.heartbeat(stub, "beat-web-1") is Health.HEALTHY
        assert await health_of(cp, "beat", "web", "beat-web-1") == "healthy"
        await eventually(is_(None), "silent endpoint deregistered", 12)
        err = await refused(dc.heartbeat(stub, "beat-web-1"))
        assert err.code == "NOT_FOUND" and "register it again" in err.details


async def test_draining_leaves_passing_and_deregister_removes_it(cp: ControlPlaneProcess) -> None:
    svid = await get_svid(cp, "drain", "web")
    async with mtls(cp, svid) as ch:
        stub = dc.RegistrationStub(ch)
        await dc.register(stub, endpoint("drain", "web", "drain-web-1", 16003), HTTP_8080)
        await dc.register(
            stub, endpoint("drain", "web", "drain-web-2", 16004)
        )  # service exists now
        assert await dc.set_health(stub, "drain-web-1", Health.DRAINING) is Health.DRAINING
        eps = await listed(cp, "drain", "web")
        assert eps is not None and eps["drain-web-1"]["health"] == "draining"
        passing = await listed(cp, "drain", "web", passing=True)
        assert passing is not None and set(passing) == {"drain-web-2"}
        assert await dc.heartbeat(stub, "drain-web-1") is Health.DRAINING  # a beat does not undrain

        await dc.deregister(stub, "drain-web-1")
        eps = await listed(cp, "drain", "web")
        assert eps is not None and set(eps) == {"drain-web-2"}
        assert (await refused(dc.deregister(stub, "drain-web-1"))).code == "NOT_FOUND"
        assert (
            await refused(dc.set_health(stub, "drain-web-1", Health.HEALTHY))
        ).code == "NOT_FOUND"


# ---- refusals ---------------------------------------------------------------------------------


async def test_a_web_svid_cannot_register_or_touch_orders(cp: ControlPlaneProcess) -> None:
    web, orders = await get_svid(cp, "deny", "web"), await get_svid(cp, "deny", "orders")
    async with mtls(cp, web) as web_ch, mtls(cp, orders) as orders_ch:
        as_web = dc.RegistrationStub(web_ch)
        err = await refused(
            dc.register(as_web, endpoint("deny", "orders", "deny-orders-1", 16010), HTTP_8080)
        )
        assert err.code == "PERMISSION_DENIED"
        assert web.spiffe_id in err.details and "deny/orders" in err.details
        assert (await rest(cp, "GET", "/v1/services/deny/orders")).status == 404  # nothing made
        impostor = endpoint("deny", "web", "deny-web-1", 16011, identity=orders.spiffe_id)
        assert (await refused(dc.register(as_web, impostor, HTTP_8080))).code == (
            "PERMISSION_DENIED"
        )
        assert await listed(cp, "deny", "web") is None

        # orders registers its own endpoint; web can neither beat, drain nor remove it.
        as_orders = dc.RegistrationStub(orders_ch)
        await dc.register(as_orders, endpoint("deny", "orders", "deny-orders-1", 16010), HTTP_8080)
        for call in (
            dc.heartbeat(as_web, "deny-orders-1"),
            dc.set_health(as_web, "deny-orders-1", Health.DRAINING),
            dc.deregister(as_web, "deny-orders-1"),
        ):
            assert (await refused(call)).code == "PERMISSION_DENIED"
        eps = await listed(cp, "deny", "orders")
        assert eps is not None and eps["deny-orders-1"]["health"] == "healthy"
        assert eps["deny-orders-1"]["identity"] == orders.spiffe_id


async def test_bad_input_conflicts_and_a_missing_service(cp: ControlPlaneProcess) -> None:
    svid = await get_svid(cp, "input", "web")
    other = await get_svid(cp, "input", "api")
    async with mtls(cp, svid) as ch, mtls(cp, other) as other_ch:
        stub = dc.RegistrationStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.Register(mesh_pb2.RegisterRequest(endpoint_json=b"{nope"), timeout=5)
        assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "endpoint_json is not valid JSON" in (raw.value.details() or "")
        bad = wire.to_data(endpoint("input", "web", "input-web-1", 16020))
        bad["app_port"] = 0
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            request = mesh_pb2.RegisterRequest(endpoint_json=orjson.dumps(bad))
            await stub.Register(request, timeout=5)
        assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "app_port" in (raw.value.details() or "")

        err = await refused(dc.register(stub, endpoint("input", "web", "input-web-1", 16020)))
        assert err.code == "NOT_FOUND" and "input/web does not exist" in err.details

        await dc.register(stub, endpoint("input", "web", "input-web-1", 16020), HTTP_8080)
        taken = endpoint("input", "api", "input-api-1", 16020)  # another service, the same address
        err = await refused(dc.register(dc.RegistrationStub(other_ch), taken, HTTP_8080))
        assert err.code == "ALREADY_EXISTS" and "input-web-1" in err.details
        assert await listed(cp, "input", "api") is None


async def test_registration_is_not_served_on_the_tls_port(cp: ControlPlaneProcess) -> None:
    svid = await get_svid(cp, "tls", "web")
    ep = endpoint("tls", "web", "tls-web-1", 16030)
    async with dc.channel(cp.info["grpc"], bundle(cp)) as ch:
        stub = dc.RegistrationStub(ch)
        err = await refused(dc.register(stub, ep, HTTP_8080))
        assert err.code == "UNAUTHENTICATED" and "mTLS port" in err.details
        assert (await refused(dc.heartbeat(stub, "tls-web-1"))).code == "UNAUTHENTICATED"
        assert (await refused(dc.deregister(stub, "tls-web-1"))).code == "UNAUTHENTICATED"
    # A certificate offered on the TLS port is never asked for, so it counts for nothing.
    with_cert = dc.channel(cp.info["grpc"], bundle(cp), svid.chain_pem, svid.key_pem)
    async with with_cert as ch:
        err = await refused(dc.register(dc.RegistrationStub(ch), ep, HTTP_8080))
        assert err.code == "UNAUTHENTICATED"
    assert (await rest(cp, "GET", "/v1/services/tls/web")).status == 404


# ---- the sidecar's Registrar, across a control-plane restart ----------------------------------------


async def test_registrar_rides_out_a_control_plane_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.registration")
    cp = ControlPlaneProcess(tmp_path / "data", *TTL_ARGS)
    cp.start()
    task: asyncio.Task[None] | None = None
    try:
        svid = await get_svid(cp, "life", "web")
        ep = endpoint("life", "web", "life-web-1", 16040, labels={"version": "v1"})
        async with mtls(cp, svid) as ch:
            registrar = Registrar(
                lambda: ch,
                ep,
                service_ports=HTTP_8080,
                interval_s=0.5,
                clock=SystemClock(),
                rng=random.Random(5),
            )
            task = asyncio.create_task(registrar.run())

            async def healthy() -> bool:
                return await health_of(cp, "life", "web", "life-web-1") == "healthy"

            await eventually(healthy, "the Registrar registered the endpoint")
            assert registrar.registered and registrar.stored is not None
            assert registrar.stored.identity == svid.spiffe_id
            await asyncio.sleep(3.0)  # past the TTL: heartbeats keep it healthy
            assert await healthy()
            assert registrar.counters.heartbeats >= 3 and registrar.counters.failures == 0

            # The control plane goes away: run() keeps trying, nothing escapes.
            assert await asyncio.to_thread(cp.stop) == 0
            failures = registrar.counters.failures
            await asyncio.sleep(2.0)
            assert not task.done()
            assert registrar.counters.failures > failures
            unreachable = [r for r in caplog.records if "cannot reach" in r.getMessage()]
            assert len(unreachable) == 1, "one log line per state change, not per attempt"

            # Back on the same data dir and ports: heartbeats resume.
            cp.extra_args = (
                *TTL_ARGS,
                "--api", cp.info["api"],
                "--grpc", cp.info["grpc"],
                "--grpc-mtls", cp.info["grpc_mtls"],
            )  # fmt: skip
            await asyncio.to_thread(cp.start)
            beats = registrar.counters.heartbeats

            async def beating() -> bool:
                return registrar.counters.heartbeats > beats + 2

            await eventually(beating, "heartbeats resumed")
            assert await healthy()
            assert [r for r in caplog.records if r.getMessage().startswith("endpoint registered")]

            # The control plane forgets the endpoint: the next heartbeat re-registers it.
            gone = await rest(cp, "DELETE", "/v1/endpoints/life-web-1")
            assert gone.status == 200, gone.data
            await eventually(healthy, "the Registrar re-registered after NOT_FOUND")
            assert registrar.counters.reregistrations >= 1
            eps = await listed(cp, "life", "web")
            assert eps is not None and eps["life-web-1"]["identity"] == svid.spiffe_id
            assert eps["life-web-1"]["labels"] == {"version": "v1"}

            # Shutdown: drain, then deregister; run() ends by itself.
            assert await registrar.drain()
            assert await health_of(cp, "life", "web", "life-web-1") == "draining"
            await asyncio.sleep(1.0)  # heartbeats go on but do not undrain
            assert await health_of(cp, "life", "web", "life-web-1") == "draining"
            assert await registrar.deregister()
            assert await listed(cp, "life", "web") == {}
            async with asyncio.timeout(5):
                await task
            assert not registrar.registered

            # With the control plane gone, best effort gives up within its short timeout.
            assert await asyncio.to_thread(cp.stop) == 0
            started = time.monotonic()
            assert not await registrar.drain()
            assert not await registrar.deregister()
            assert time.monotonic() - started < 6
    finally:
        if task is not None and not task.done():
            task.cancel()
        cp.kill()
