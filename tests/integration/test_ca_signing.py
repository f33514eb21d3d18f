"""CertificateAuthority.Sign over real gRPC with TLS (join token) and mTLS (renewal), and the
control plane's CA directory rotated underneath it with the real `meshlet certs` CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import cadir, pki
from certs.spiffe import parse
from certs.verify import Expectation, verify_svid
from control_plane.ca import Authority
from control_plane.core import ControlPlane
from control_plane.discovery import GrpcServer
from control_plane.registry import Config
from control_plane.store.sqlite import SqliteStore
from meshlet import discovery_client as dc
from meshlet.errors import CertificateError, ConflictError
from meshlet.proto import mesh_pb2, mesh_pb2_grpc
from meshlet.runtime import SystemClock

TD = "mesh.test"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"
WAIT_S = 10.0
pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    data: Path
    authority: Authority
    server: GrpcServer

    @property
    def token(self) -> str:
        return (self.data / "join-token").read_text().strip()

    def channel(self) -> grpc.aio.Channel:
        return dc.channel(
            f"127.0.0.1:{self.server.port}",
            self.authority.bundle_pem,
            join_token=self.authority.join_token,
        )

    def mtls_channel(self, chain_pem: bytes, key: pki.PrivateKey) -> grpc.aio.Channel:
        return dc.channel(
            f"127.0.0.1:{self.server.mtls_port}",
            self.authority.bundle_pem,
            chain_pem,
            pki.dump_key(key),
        )


def new_authority(data: Path, trust_domain: str = TD) -> Authority:
    authority = Authority(
        data, trust_domain=trust_domain, clock=SystemClock(), rng=random.Random(3)
    )
    authority.start()
    return authority


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    try:
        cp = ControlPlane(store, Config(trust_domain=TD))
        await cp.load()
        authority = new_authority(tmp_path / "data")
        server = GrpcServer(cp, authority, bookmark_s=30.0)
        await server.start("127.0.0.1:0", mtls_address="127.0.0.1:0")
        try:
            yield Mesh(tmp_path / "data", authority, server)
        finally:
            await server.stop(0)
    finally:
        await store.close()


def csr(key: pki.PrivateKey, spiffe_id: str) -> bytes:
    return pki.build_csr(key, parse(spiffe_id)).public_bytes(serialization.Encoding.PEM)


async def sign_raw(ch: grpc.aio.Channel, **fields: object) -> mesh_pb2.SignResponse:
    stub = mesh_pb2_grpc.CertificateAuthorityStub(ch)
    return await stub.Sign(mesh_pb2.SignRequest(**fields), timeout=WAIT_S)  # type: ignore[no-any-return]


async def refused(ch: grpc.aio.Channel, **fields: object) -> tuple[str, str]:
    with pytest.raises(dc.ControlPlaneError) as err:
        await dc.sign(dc.CertificateAuthorityStub(ch), **fields)  # type: ignore[arg-type]
    return err.value.code, err.value.details


def verifies(chain_pem: bytes, roots_pem: bytes, spiffe_id: str) -> bool:
    chain = x509.load_pem_x509_certificates(chain_pem)
    roots = x509.load_pem_x509_certificates(roots_pem)
    now = dt.datetime.now(dt.UTC)
    verdict = verify_svid(chain, roots, now=now, expect=Expectation.exactly(parse(spiffe_id)))
    return verdict.ok


async def meshlet_certs(*args: str | Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshlet", "certs", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def served_certificate(mesh: Mesh) -> x509.Certificate:
    """The leaf the control plane presents to a new TLS connection right now."""
    ctx = ssl.create_default_context(cadata=mesh.authority.bundle_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    async with asyncio.timeout(WAIT_S):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", mesh.server.port, ssl=ctx, server_hostname=dc.SERVER_NAME
        )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


# ---- first certificate: the join token ---------------------------------------------------------


async def test_join_token_gets_a_verifying_24h_chain_and_never_a_key(mesh: Mesh) -> None:
    key = pki.new_key()
    async with mesh.channel() as ch:
        response = await sign_raw(ch, csr_pem=csr(key, WEB), spiffe_id=WEB, join_token=mesh.token)
    assert b"PRIVATE KEY" not in response.SerializeToString()
    assert response.trust_bundle_pem == mesh.authority.bundle_pem
    assert verifies(response.cert_chain_pem, mesh.authority.bundle_pem, WEB)
    leaf, issuer = x509.load_pem_x509_certificates(response.cert_chain_pem)
    assert issuer == mesh.authority.state.issuer
    assert leaf.public_key() == key.public_key()
    assert pki.ttl_of(leaf) == dt.timedelta(hours=24)
    assert pki.spiffe_id_of(leaf) == parse(WEB)


async def test_a_shorter_lifetime_can_be_asked_for(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch),
            csr_pem=csr(pki.new_key(), WEB),
            spiffe_id=WEB,
            join_token=mesh.token,
            ttl_seconds=3600,
        )
    leaf = x509.load_pem_x509_certificates(signed.cert_chain_pem)[0]
    assert pki.ttl_of(leaf) == dt.timedelta(hours=1)


async def test_wrong_or_missing_token_is_unauthenticated(mesh: Mesh) -> None:
    async with mesh.channel() as ch:
        for token in ("", "not-the-token", mesh.token + "x"):
            code, details = await refused(
                ch, csr_pem=csr(pki.new_key(), WEB), spiffe_id=WEB, join_token=token
            )
            assert code == "UNAUTHENTICATED", details
            assert "join token" in details


@pytest.mark.parametrize(
    "spiffe_id",
    [
        f"spiffe://{TD}/ns/meshlet-system/sa/control-plane",
        f"spiffe://{TD}/ns/meshlet-system/sa/node-a",
        "spiffe://other.test/ns/shop/sa/web",
    ],
)
async def test_token_cannot_get_system_or_foreign_ids(mesh: Mesh, spiffe_id: str) -> None:
    async with mesh.channel() as ch:
        code, details = await refused(
            ch, csr_pem=csr(pki.new_key(), spiffe_id), spiffe_id=spiffe_id, join_token=mesh.token
        )
    assert code == "PERMISSION_DENIED", details


@pytest.mark.parametrize(
    ("request_fields", "says"),
    [
        (
            {"csr_pem": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"},
            "certificate signing request",
        ),
        ({"csr_pem": b""}, "csr_pem is empty"),
        ({"spiffe_id": "web"}, "must start with 'spiffe://'"),
        ({"spiffe_id": ORDERS}, "must agree"),
        ({"ttl_seconds": 8 * 86400}, "ttl_seconds"),
    ],
)
async def test_bad_request_is_invalid_argument(
    mesh: Mesh, request_fields: dict[str, object], says: str
) -> None:
    fields: dict[str, object] = {
        "csr_pem": csr(pki.new_key(), WEB),
        "spiffe_id": WEB,
        "join_token": mesh.token,
        **request_fields,
    }
    async with mesh.channel() as ch:
        code, details = await refused(ch, **fields)
    assert code == "INVALID_ARGUMENT"
    assert says in details


async def test_csr_asking_for_a_dns_name_is_invalid_argument(mesh: Mesh) -> None:
    key = pki.new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(WEB), x509.DNSName(dc.SERVER_NAME)]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    async with mesh.channel() as ch:
        code, details = await refused(ch, csr_pem=request, spiffe_id=WEB, join_token=mesh.token)
    assert code == "INVALID_ARGUMENT"
    assert "no DNS names" in details


# ---- renewal: the current SVID over mTLS -------------------------------------------------------


async def first_certificate(mesh: Mesh, spiffe_id: str = WEB) -> tuple[bytes, pki.PrivateKey]:
    key = pki.new_key()
    async with mesh.channel() as ch:
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch),
            csr_pem=csr(key, spiffe_id),
            spiffe_id=spiffe_id,
            join_token=mesh.token,
        )
    return signed.cert_chain_pem, key


async def test_renewal_over_mtls_for_the_same_id(mesh: Mesh) -> None:
    chain_pem, key = await first_certificate(mesh)
    new_key = pki.new_key()
    async with mesh.mtls_channel(chain_pem, key) as ch:
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch), csr_pem=csr(new_key, WEB), spiffe_id=WEB
        )
    assert verifies(signed.cert_chain_pem, signed.trust_bundle_pem, WEB)
    renewed = x509.load_pem_x509_certificates(signed.cert_chain_pem)[0]
    assert renewed.public_key() == new_key.public_key()
    assert renewed.serial_number != x509.load_pem_x509_certificates(chain_pem)[0].serial_number


async def test_renewal_for_another_id_is_permission_denied(mesh: Mesh) -> None:
    chain_pem, key = await first_certificate(mesh)
    async with mesh.mtls_channel(chain_pem, key) as ch:
        for other in (ORDERS, f"spiffe://{TD}/ns/meshlet-system/sa/control-plane"):
            code, details = await refused(ch, csr_pem=csr(pki.new_key(), other), spiffe_id=other)
            assert code == "PERMISSION_DENIED"
            assert "may renew only itself" in details


async def test_a_certificate_from_another_ca_cannot_connect_to_renew(
    mesh: Mesh, tmp_path: Path
) -> None:
    other = cadir.init(tmp_path / "other", TD, dt.datetime.now(dt.UTC))
    chain, key, _ = cadir.issue(other, parse(WEB), dt.datetime.now(dt.UTC))
    async with mesh.mtls_channel(pki.dump_certs(chain), key) as ch:
        code, _ = await refused(ch, csr_pem=csr(pki.new_key(), WEB), spiffe_id=WEB)
    assert code == "UNAVAILABLE"  # the TLS handshake itself fails


# ---- rotation underneath a running control plane ------------------------------------------------


async def test_after_issuer_rotation_new_leaves_chain_to_the_new_issuer(mesh: Mesh) -> None:
    old_issuer = mesh.authority.state.issuer
    old_chain, old_key = await first_certificate(mesh)
    old_served = await served_certificate(mesh)
    assert old_served == mesh.authority.server_chain[0]

    await meshlet_certs("rotate", "issuer", "--dir", mesh.data / "ca")
    assert mesh.authority.reload() is True
    new_issuer = mesh.authority.state.issuer
    assert new_issuer != old_issuer

    chain_pem, _ = await first_certificate(mesh, ORDERS)
    assert x509.load_pem_x509_certificates(chain_pem)[1] == new_issuer
    assert verifies(chain_pem, mesh.authority.bundle_pem, ORDERS)
    assert verifies(old_chain, mesh.authority.bundle_pem, WEB)  # old leaves keep working
    async with mesh.mtls_channel(old_chain, old_key) as ch:  # and renew under the new issuer
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch), csr_pem=csr(old_key, WEB), spiffe_id=WEB
        )
    assert x509.load_pem_x509_certificates(signed.cert_chain_pem)[1] == new_issuer

    served = await served_certificate(mesh)  # re-issued and served without a restart
    assert served != old_served
    assert served == mesh.authority.server_chain[0]
    assert served.verify_directly_issued_by(new_issuer) is None


async def test_poll_notices_a_rotation_without_being_told(mesh: Mesh) -> None:
    assert mesh.authority.poll() is False
    old_issuer = mesh.authority.state.issuer
    await meshlet_certs("rotate", "issuer", "--dir", mesh.data / "ca")
    assert mesh.authority.poll() is True
    assert mesh.authority.state.issuer != old_issuer
    assert mesh.authority.poll() is False


async def test_root_promotion_moves_signing_to_the_new_root(mesh: Mesh) -> None:
    old_root = mesh.authority.state.root
    old_chain, old_key = await first_certificate(mesh)
    await meshlet_certs("rotate", "root", "--step", "add", "--dir", mesh.data / "ca")
    mesh.authority.reload()
    new_root = mesh.authority.state.next_root
    assert new_root is not None
    await meshlet_certs("rotate", "root", "--step", "promote", "--dir", mesh.data / "ca")
    mesh.authority.reload()
    assert mesh.authority.state.root == new_root
    async with mesh.mtls_channel(old_chain, old_key) as ch:  # renew on the old root's leaf
        signed = await dc.sign(
            dc.CertificateAuthorityStub(ch), csr_pem=csr(old_key, WEB), spiffe_id=WEB
        )
    chain = x509.load_pem_x509_certificates(signed.cert_chain_pem)
    assert pki.anchor_of(chain, [new_root]) == new_root
    assert pki.anchor_of(chain, [old_root]) is None
    served = await served_certificate(mesh)
    assert pki.anchor_of([served, mesh.authority.state.issuer], [new_root]) == new_root
    async with mesh.channel() as ch:  # clients with the two-root bundle still connect
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=WAIT_S
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_broken_ca_directory_never_stops_signing(mesh: Mesh) -> None:
    issuer = mesh.authority.state.issuer
    ca_key = mesh.data / "ca" / "ca-key.pem"
    ca_key.write_bytes(pki.dump_key(pki.new_key()))  # e.g. a rotation half written
    assert mesh.authority.poll() is False
    with pytest.raises(CertificateError, match="does not belong"):
        mesh.authority.reload()
    chain_pem, _ = await first_certificate(mesh)
    assert x509.load_pem_x509_certificates(chain_pem)[1] == issuer


async def test_the_report_knows_the_root_of_leaves_it_signed(mesh: Mesh) -> None:
    chain_pem, _ = await first_certificate(mesh)
    request = dc.watch_request(client_id="web-1", kind="sidecar", leaf_chain_pem=chain_pem)
    request.ClearField("leaf_chain_pem")  # only the serial and expiry, as an old client sends
    async with mesh.channel() as ch:
        await dc.report(dc.DiscoveryStub(ch), request)
    (row,) = mesh.authority.report()["clients"]
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    assert row["leaf_serial"] == format(leaf.serial_number, "x")
    assert row["leaf_not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert row["leaf_under_current_root"] is True
    assert row["connected"] is False  # a Report opens no stream


# ---- start and restart ---------------------------------------------------------------------------


def test_restart_reuses_the_ca_its_certificate_and_the_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = new_authority(data)
    token = (data / "join-token").read_text()
    for path, mode in [
        (data / "join-token", 0o600),
        (data / "tls", 0o700),
        (data / "tls" / "key.pem", 0o600),
        (data / "ca", 0o700),
    ]:
        assert path.stat().st_mode & 0o777 == mode, path
    second = new_authority(data)
    assert second.state.root == first.state.root
    assert second.server_chain == first.server_chain
    assert second.tls.key_pem == first.tls.key_pem
    assert (data / "join-token").read_text() == token
    leaf = second.server_chain[0]
    assert pki.spiffe_id_of(leaf) == parse(f"spiffe://{TD}/ns/meshlet-system/sa/control-plane")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [dc.SERVER_NAME]


def test_a_ca_for_another_trust_domain_is_refused(tmp_path: Path) -> None:
    new_authority(tmp_path / "data")
    with pytest.raises(ConflictError, match="trust domain"):
        new_authority(tmp_path / "data", trust_domain="other.test")
