"""The sidecar's identity against a real `meshlet control-plane run` process on 127.0.0.1:
the first SVID with the join token (the key never leaves), a renewal at 2/3 of the
lifetime over mTLS that leaves open connections alone, and a root rotation pushed
through discovery into the TLS contexts."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from control_plane_helpers import ControlPlaneProcess
from cryptography import x509

from certs import pki, schedule
from certs.bundle import bundle_fingerprint_pem
from certs.spiffe import SpiffeId
from certs.verify import Expectation, verify_svid
from meshlet import discovery_client as dc
from meshlet.errors import InputError
from meshlet.runtime import Clock, SystemClock
from sidecar.discovery import Discovery
from sidecar.identity import Contexts, Identity

TD = "id.test"
SID = SpiffeId.for_workload(TD, "shop", "web")
WAIT_S = 30.0
pytestmark = pytest.mark.integration


@dataclass
class SkewedClock:
    """The real clock, ``offset`` ahead: a 60 s leaf (the CA's minimum) reaches 2/3 sooner."""

    offset: dt.timedelta

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        "--trust-domain",
        TD,
        "--endpoint-ttl",
        "600s",
        "--deregister-after",
        "900s",
    )
    try:
        yield cp.start()
    finally:
        cp.kill()


def identity_for(
    cp: ControlPlaneProcess,
    cert_dir: Path,
    *,
    token: bool = True,
    ttl_s: int | None = None,
    clock: Clock | None = None,
    seed: int = 1,
) -> Identity:
    return Identity(
        cert_dir,
        SID,
        control_plane=cp.info["grpc"],
        control_plane_mtls=cp.info["grpc_mtls"],
        bundle_pem=(cp.data_dir / "ca" / "bundle.pem").read_bytes(),
        join_token=(cp.data_dir / "join-token").read_text().strip() if token else None,
        ttl_s=ttl_s,
        clock=clock or SystemClock(),
        rng=random.Random(seed),
    )


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


def leaf_in(cert_dir: Path) -> x509.Certificate:
    return pki.load_certs((cert_dir / "cert.pem").read_bytes(), source="cert.pem")[0]


def serial_of(der: bytes) -> str:
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def certs_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshlet", "certs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---- first certificate ----------------------------------------------------------------------------


