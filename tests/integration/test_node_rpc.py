"""The Nodes gRPC service against a real control-plane process on 127.0.0.1: a node helper
registers with the join token alone (no admin token, no SVID), leases a /24 that it keeps
across re-registrations, heartbeats and deregisters; refusals carry the status and a
reason that names the input. The admin REST API and Discovery.Watch show the result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from control_plane_helpers import ControlPlaneProcess

from meshlet import discovery_client as dc
from meshlet.model import Health

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess(tmp_path_factory.mktemp("node-rpc") / "data")
    try:
        yield proc.start()
    finally:
        proc.kill()


def bundle(cp: ControlPlaneProcess) -> bytes:
    return (cp.data_dir / "ca" / "bundle.pem").read_bytes()


def token(cp: ControlPlaneProcess) -> str:
    return (cp.data_dir / "join-token").read_text().strip()


async def refused(call: Awaitable[Any]) -> dc.ControlPlaneError:
    with pytest.raises(dc.ControlPlaneError) as err:
        await call
    return err.value


async def test_a_node_registers_with_the_join_token_and_keeps_its_subnet(
    cp: ControlPlaneProcess,
) -> None:
    async with dc.channel(cp.info["grpc"], bundle(cp), join_token=token(cp)) as ch:
        stub = dc.NodesStub(ch)  # type: ignore[no-untyped-call]
        first = await dc.register_node(
            stub, name="alpha", underlay_address="198.18.0.2", vtep_mac="02:4d:c6:12:00:02"
        )
        second = await dc.register_node(
            stub, name="beta", underlay_address="198.18.0.3", vtep_mac="02:4d:c6:12:00:03"
        )
        assert first.subnet is not None and second.subnet is not None
        assert first.subnet.startswith("198.19.") and first.subnet.endswith("/24")
        assert first.subnet != second.subnet
        # Re-registering (a restart, a new VTEP MAC) keeps the lease.
        again = await dc.register_node(
            stub, name="alpha", underlay_address="198.18.0.2", vtep_mac="02:4d:c6:12:00:09"
        )
        assert (again.subnet, again.vtep_mac) == (first.subnet, "02:4d:c6:12:00:09")
        assert await dc.node_heartbeat(stub, "alpha") is Health.HEALTHY

        listed = await asyncio.to_thread(cp.call, "GET", "/v1/nodes", token=cp.token)
        rows = {n["name"]: n for n in listed.data["items"]}
        assert rows["alpha"]["subnet"] == first.subnet
        assert rows["beta"]["underlay_address"] == "198.18.0.3"

        # The node map reaches a watcher of kind "node" with the same join token.
        request = dc.watch_request(client_id="node:test", kind="node")
        async for update in dc.watch(dc.DiscoveryStub(ch), request):  # type: ignore[no-untyped-call]
            assert isinstance(update, dc.Reset)
            assert {"alpha", "beta"} <= set(update.snapshot.nodes)
            break

        await dc.deregister_node(stub, "beta")
        gone = await refused(dc.node_heartbeat(stub, "beta"))
        assert gone.code == "NOT_FOUND" and "register it again" in gone.details
        listed = await asyncio.to_thread(cp.call, "GET", "/v1/nodes", token=cp.token)
        assert "beta" not in {n["name"] for n in listed.data["items"]}
        assert (await refused(dc.deregister_node(stub, "beta"))).code == "NOT_FOUND"


async def test_refusals_name_the_problem(cp: ControlPlaneProcess) -> None:
    async with dc.channel(cp.info["grpc"], bundle(cp), join_token=token(cp)) as ch:
        stub = dc.NodesStub(ch)  # type: ignore[no-untyped-call]
        await dc.register_node(
            stub, name="gamma", underlay_address="198.18.0.7", vtep_mac="02:4d:c6:12:00:07"
        )
        taken = await refused(
            dc.register_node(
                stub, name="delta", underlay_address="198.18.0.7", vtep_mac="02:4d:c6:12:00:08"
            )
        )
        assert taken.code == "ALREADY_EXISTS" and "gamma" in taken.details
        bad_mac = await refused(
            dc.register_node(stub, name="delta", underlay_address="198.18.0.8", vtep_mac="nope")
        )
        assert bad_mac.code == "INVALID_ARGUMENT" and "vtep_mac" in bad_mac.details
        assert bad_mac.exit_code == 2
        bad_name = await refused(
            dc.register_node(
                stub, name="Delta_1", underlay_address="198.18.0.8", vtep_mac="02:4d:c6:12:00:08"
            )
        )
        assert bad_name.code == "INVALID_ARGUMENT" and "node name" in bad_name.details

    for credential in ("wrong-token", None):
        async with dc.channel(cp.info["grpc"], bundle(cp), join_token=credential) as ch:
            error = await refused(
                dc.register_node(
                    dc.NodesStub(ch),  # type: ignore[no-untyped-call]
                    name="epsilon",
                    underlay_address="198.18.0.9",
                    vtep_mac="02:4d:c6:12:00:09",
                )
            )
            assert error.code == "UNAUTHENTICATED", error
            assert "join token" in error.details
