"""One mTLS hop on 127.0.0.1 under uvloop: a client TlsLeg against a server TlsLeg, with
certificates from the real `meshlet certs` CLI. Every failed handshake names a reason
both sides agree on, and half-close works at the TLS level."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from certs_helpers import cli_init, cli_issue
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certs import cadir, pki
from certs.spiffe import parse
from sidecar import tls
from sidecar.tlsleg import TlsHandshakeError, TlsLeg

pytestmark = pytest.mark.integration

TD = "mesh.test"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    bundle: bytes
    web: Path  # directories with cert.pem + key.pem
    orders: Path
    stranger: Path  # a valid SVID from another CA (same trust domain name)
    expired: Path  # an SVID from our CA that expired yesterday

    def client(self, who: Path | None = None, **kw: Any) -> ssl.SSLContext:
        d = who or self.web
        return tls.client_context(d / "cert.pem", d / "key.pem", self.bundle, **kw)

    def server(self, who: Path | None = None, **kw: Any) -> ssl.SSLContext:
        d = who or self.orders
        return tls.server_context(d / "cert.pem", d / "key.pem", self.bundle, **kw)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("tlsleg")
    ca = cli_init(base / "ca", TD)
    cli_issue(ca, base / "web", WEB)
    cli_issue(ca, base / "orders", ORDERS)
    other = cli_init(base / "other-ca", TD)
    cli_issue(other, base / "stranger", WEB)
    state = cadir.load(ca)
    key = pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(),
        spiffe_id=parse(WEB),
        issuer=state.issuer,
        issuer_key=state.issuer_key,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
        ttl=dt.timedelta(hours=24),
    ).cert
    (base / "expired").mkdir()
    (base / "expired" / "cert.pem").write_bytes(pki.dump_certs([leaf, state.issuer]))
    (base / "expired" / "key.pem").write_bytes(pki.dump_key(key))
    return Pki(
        bundle=(ca / "bundle.pem").read_bytes(),
        web=base / "web",
        orders=base / "orders",
        stranger=base / "stranger",
        expired=base / "expired",
    )


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Run one scenario on uvloop, as the sidecar does, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return uvloop.run(bounded())


class Recorder:
    """A relay stand-in: records what a leg delivers."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def on_data(self, side: object, data: bytes) -> None:
        self.data += data

    def on_eof(self, side: object) -> None:
        self.eof.set_result(None)

    def on_closed(self, side: object, exc: BaseException | None) -> None:
        self.closed.set_result(exc)

    def on_pause_writing(self, side: object) -> None:
        pass

    def on_resume_writing(self, side: object) -> None:
        pass

    async def wait_for(self, n: int) -> bytes:
        while len(self.data) < n:
            await asyncio.sleep(0.005)
        return bytes(self.data)


async def serve(ctx: ssl.SSLContext, **kw: Any) -> tuple[asyncio.Server, int, list[TlsLeg]]:
    legs: list[TlsLeg] = []

    def factory() -> TlsLeg:
        legs.append(TlsLeg(ctx, server_side=True, **kw))
        return legs[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], legs


async def connect(ctx: ssl.SSLContext, port: int, **kw: Any) -> TlsLeg:
    _, leg = await asyncio.get_running_loop().create_connection(
        lambda: TlsLeg(ctx, server_side=False, **kw), "127.0.0.1", port
    )
    return leg


async def failure(fut: asyncio.Future[None]) -> TlsHandshakeError:
    with pytest.raises(TlsHandshakeError) as info:
        await fut
    return info.value


def test_handshake_is_tls13_with_the_peers_certificate(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(), port)
        await client.handshake
        await legs[0].handshake
        assert client.version() == legs[0].version() == "TLSv1.3"
        assert client.cipher() is not None and client.cipher()[0].startswith("TLS_")  # type: ignore[index]
        orders = x509.load_pem_x509_certificates((certs.orders / "cert.pem").read_bytes())[0]
        web = x509.load_pem_x509_certificates((certs.web / "cert.pem").read_bytes())[0]
        assert client.peer_certificate() == orders.public_bytes(Encoding.DER)
        assert legs[0].peer_certificate() == web.public_bytes(Encoding.DER)
        client.abort()
        server.close()

    run(scenario)


