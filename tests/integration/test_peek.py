"""Peeking at an app connection (sidecar/peek.py) on real sockets under uvloop, as the
outbound sidecar does before it picks a handler: whatever the peek read reaches the
handler that takes over afterwards (here the L4 relay to a real server), in order and
complete, whether the peek decided, timed out, or saw EOF; a reset while peeking is
reported, not raised."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import uvloop

from sidecar.detect import Detected, classify
from sidecar.peek import Peeked, peek
from sidecar.relay import PlainSide, Relay

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return uvloop.run(bounded())


class Upstream:
    """A real TCP server that keeps what one connection sent and echoes it back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
            self.eof.set()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def accepted_side() -> tuple[asyncio.Server, int, asyncio.Queue[PlainSide]]:
    """A listener whose connections are PlainSides, paused, as the outbound accepts them."""
    sides: asyncio.Queue[PlainSide] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def factory() -> PlainSide:
        side = PlainSide()
        loop.call_soon(sides.put_nowait, side)
        return side

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), sides


async def relay_to(side: PlainSide, port: int) -> Relay:
    """Hand the side to the L4 relay towards ``port``, as the outbound does for TCP."""
    loop = asyncio.get_running_loop()
    _, up = await loop.create_connection(PlainSide, "127.0.0.1", port)
    relay = Relay(side, up, idle_timeout_s=None)
    relay.start()
    return relay


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()  # until EOF


def test_bytes_peeked_and_bytes_sent_after_the_decision_all_reach_the_relay() -> None:
    tail = os.urandom(3 * 1024 * 1024)  # arrives while the peek holds the side, and after

    async def scenario() -> tuple[Peeked, bytes, bytes]:
        server, port, sides = await accepted_side()
        up = Upstream()
        up_port = await up.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        side = await sides.get()
        writer.write(b"*1\r\n")  # RESP: decided TCP on the first byte
        writer.write(tail)
        found = await peek(side, classify, 5.0)
        await relay_to(side, up_port)
        echoed = asyncio.create_task(read_all(reader))
        await writer.drain()
        writer.write_eof()
        await up.eof.wait()
        out = await echoed
        writer.close()
        server.close()
        up.close()
        return found, bytes(up.received), out

    found, received, echoed = run(scenario)
    assert found.found is Detected.TCP and not found.timed_out
    assert found.data.startswith(b"*1\r\n")
    assert received == b"*1\r\n" + tail  # nothing lost, nothing reordered
    assert echoed == received


def test_a_request_line_split_over_writes_is_http1_and_arrives_whole() -> None:
    request = b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n"

    async def scenario() -> tuple[Peeked, bytes]:
        server, port, sides = await accepted_side()
        up = Upstream()
        up_port = await up.start()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        side = await sides.get()
        looking = asyncio.create_task(peek(side, classify, 5.0))
        for piece in (request[:3], request[3:9], request[9:22], request[22:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        found = await looking
        await relay_to(side, up_port)
        writer.write_eof()
        await up.eof.wait()
        writer.close()
        server.close()
        up.close()
        return found, bytes(up.received)

    found, received = run(scenario)
    assert found.found is Detected.HTTP1
    assert received == request


def test_silence_times_out_and_what_comes_later_still_arrives() -> None:
    async def scenario() -> tuple[Peeked, bytes, bytes]:
        server, port, sides = await accepted_side()
        up = Upstream()
        up_port = await up.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        side = await sides.get()
        found = await peek(side, classify, 0.1)
        await relay_to(side, up_port)
        writer.write(b"late hello\n")
        writer.write_eof()
        await up.eof.wait()
        out = await read_all(reader)
        writer.close()
        server.close()
        up.close()
        return found, bytes(up.received), out

    found, received, echoed = run(scenario)
    assert found.timed_out and found.found is Detected.NEED_MORE and found.data == b""
    # asyncio may fire a timer up to its clock resolution early: 0.0999… is on time
    assert 0.095 <= found.seconds < 2.0
    assert received == echoed == b"late hello\n"


def test_eof_with_undecided_data_is_kept_and_the_half_close_crosses() -> None:
    async def scenario() -> tuple[Peeked, bytes, bytes]:
        server, port, sides = await accepted_side()
        up = Upstream()
        up_port = await up.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET")  # could still be HTTP: only EOF ends the wait
        writer.write_eof()
        side = await sides.get()
        found = await peek(side, classify, 5.0)
        await relay_to(side, up_port)
        await up.eof.wait()
        out = await read_all(reader)  # the echo, then EOF: our half stayed open
        writer.close()
        server.close()
        up.close()
        return found, bytes(up.received), out

    found, received, echoed = run(scenario)
    assert found.eof and not found.timed_out and found.found is Detected.NEED_MORE
    assert received == echoed == b"GET"


def test_a_reset_while_peeking_is_reported() -> None:
    async def scenario() -> Peeked:
        server, port, sides = await accepted_side()
        sock = socket.create_connection(("127.0.0.1", port))
        side = await sides.get()
        looking = asyncio.create_task(peek(side, classify, 5.0))
        await asyncio.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        found = await looking
        await side.closed
        server.close()
        return found

    found = run(scenario)
    assert found.lost and not found.timed_out
