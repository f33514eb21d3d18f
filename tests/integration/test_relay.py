"""The sidecar data path end to end on 127.0.0.1 under uvloop, the real two-hop chain:

    client → [outbound: PlainSide ↔ TlsLeg client] → mTLS → [inbound: TlsLeg server ↔
    PlainSide] → server

with certificates from the real `meshlet certs` CLI. What an app would notice: every byte
arrives, half-close works both ways, a reset stays a reset, a server that stops reading
slows the client down instead of filling the sidecars' memory, idle connections close,
and a plaintext client never reaches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from certs_helpers import cli_init, cli_issue

from sidecar import tls
from sidecar.relay import PlainSide, Relay, Side
from sidecar.tlsleg import TlsHandshakeError, TlsLeg

pytestmark = pytest.mark.integration

TD = "mesh.test"
MiB = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    bundle: bytes
    web: Path
    orders: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("relay")
    ca = cli_init(base / "ca", TD)
    cli_issue(ca, base / "web", f"spiffe://{TD}/ns/shop/sa/web")
    cli_issue(ca, base / "orders", f"spiffe://{TD}/ns/shop/sa/orders")
    return Pki((ca / "bundle.pem").read_bytes(), base / "web", base / "orders")


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run one scenario on uvloop, as the sidecar does, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return uvloop.run(bounded())


@dataclass
class Chain:
    port: int  # the outbound listener: where the client connects
    inbound_port: int
    relays: list[Relay] = field(default_factory=list)
    sides: list[Side] = field(default_factory=list)
    refused: list[TlsHandshakeError] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def buffered(self) -> int:
        """Bytes the sidecars hold in write buffers right now, over every side."""
        return sum(s.get_write_buffer_size() for s in self.sides)

    def reasons(self) -> list[str | None]:
        return [r.reason for r in self.relays]

    async def all_done(self, count: int = 2) -> None:
        while len(self.relays) < count:
            await asyncio.sleep(0.01)
        await asyncio.gather(*(r.done for r in self.relays))

    async def close(self) -> None:
        for r in self.relays:
            r.abort()
        for s in self.servers:
            s.close()
        for t in self.tasks:
            t.cancel()


async def start_chain(certs: Pki, backend_port: int, *, idle_timeout_s: float = 300.0) -> Chain:
    """Both sidecars' listeners, wired the way the orchestration wires them."""
    loop = asyncio.get_running_loop()
    server_ctx = tls.server_context(
        certs.orders / "cert.pem", certs.orders / "key.pem", certs.bundle
    )
    client_ctx = tls.client_context(certs.web / "cert.pem", certs.web / "key.pem", certs.bundle)
    chain = Chain(port=0, inbound_port=0)

    def spawn(coro: Awaitable[None]) -> None:
        task = loop.create_task(coro)  # type: ignore[arg-type]
        chain.tasks.add(task)
        task.add_done_callback(chain.tasks.discard)

    def relay(a: Side, b: Side) -> None:
        chain.sides += [a, b]
        r = Relay(a, b, idle_timeout_s=idle_timeout_s)
        chain.relays.append(r)
        r.start()

    async def inbound(leg: TlsLeg) -> None:
        try:
            await leg.handshake
        except TlsHandshakeError as e:
            chain.refused.append(e)
            return
        _, app = await loop.create_connection(PlainSide, "127.0.0.1", backend_port)
        relay(leg, app)

    async def outbound(side: PlainSide) -> None:
        _, leg = await loop.create_connection(
            lambda: TlsLeg(client_ctx, server_side=False), "127.0.0.1", chain.inbound_port
        )
        await leg.handshake
        relay(side, leg)

    def accept_inbound() -> TlsLeg:
        leg = TlsLeg(server_ctx, server_side=True)
        spawn(inbound(leg))
        return leg

    def accept_outbound() -> PlainSide:
        side = PlainSide()
        spawn(outbound(side))
        return side

    inb = await loop.create_server(accept_inbound, "127.0.0.1", 0)
    out = await loop.create_server(accept_outbound, "127.0.0.1", 0)
    chain.servers += [inb, out]
    chain.inbound_port = inb.sockets[0].getsockname()[1]
    chain.port = out.sockets[0].getsockname()[1]
    return chain


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def backend(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, limit=4 * MiB)
    return server, server.sockets[0].getsockname()[1]


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes where a shifted, dropped or repeated chunk shows."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(block + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:size])


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a crashing or impatient peer does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_a_gibibyte_crosses_the_chain_intact(certs: Pki) -> None:
    total = 1 << 30
    block = os.urandom(MiB + 7)  # odd size: never aligned with reads or TLS records

    async def scenario() -> None:
        seen: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            h, n = hashlib.sha256(), 0
            while data := await r.read(4 * MiB):
                h.update(data)
                n += len(data)
            seen.set_result((n, h.hexdigest()))
            w.close()

        server, port = await backend(sink)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        h = hashlib.sha256()
        view = memoryview(block)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            piece = view[: min(len(block), total - sent)]
            writer.write(piece)
            h.update(piece)
            sent += len(piece)
            await writer.drain()
        writer.write_eof()
        n, digest = await seen
        elapsed = time.perf_counter() - started
        assert await reader.read() == b""
        assert n == total and digest == h.hexdigest()
        print(f"\n1 GiB through two mTLS hops, one process: {total / elapsed / 1e6:.0f} MB/s")
        assert elapsed < 25
        await chain.all_done()
        assert chain.reasons() == ["eof", "eof"]
        assert [r.stats.bytes_a_to_b for r in chain.relays] == [total, total]
        await chain.close()
        server.close()

    run(scenario, timeout=40)


