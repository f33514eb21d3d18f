"""Root rotation through a running control plane: the certs CLI asks the mesh before
each step, the control plane pushes each new bundle to watching clients, and a step
is refused while a client would break."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess
from cryptography.hazmat.primitives import serialization

from certs import pki
from certs.spiffe import SpiffeId
from meshlet import discovery_client as dc


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "cp", "--trust-domain", "rot.test")
    try:
        yield cp.start()
    finally:
        cp.kill()


def certs_cli(cp: ControlPlaneProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlet",
            "certs",
            "rotate",
            "root",
            "--dir",
            str(cp.data_dir / "ca"),
            "--control-plane",
            cp.base,
            "--token-file",
            str(cp.token_file),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Workload:
    """A stand-in sidecar: gets its SVID with the join token, watches, adopts bundles."""

    def __init__(self, cp: ControlPlaneProcess) -> None:
        self.cp = cp
        self.bundle = (cp.data_dir / "ca" / "bundle.pem").read_bytes()
        self.key = pki.new_key()
        self.sid = SpiffeId.for_workload("rot.test", "shop", "orders")
        self.chain = b""
        self.pushed: list[bytes] = []
        self.adopt = True

    def request(self) -> object:
        return dc.watch_request(
            client_id="orders-1", kind="sidecar", bundle_pem=self.bundle, leaf_chain_pem=self.chain
        )

    async def renew(self, channel: object) -> None:
        csr = pki.build_csr(self.key, self.sid).public_bytes(serialization.Encoding.PEM)
        token = (self.cp.data_dir / "join-token").read_text().strip()
        signed = await dc.sign(
            dc.CertificateAuthorityStub(channel),
            csr_pem=csr,
            spiffe_id=str(self.sid),
            join_token=token,
        )
        self.chain = signed.cert_chain_pem
        await dc.report(dc.DiscoveryStub(channel), self.request())

    async def watch(self, channel: object) -> None:
        async for update in dc.watch(dc.DiscoveryStub(channel), self.request()):
            if update.trust_bundle_pem and update.trust_bundle_pem != self.bundle:
                self.pushed.append(update.trust_bundle_pem)
                if self.adopt:
                    await self.take_bundle(channel)

    async def take_bundle(self, channel: object) -> None:
        self.bundle = self.pushed[-1]
        await dc.report(dc.DiscoveryStub(channel), self.request())


async def until(predicate: object, what: str, timeout: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # type: ignore[operator]
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def test_root_rotation_waits_for_the_mesh_at_each_step(
    control_plane: ControlPlaneProcess,
) -> None:
    cp = control_plane
    w = Workload(cp)
    channel = dc.channel(
        cp.info["grpc"], w.bundle, join_token=(cp.data_dir / "join-token").read_text().strip()
    )
    try:
        await w.renew(channel)
        watcher = asyncio.create_task(w.watch(channel))
        status = await asyncio.to_thread(certs_cli, cp, "--status")
        assert "1 client(s); ready for this step" in status.stdout, status.stdout + status.stderr

        # add: the new bundle (both roots) is pushed; our workload does not adopt it yet.
        w.adopt = False
        added = await asyncio.to_thread(certs_cli, cp, "--step", "add")
        assert added.returncode == 0, added.stderr
        await until(lambda: len(w.pushed) == 1, "bundle push after add")
        assert len(pki.load_certs(w.pushed[0], source="pushed")) == 2
        refused = await asyncio.to_thread(certs_cli, cp, "--step", "promote")
        assert refused.returncode == 1
        assert "not ready to promote: sidecar orders-1" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (cp.data_dir / "ca" / "previous-root-cert.pem").exists()  # nothing changed

        await w.take_bundle(channel)
        status = await asyncio.to_thread(certs_cli, cp, "--status")
        assert "ready for this step" in status.stdout, status.stdout
        promoted = await asyncio.to_thread(certs_cli, cp, "--step", "promote")
        assert promoted.returncode == 0, promoted.stderr

        # retire waits until the workload runs a leaf under the new root.
        refused = await asyncio.to_thread(certs_cli, cp, "--step", "retire")
        assert refused.returncode == 1 and "under the old root" in refused.stderr, refused.stderr
        await w.renew(channel)  # the control plane signs with the new issuer already
        leaf_chain = pki.load_certs(w.chain, source="leaf")
        assert pki.anchor_of(
            leaf_chain,
            pki.load_certs((cp.data_dir / "ca" / "root-cert.pem").read_bytes(), source="root"),
        )
        w.adopt = True
        retired = await asyncio.to_thread(certs_cli, cp, "--step", "retire")
        assert retired.returncode == 0, retired.stderr
        await until(
            lambda: len(pki.load_certs(w.bundle, source="b")) == 1 and len(w.pushed) == 2,
            "bundle push after retire",
        )
        watcher.cancel()
    finally:
        await channel.close()