async def test_first_certificate_comes_from_a_csr_and_the_key_stays_local(
    control_plane: ControlPlaneProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = control_plane
    sent: list[dict[str, Any]] = []
    real_sign = dc.sign

    async def spy(stub: Any, **fields: Any) -> dc.Signed:
        sent.append(fields)
        return await real_sign(stub, **fields)

    monkeypatch.setattr(dc, "sign", spy)
    cert_dir = tmp_path / "web"
    async with asyncio.timeout(WAIT_S):
        contexts = await identity_for(cp, cert_dir).ensure()

    assert mode(cert_dir) == 0o700
    assert mode(cert_dir / "key.pem") == 0o600
    key_pem = (cert_dir / "key.pem").read_bytes()
    key = pki.load_key(key_pem, source="key.pem")
    chain = pki.load_certs((cert_dir / "cert.pem").read_bytes(), source="cert.pem")
    assert pki.key_matches(chain[0], key)
    assert pki.spiffe_id_of(chain[0]) == SID
    roots = pki.load_certs((cp.data_dir / "ca" / "bundle.pem").read_bytes(), source="bundle")
    now = dt.datetime.now(dt.UTC)
    assert verify_svid(chain, roots, now=now, expect=Expectation.exactly(SID)).ok
    assert pki.ttl_of(chain[0]) == dt.timedelta(hours=24)  # the CA's default leaf
    assert (cert_dir / "bundle.pem").read_bytes() == (
        cp.data_dir / "ca" / "bundle.pem"
    ).read_bytes()
    assert contexts.serial == format(chain[0].serial_number, "x")
    assert contexts.bundle_fingerprint == bundle_fingerprint_pem(pki.dump_certs(roots))
    assert contexts.server.minimum_version is ssl.TLSVersion.TLSv1_3
    assert contexts.client.verify_mode is ssl.CERT_REQUIRED

    # What went to the control plane: one CSR for our public key, the ID and the token.
    assert len(sent) == 1 and set(sent[0]) == {"csr_pem", "spiffe_id", "join_token", "ttl_seconds"}
    assert all(b"PRIVATE KEY" not in str(v).encode() for v in sent[0].values())
    csr = x509.load_pem_x509_csr(sent[0]["csr_pem"])
    assert csr.public_key() == key.public_key()
    # ...and the control plane has no copy of the key anywhere in its data or its log.
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    pem_line = key_pem.splitlines()[2]  # past the prefix every P-256 PKCS8 key shares
    for path in [p for p in cp.data_dir.rglob("*") if p.is_file()] + [cp.stderr_path]:
        data = path.read_bytes()
        assert secret not in data and pem_line not in data, f"the key leaked into {path}"

    # A restart with no token serves the same certificate and key, without signing again.
    again = identity_for(cp, cert_dir, token=False)
    assert (await again.ensure()).serial == contexts.serial
    assert len(sent) == 1
    assert (cert_dir / "key.pem").read_bytes() == key_pem
    assert again.expiry_seconds(now) == pytest.approx(24 * 3600, abs=120)


async def test_without_a_token_only_a_usable_certificate_will_do(
    control_plane: ControlPlaneProcess, tmp_path: Path
) -> None:
    cp = control_plane
    cert_dir = tmp_path / "web"
    with pytest.raises(InputError, match="no join token") as err:
        await identity_for(cp, cert_dir, token=False).ensure()
    assert "there is no cert.pem" in str(err.value)
    assert mode(cert_dir) == 0o700 and mode(cert_dir / "key.pem") == 0o600

    # A certificate for another ID is not ours.
    other = SpiffeId.for_workload(TD, "shop", "orders")
    issued = certs_cli(
        "issue", "--dir", cp.data_dir / "ca", "--spiffe-id", str(other), "--out", cert_dir
    )
    assert issued.returncode == 0, issued.stderr
    with pytest.raises(InputError, match="wrong_identity"):
        await identity_for(cp, cert_dir, token=False).ensure()

    # `meshlet certs issue` for our ID (it writes cert.pem, key.pem, bundle.pem): served as is.
    issued = certs_cli(
        "issue", "--dir", cp.data_dir / "ca", "--spiffe-id", str(SID), "--out", cert_dir
    )
    assert issued.returncode == 0, issued.stderr
    contexts = await identity_for(cp, cert_dir, token=False).ensure()
    assert contexts.serial == format(leaf_in(cert_dir).serial_number, "x")


# ---- renewal ---------------------------------------------------------------------------------------


@dataclass
class EchoServer:
    """TLS echo on 127.0.0.1 that takes the identity's server context current at each accept."""

    identity: Identity
    client_serials: list[str] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    async def serve(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            ctx = self.identity.contexts.server  # one lookup per connection, never a new context
            try:
                transport, _ = await loop.connect_accepted_socket(Echo, conn, ssl=ctx)
            except (OSError, ssl.SSLError):
                continue
            der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            self.client_serials.append(serial_of(der))
            self.transports.append(transport)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.readline()


async def test_renewal_at_two_thirds_over_mtls_leaves_open_connections_alone(
    control_plane: ControlPlaneProcess, tmp_path: Path
) -> None:
    cp = control_plane
    cert_dir = tmp_path / "web"
    async with asyncio.timeout(WAIT_S):
        await identity_for(cp, cert_dir, ttl_s=60).ensure()  # 60 s: the CA's shortest leaf
    key_pem = (cert_dir / "key.pem").read_bytes()
    old = leaf_in(cert_dir)
    # The sidecar restarts without its token: renewing is up to the mTLS port alone. Its
    # clock runs 30 s ahead, so 2/3 of the lifetime comes ~10 s from now, not ~40 s.
    clock = SkewedClock(dt.timedelta(seconds=30))
    identity = identity_for(cp, cert_dir, token=False, ttl_s=60, clock=clock, seed=5)
    first = await identity.ensure()
    assert first.serial == format(old.serial_number, "x")
    planned = identity.renew_at
    lifetime = old.not_valid_after_utc - old.not_valid_before_utc
    share = (planned - old.not_valid_before_utc) / lifetime
    assert schedule.RENEW_AT - schedule.JITTER <= share <= schedule.RENEW_AT + schedule.JITTER
    seen: list[tuple[dt.datetime, Contexts]] = []
    identity.subscribe(lambda ctx: seen.append((clock.now(), ctx)))

    server = EchoServer(identity)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    writers: list[asyncio.StreamWriter] = []
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve(sock))
        renewing = tg.create_task(identity.run())
        try:
            reader_a, writer_a = await asyncio.open_connection("127.0.0.1", port, ssl=first.client)
            writers.append(writer_a)
            assert await echo(reader_a, writer_a, b"before\n") == b"before\n"

            await until(lambda: identity.contexts.serial != first.serial, "renewal", 20.0)
            renewed_at, renewed = seen[-1]
            assert planned <= renewed_at < planned + dt.timedelta(seconds=5)
            assert identity.last_renewal_via == "mtls" and identity.renewals == 1

            # The open connection keeps its old certificates and keeps working.
            assert await echo(reader_a, writer_a, b"after\n") == b"after\n"
            der = writer_a.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert serial_of(der) == first.serial
            # A new connection uses the new pair on both sides.
            reader_b, writer_b = await asyncio.open_connection(
                "127.0.0.1", port, ssl=identity.contexts.client
            )
            writers.append(writer_b)
            assert await echo(reader_b, writer_b, b"new\n") == b"new\n"
            der = writer_b.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert serial_of(der) == renewed.serial
            assert server.client_serials == [first.serial, renewed.serial]
        finally:
            for w in writers:
                w.close()
            for t in server.transports:
                t.close()
            serving.cancel()
            renewing.cancel()
            sock.close()

    new = leaf_in(cert_dir)
    assert format(new.serial_number, "x") == renewed.serial
    assert pki.ttl_of(new) == dt.timedelta(seconds=60)
    assert pki.spiffe_id_of(new) == SID
    assert (cert_dir / "key.pem").read_bytes() == key_pem  # the same key, a new certificate
    assert mode(cert_dir) == 0o700 and mode(cert_dir / "key.pem") == 0o600


# ---- trust bundle ---------------------------------------------------------------------------------


def client_row(cp: ControlPlaneProcess, client_id: str) -> dict[str, Any] | None:
    rows = cp.call("GET", "/v1/ca").data["clients"]
    return next((r for r in rows if r["client_id"] == client_id), None)


async def row_until(
    cp: ControlPlaneProcess, client_id: str, want: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        while True:
            row = await asyncio.to_thread(client_row, cp, client_id)
            if row is not None and want(row):
                return row
            await asyncio.sleep(0.1)
    raise AssertionError(what)  # unreachable: the timeout raises


async def test_root_rotation_reaches_a_running_sidecar_through_discovery(
    control_plane: ControlPlaneProcess, tmp_path: Path
) -> None:
    cp = control_plane
    cert_dir = tmp_path / "web"
    identity = identity_for(cp, cert_dir)
    async with asyncio.timeout(WAIT_S):
        start = await identity.ensure()
    changes: list[Contexts] = []
    identity.subscribe(changes.append)
    discovery = Discovery(
        identity,
        control_plane_mtls=cp.info["grpc_mtls"],
        client_id="web-1",
        cache_path=cert_dir / "discovery-cache.json",
        clock=SystemClock(),
        rng=random.Random(2),
    )
    rotate = ("rotate", "root", "--dir", cp.data_dir / "ca")
    mesh = ("--control-plane", cp.base, "--token-file", cp.token_file)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(identity.run()), tg.create_task(discovery.run())]
        try:
            async with asyncio.timeout(WAIT_S):
                await discovery.first_snapshot.wait()
            await row_until(cp, "web-1", lambda r: r["bundle_current"], "first report")

            # add: a second root. The control plane pushes the bundle on the watch stream.
            added = await asyncio.to_thread(certs_cli, *rotate, "--step", "add")
            assert added.returncode == 0, added.stderr
            reloaded = await asyncio.to_thread(cp.call, "POST", "/v1/ca/reload")
            # The control plane also polls its CA files, so it may have taken the new root
            # itself a moment before this call ("changed": false): either way it serves it.
            assert reloaded.status == 200, reloaded
            two_roots = reloaded.data["bundle_fingerprint"]
            assert two_roots != start.bundle_fingerprint
            await until(lambda: identity.contexts.bundle_fingerprint == two_roots, "new bundle")
            assert changes[-1].bundle_fingerprint == two_roots
            assert changes[-1].serial == start.serial  # same leaf, new trust
            bundle = pki.load_certs((cert_dir / "bundle.pem").read_bytes(), source="bundle.pem")
            assert len(bundle) == 2
            # The report names the new bundle; the watch, reopened, is connected again.
            row = await row_until(
                cp,
                "web-1",
                lambda r: r["bundle_fingerprint"] == two_roots and r["connected"],
                "report",
            )
            assert row["bundle_current"] is True
            assert discovery.reports >= 1

            # promote: the certs CLI asks the mesh first; our report is what lets it through.
            promoted = await asyncio.to_thread(certs_cli, *rotate, "--step", "promote", *mesh)
            assert promoted.returncode == 0, promoted.stderr

            # retire before our leaf moved to the new root (forced): the sidecar notices its
            # chain no longer verifies and renews at once, with the join token since the
            # mTLS port no longer trusts its old certificate.
            retired = await asyncio.to_thread(
                certs_cli, *rotate, "--step", "retire", "--force", *mesh
            )
            assert retired.returncode == 0, retired.stderr
            new_root = pki.load_certs(
                (cp.data_dir / "ca" / "root-cert.pem").read_bytes(), source="root"
            )
            await until(
                lambda: (
                    pki.anchor_of(pki.load_certs(identity.leaf_chain_pem, source="l"), new_root)
                    is not None
                ),
                "a leaf under the new root",
            )
            assert len(pki.load_certs(identity.bundle_pem, source="bundle")) == 1
            assert identity.last_renewal_via == "join-token"
            row = await row_until(
                cp,
                "web-1",
                lambda r: r["leaf_under_current_root"] and r["bundle_current"] and r["connected"],
                "the renewed leaf reported",
            )
            assert row["leaf_serial"] == identity.contexts.serial
        finally:
            for t in tasks:
                t.cancel()