def test_many_small_messages_echo_back_in_order(certs: Pki) -> None:
    async def scenario() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
            w.close()

        server, port = await backend(echo)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        rtts = []
        for i in range(2000):
            msg = pattern(1 + (i * 37) % 700, seed=i)
            t0 = time.perf_counter()
            writer.write(msg)
            assert await reader.readexactly(len(msg)) == msg
            rtts.append(time.perf_counter() - t0)
        rtts.sort()
        p99 = rtts[int(len(rtts) * 0.99)]
        print(
            f"\nsmall round trips: p50 {rtts[len(rtts) // 2] * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs"
        )
        assert p99 < 0.02, "no Nagle/delayed-ACK stalls (TCP_NODELAY on every hop)"
        writer.close()
        await chain.all_done()
        await chain.close()
        server.close()

    run(scenario)


def test_client_half_closes_then_reads_the_whole_response(certs: Pki) -> None:
    response = pattern(MiB, seed=1)

    async def scenario() -> None:
        async def server_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            request = await r.read()  # up to the client's EOF
            assert request == b"GET /report\n"
            w.write(response)
            await w.drain()
            w.close()

        server, port = await backend(server_side)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        writer.write(b"GET /report\n")
        writer.write_eof()  # shutdown(SHUT_WR)
        assert await reader.read() == response  # all of it, then EOF
        writer.close()
        await chain.all_done()
        assert chain.reasons() == ["eof", "eof"]
        await chain.close()
        server.close()

    run(scenario)


def test_server_half_closes_first_and_still_receives_the_upload(certs: Pki) -> None:
    greeting, upload = pattern(MiB, seed=2), pattern(MiB, seed=3)

    async def scenario() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def server_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(greeting)
            w.write_eof()  # the server is done talking first
            got.set_result(await r.read())
            w.close()

        server, port = await backend(server_side)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        assert await reader.read() == greeting  # then EOF, while our direction is open
        writer.write(upload)
        writer.write_eof()
        assert await got == upload
        writer.close()
        await chain.all_done()
        assert chain.reasons() == ["eof", "eof"]
        await chain.close()
        server.close()

    run(scenario)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_half_close_while_the_other_direction_is_still_streaming(certs: Pki, closer: str) -> None:
    """EOF one way while 8 MiB are in flight the other way: the TLS leg sends close_notify
    with records still arriving, and none of them may be lost."""
    stream = pattern(8 * MiB, seed=5)

    async def scenario() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def server_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if closer == "server":
                w.write(b"bye\n")
                w.write_eof()  # at once, while the client is uploading
                got.set_result(await r.read())
            else:
                w.write(stream)  # streaming, while the client half-closes
                await w.drain()
                got.set_result(await r.read())
                w.write_eof()
            w.close()

        server, port = await backend(server_side)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port, limit=4 * MiB)
        if closer == "server":
            writer.write(stream)
            writer.write_eof()
            assert await reader.read() == b"bye\n"
            assert await got == stream
        else:
            writer.write(b"req\n")
            writer.write_eof()
            assert await reader.read() == stream
            assert await got == b"req\n"
        writer.close()
        await chain.all_done()
        assert chain.reasons() == ["eof", "eof"]
        await chain.close()
        server.close()

    run(scenario)


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_reset_on_one_end_reaches_the_other_as_a_reset(certs: Pki, who: str) -> None:
    async def scenario() -> None:
        server_end: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def server_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.readexactly(5) == b"ping\n"
            w.write(b"pong\n")
            server_end.set_result((r, w))
            await asyncio.sleep(30)

        server, port = await backend(server_side)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        writer.write(b"ping\n")
        assert await reader.readexactly(5) == b"pong\n"
        s_reader, s_writer = await server_end
        resetter, victim = (writer, s_reader) if who == "client" else (s_writer, reader)
        started = time.monotonic()
        rst(resetter)
        with pytest.raises(ConnectionResetError):
            await victim.read(100)
        assert time.monotonic() - started < 1.0
        await chain.all_done()
        assert chain.reasons() == ["reset", "reset"]
        await chain.close()
        server.close()

    run(scenario)


