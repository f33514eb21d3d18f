"""The L7 connection pool against real loopback sockets: reuse, a peer that closes an
idle connection, a peer that speaks unasked, the idle reaper and the idle cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.l7_pool import Pool
from sidecar.relay import PlainSide

pytestmark = pytest.mark.integration


class Server:
    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def connect(self, port: int) -> PlainSide:
        loop = asyncio.get_running_loop()
        _, side = await loop.create_connection(PlainSide, "127.0.0.1", port)
        return side

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, int]]:
    s = Server()
    port = await s.start()
    try:
        yield s, port
    finally:
        s.close()


async def until(predicate: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_released_connection_is_handed_out_again(server: tuple[Server, int]) -> None:
    srv, port = server
    pool = Pool()
    a = await pool.acquire("k", lambda: srv.connect(port))
    pool.release(a, reusable=True)
    b = await pool.acquire("k", lambda: srv.connect(port))
    assert b is a and pool.opened == 1
    pool.release(b, reusable=False)  # not reusable: closed, and the next one is new
    c = await pool.acquire("k", lambda: srv.connect(port))
    assert c is not a and pool.opened == 2
    pool.abort_all()


async def test_an_idle_connection_the_peer_closed_is_never_handed_out(
    server: tuple[Server, int],
) -> None:
    srv, port = server
    pool = Pool()
    a = await pool.acquire("k", lambda: srv.connect(port))
    pool.release(a, reusable=True)
    await until(lambda: len(srv.writers) == 1)
    srv.writers[0].close()  # the peer's idle timeout, say
    await until(lambda: pool.idle_count("k") == 0)
    assert pool.stale == 1
    b = await pool.acquire("k", lambda: srv.connect(port))
    assert b is not a and pool.opened == 2
    pool.abort_all()


async def test_an_idle_connection_that_receives_bytes_is_dropped(
    server: tuple[Server, int],
) -> None:
    srv, port = server
    pool = Pool()
    a = await pool.acquire("k", lambda: srv.connect(port))
    pool.release(a, reusable=True)
    await until(lambda: len(srv.writers) == 1)
    srv.writers[0].write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # nobody asked
    await until(lambda: pool.idle_count("k") == 0)
    await until(lambda: len(pool) == 0)  # and it was closed
    pool.abort_all()


async def test_idle_connections_are_reaped_and_capped(server: tuple[Server, int]) -> None:
    srv, port = server
    pool = Pool(idle_timeout_s=0.3, max_idle=2)
    conns = [await pool.acquire("k", lambda: srv.connect(port)) for _ in range(3)]
    for conn in conns:
        pool.release(conn, reusable=True)
    assert pool.idle_count("k") == 2  # the third was closed at once
    await until(lambda: len(pool) == 2)
    await until(lambda: pool.idle_count() == 0 and len(pool) == 0, timeout=3.0)
    pool.abort_all()