def test_alpn_is_negotiated_when_both_offer_it(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, _ = await serve(certs.server(alpn=["h2", "http/1.1"]))
        client = await connect(certs.client(alpn=["http/1.1"]), port)
        await client.handshake
        assert client.alpn_protocol() == "http/1.1"
        client.abort()
        server.close()

    run(scenario)


def test_a_client_certificate_from_another_ca_is_refused_and_both_sides_know(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(certs.stranger), port)
        client_err = await failure(client.handshake)
        while not legs:
            await asyncio.sleep(0.005)
        server_err = await failure(legs[0].handshake)
        assert server_err.reason == "unknown_ca"
        assert client_err.reason == "unknown_ca"
        assert f"127.0.0.1:{port}" in str(client_err)  # the message names the peer
        assert client.peer_certificate() is None
        server.close()

    run(scenario)


def test_a_server_certificate_from_another_ca_is_refused(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server(certs.stranger))
        client = await connect(certs.client(), port)
        assert (await failure(client.handshake)).reason == "unknown_ca"
        assert (await failure(legs[0].handshake)).reason == "unknown_ca"
        server.close()

    run(scenario)


def test_an_expired_client_certificate_is_refused_as_expired(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(certs.expired), port)
        assert (await failure(legs[0].handshake)).reason == "expired"
        assert (await failure(client.handshake)).reason == "expired"
        server.close()

    run(scenario)


def test_an_expired_server_certificate_is_refused_as_expired(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, _ = await serve(certs.server(certs.expired))
        client = await connect(certs.client(), port)
        assert (await failure(client.handshake)).reason == "expired"
        server.close()

    run(scenario)


def test_a_client_without_a_certificate_is_refused(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.minimum_version = ssl.TLSVersion.TLSv1_3
        bare.check_hostname = False
        bare.load_verify_locations(cadata=certs.bundle.decode())
        client = await connect(bare, port)
        assert (await failure(legs[0].handshake)).reason == "no_certificate"
        assert (await failure(client.handshake)).reason == "no_certificate"
        server.close()

    run(scenario)


def test_a_tls12_client_is_refused_as_protocol_version(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        old = certs.client()
        old.minimum_version = ssl.TLSVersion.TLSv1_2
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        client = await connect(old, port)
        assert (await failure(legs[0].handshake)).reason == "protocol_version"
        assert (await failure(client.handshake)).reason == "protocol_version"
        server.close()

    run(scenario)


@pytest.mark.parametrize("greeting", [b"hello\n", b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"])
def test_a_plaintext_client_fails_fast_as_plaintext(certs: Pki, greeting: bytes) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setblocking(False)
            started = time.monotonic()
            await loop.sock_sendall(raw, greeting)
            while not legs:
                await asyncio.sleep(0.005)
            err = await failure(legs[0].handshake)
            assert time.monotonic() - started < 0.5
            assert err.reason == "plaintext"
            assert f"127.0.0.1:{raw.getsockname()[1]}" in str(err)
            with contextlib.suppress(ConnectionResetError):  # closed, nothing sent back
                assert await loop.sock_recv(raw, 100) == b""
        server.close()

    run(scenario)


def test_a_client_leg_to_a_plaintext_server_fails_as_plaintext(certs: Pki) -> None:
    async def scenario() -> None:
        async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await r.read(1000)
            w.close()

        server = await asyncio.start_server(banner, "127.0.0.1", 0)
        client = await connect(certs.client(), server.sockets[0].getsockname()[1])
        assert (await failure(client.handshake)).reason == "plaintext"
        server.close()

    run(scenario)


def test_a_silent_client_times_out(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server(), handshake_timeout_s=0.3)
        with socket.create_connection(("127.0.0.1", port)):
            started = time.monotonic()
            while not legs:
                await asyncio.sleep(0.01)
            err = await failure(legs[0].handshake)
            assert err.reason == "timeout"
            assert 0.25 < time.monotonic() - started < 2.0
        server.close()

    run(scenario)


def test_closing_a_leg_during_the_handshake_fails_it_as_closed(certs: Pki) -> None:
    async def scenario() -> None:
        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()  # accepts, never answers the ClientHello

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        client = await connect(certs.client(), server.sockets[0].getsockname()[1])
        client.close()
        assert (await failure(client.handshake)).reason == "closed"
        await client.closed
        server.close()

    run(scenario)


def test_a_client_that_disconnects_mid_handshake_is_eof(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
            raw.shutdown(socket.SHUT_WR)
            while not legs:
                await asyncio.sleep(0.01)
            assert (await failure(legs[0].handshake)).reason == "eof"
        server.close()

    run(scenario)


def test_half_close_each_way_at_the_tls_level(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(), port)
        await client.handshake
        await legs[0].handshake
        srv, cli = Recorder(), Recorder()
        legs[0].attach(srv)  # type: ignore[arg-type]
        client.attach(cli)  # type: ignore[arg-type]
        legs[0].resume_reading()
        client.resume_reading()

        client.write(b"request")
        client.write_eof()  # close_notify from the client...
        await srv.eof
        assert bytes(srv.data) == b"request"
        response = bytes(range(256)) * 4096  # ...the server can still answer, 1 MiB
        legs[0].write(response)
        assert await cli.wait_for(len(response)) == response
        assert not cli.eof.done()
        legs[0].write_eof()
        await cli.eof
        assert await srv.closed is None and await cli.closed is None  # both ends done, cleanly
        server.close()

    run(scenario)


def test_data_sent_right_after_the_handshake_is_kept_until_attach(certs: Pki) -> None:
    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(), port)
        await client.handshake
        client.write(b"early bytes from the client")
        await legs[0].handshake
        await asyncio.sleep(0.05)
        rec = Recorder()
        legs[0].attach(rec)  # type: ignore[arg-type]
        legs[0].resume_reading()
        assert await rec.wait_for(27) == b"early bytes from the client"
        client.abort()
        assert isinstance(await rec.closed, ConnectionResetError)
        server.close()

    run(scenario)


def test_eof_without_close_notify_is_a_reset_not_an_eof(certs: Pki) -> None:
    """A TCP FIN without close_notify may be a truncation: the relay must not pass it on as
    a clean end of the stream."""

    async def scenario() -> None:
        server, port, legs = await serve(certs.server())
        client = await connect(certs.client(), port)
        await client.handshake
        await legs[0].handshake
        rec = Recorder()
        client.attach(rec)  # type: ignore[arg-type]
        client.resume_reading()
        assert legs[0].transport is not None
        legs[0].transport.close()  # TCP close, no TLS close_notify
        exc = await rec.closed
        assert isinstance(exc, ConnectionResetError) and "close_notify" in str(exc)
        assert not rec.eof.done()
        server.close()

    run(scenario)


def test_a_held_server_handshake_completes_only_when_accepted_or_is_refused(certs: Pki) -> None:
    """The inbound decides after the handshake (identity, policy, app reachable): the
    client must see that decision, a refusal as a failed handshake, not a success."""

    async def scenario() -> None:
        server, port, legs = await serve(certs.server(), hold_until_accept=True)
        refused = await connect(certs.client(), port)
        while not legs:
            await asyncio.sleep(0.01)
        await legs[0].handshake
        await asyncio.sleep(0.2)
        assert not refused.handshake.done()  # nothing confirms it until the server decides
        legs[0].refuse()
        assert (await failure(refused.handshake)).reason == "refused"
        accepted = await connect(certs.client(), port)
        while len(legs) < 2:
            await asyncio.sleep(0.01)
        await legs[1].handshake
        legs[1].accept()
        await accepted.handshake
        assert accepted.version() == "TLSv1.3"
        accepted.close()
        server.close()

    run(scenario)