def test_a_server_that_stops_reading_slows_the_client_not_the_sidecars_memory(
    certs: Pki,
) -> None:
    total = 100 * MiB
    chunk = pattern(256 * 1024, seed=4)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        go = asyncio.Event()
        received: asyncio.Future[int] = loop.create_future()

        async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await go.wait()  # not reading: the kernel buffers fill, then the sidecars'
            n = 0
            while data := await r.read(MiB):
                n += len(data)
            received.set_result(n)
            w.close()

        server, port = await backend(slow)
        chain = await start_chain(certs, port)
        sock = socket.create_connection(("127.0.0.1", chain.port))
        sock.setblocking(False)
        sent, peak, stalled_at = 0, 0, None
        while sent < total:
            try:
                sent += sock.send(chunk[: min(len(chunk), total - sent)])
                stalled_at = None
            except BlockingIOError:
                stalled_at = stalled_at or loop.time()
                if loop.time() - stalled_at > 1.0:
                    break  # the client has been blocked for a second: backpressure reached it
                await asyncio.sleep(0.005)
            peak = max(peak, chain.buffered())
            await asyncio.sleep(0)
        blocked_at = sent
        print(f"\nclient blocked after {blocked_at / MiB:.1f} MiB; sidecars held ≤ {peak} B")
        assert blocked_at < total, "the client's send never blocked"
        assert peak < 4 * MiB, f"the sidecars buffered {peak} bytes"
        assert sum(r.stats.pauses_a for r in chain.relays) > 0
        go.set()
        while sent < total:  # the server reads again: the rest flows
            await loop.sock_sendall(sock, chunk[: min(len(chunk), total - sent)])
            sent += min(len(chunk), total - sent)
            peak = max(peak, chain.buffered())
        sock.shutdown(socket.SHUT_WR)
        assert await received == total
        assert peak < 4 * MiB
        sock.close()
        await chain.close()
        server.close()

    run(scenario)


def test_an_idle_connection_is_closed_at_both_ends(certs: Pki) -> None:
    async def scenario() -> None:
        server_saw: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def server_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readexactly(3))
            server_saw.set_result(await r.read())  # EOF when the sidecar gives up
            w.close()

        server, port = await backend(server_side)
        chain = await start_chain(certs, port, idle_timeout_s=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        writer.write(b"hi\n")
        assert await reader.readexactly(3) == b"hi\n"
        started = time.monotonic()
        assert await reader.read() == b""  # the client sees the connection end
        assert await server_saw == b""  # and so does the server
        assert 0.4 < time.monotonic() - started < 2.0
        await chain.all_done()
        assert "idle" in chain.reasons()
        await chain.close()
        server.close()

    run(scenario)


def test_traffic_keeps_a_connection_open_past_the_idle_timeout(certs: Pki) -> None:
    async def scenario() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(100):
                w.write(data)
            w.close()

        server, port = await backend(echo)
        chain = await start_chain(certs, port, idle_timeout_s=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
        for _ in range(8):  # 1.2 s in all, never 0.3 s quiet
            writer.write(b"tick\n")
            assert await reader.readexactly(5) == b"tick\n"
            await asyncio.sleep(0.15)
        assert not any(r.done.done() for r in chain.relays)
        writer.close()
        await chain.close()
        server.close()

    run(scenario)


@pytest.mark.parametrize("greeting", [b"hello\n", b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"])
def test_a_plaintext_client_at_the_inbound_port_never_reaches_the_app(
    certs: Pki, greeting: bytes
) -> None:
    async def scenario() -> None:
        connections: list[Any] = []

        async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            connections.append(await r.read())

        server, port = await backend(app)
        chain = await start_chain(certs, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.inbound_port)
        writer.write(greeting)
        with contextlib.suppress(ConnectionResetError):  # closed without a word, or reset
            assert await reader.read() == b""
        while not chain.refused:
            await asyncio.sleep(0.01)
        assert chain.refused[0].reason == "plaintext"
        await asyncio.sleep(0.1)
        assert connections == [] and chain.relays == []
        await chain.close()
        server.close()

    run(scenario)
