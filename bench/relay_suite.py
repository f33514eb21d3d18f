"""Data-path figures: bulk MB/s, 100-byte ping-pong latency and new connections/s for
(a) direct TCP, (b) two plaintext relay hops, (c) the two-hop mTLS chain.

Three kinds of process on 127.0.0.1, each on uvloop: the servers (sink, echo), the
proxy (both sidecars of the chain: outbound PlainSide ↔ TlsLeg client, inbound TlsLeg
server ↔ PlainSide), and the client (this process, blocking sockets). On two cores the
proxy gets one to itself while the client and servers share the other. Proxy CPU is read
from /proc, so the figures include what each hop costs, not only how fast it went.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing as mp
import os
import socket
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.stats import percentile

MiB = 1 << 20
MODES = ("direct", "plain", "mtls")


# ---- servers (own process) --------------------------------------------------------------


class _Sink(asyncio.Protocol):
    """Counts bytes until EOF, answers with the count, closes."""

    def connection_made(self, transport: Any) -> None:
        self.t, self.n = transport, 0

    def data_received(self, data: bytes) -> None:
        self.n += len(data)

    def eof_received(self) -> bool:
        self.t.write(str(self.n).encode())
        self.t.close()
        return True


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)


def _servers_main(conn: Connection) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sink = await loop.create_server(_Sink, "127.0.0.1", 0)
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        conn.send((sink.sockets[0].getsockname()[1], echo.sockets[0].getsockname()[1]))
        await loop.run_in_executor(None, conn.recv)  # until told to stop

    uvloop.run(main())


# ---- the proxy: both sidecars of the chain (own process) --------------------------------


def _proxy_main(mode: str, certdir: str, backends: tuple[int, ...], conn: Connection) -> None:
    import uvloop

    from sidecar import tls
    from sidecar.relay import PlainSide, Relay, Side
    from sidecar.tlsleg import TlsHandshakeError, TlsLeg

    d = Path(certdir)
    bundle = (d / "bundle.pem").read_bytes()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx = tls.server_context(d / "orders.pem", d / "orders.key", bundle)
        client_ctx = tls.client_context(d / "web.pem", d / "web.key", bundle)
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = loop.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def link(first: Side, connect: Any) -> None:
            try:
                _, second = await connect()
                if isinstance(second, TlsLeg):
                    await second.handshake
                if isinstance(first, TlsLeg):
                    await first.handshake
            except (OSError, TlsHandshakeError):
                first.abort()
                return
            Relay(first, second).start()

        async def chain(backend: int) -> int:
            def accept_inbound() -> Side:
                side: Side = TlsLeg(server_ctx, server_side=True) if mode == "mtls" else PlainSide()
                spawn(link(side, lambda: loop.create_connection(PlainSide, "127.0.0.1", backend)))
                return side

            inbound = await loop.create_server(accept_inbound, "127.0.0.1", 0)  # type: ignore[arg-type]
            inport = inbound.sockets[0].getsockname()[1]

            def upstream() -> Side:
                if mode == "mtls":
                    return TlsLeg(client_ctx, server_side=False)
                return PlainSide()

            def accept_outbound() -> PlainSide:
                side = PlainSide()
                spawn(link(side, lambda: loop.create_connection(upstream, "127.0.0.1", inport)))  # type: ignore[type-var]
                return side

            outbound = await loop.create_server(accept_outbound, "127.0.0.1", 0, backlog=1024)
            return int(outbound.sockets[0].getsockname()[1])

        conn.send(tuple([await chain(b) for b in backends]))
        await loop.run_in_executor(None, conn.recv)

    uvloop.run(main())


def _write_certs(d: Path) -> None:
    from certs import pki
    from certs.spiffe import SpiffeId

    now = dt.datetime.now(dt.UTC)
    root_key, issuer_key = pki.new_key(), pki.new_key()
    root = pki.build_root(root_key, trust_domain="bench.local", now=now)
    issuer = pki.build_issuer(issuer_key, root=root, root_key=root_key, now=now)
    (d / "bundle.pem").write_bytes(pki.dump_certs([root]))
    for name in ("web", "orders"):
        key = pki.new_key()
        sid = SpiffeId.for_workload("bench.local", "bench", name)
        leaf = pki.build_leaf(
            key.public_key(), spiffe_id=sid, issuer=issuer, issuer_key=issuer_key, now=now
        )
        (d / f"{name}.pem").write_bytes(pki.dump_certs([leaf.cert, issuer]))
        (d / f"{name}.key").write_bytes(pki.dump_key(key))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the client (this process) ----------------------------------------------------------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _bulk(port: int, total: int) -> float:
    block = memoryview(os.urandom(MiB))
    with _connect(port) as s:
        t0 = time.perf_counter()
        for _ in range(total // MiB):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
        elapsed = time.perf_counter() - t0
    assert int(reply) == total, f"the sink got {reply!r} of {total} bytes"
    return elapsed


def _pingpong(port: int, rounds: int) -> list[float]:
    msg = b"x" * 100
    samples = []
    with _connect(port) as s:
        for _ in range(rounds + 200):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(s.recv(len(msg) - got))
            samples.append(time.perf_counter() - t0)
    return samples[200:]  # the first round trips warm caches and the allocator


def _connections(port: int, seconds: float, concurrency: int) -> int:
    import uvloop

    async def worker(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            await reader.readexactly(1)
            writer.close()
            await writer.wait_closed()
            n += 1
        return n

    async def main() -> int:
        deadline = time.perf_counter() + seconds
        return sum(await asyncio.gather(*(worker(deadline) for _ in range(concurrency))))

    return uvloop.run(main())


def run(quick: bool) -> list[dict[str, Any]]:
    bulk_bytes = (256 if quick else 1024) * MiB
    rounds = 3000 if quick else 20000
    conn_seconds = 2.0 if quick else 5.0
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        _write_certs(Path(tmp))
        parent, child = ctx.Pipe()
        servers = ctx.Process(target=_servers_main, args=(child,), daemon=True)
        servers.start()
        sink, echo = parent.recv()
        try:
            for mode in MODES:
                rows += _mode_rows(ctx, mode, tmp, sink, echo, bulk_bytes, rounds, conn_seconds)
        finally:
            parent.send("stop")
            servers.join(5)
    return rows


def _mode_rows(
    ctx: Any,
    mode: str,
    certdir: str,
    sink: int,
    echo: int,
    bulk_bytes: int,
    rounds: int,
    conn_seconds: float,
) -> list[dict[str, Any]]:
    proxy = None
    if mode == "direct":
        ports = (sink, echo)
    else:
        parent, child = ctx.Pipe()
        proxy = ctx.Process(
            target=_proxy_main, args=(mode, certdir, (sink, echo), child), daemon=True
        )
        proxy.start()
        ports = parent.recv()

    def cpu() -> float:
        return _cpu_s(proxy.pid) if proxy is not None else 0.0

    try:
        _bulk(ports[0], 16 * MiB)  # warm-up
        c0 = cpu()
        elapsed = _bulk(ports[0], bulk_bytes)
        bulk_cpu = cpu() - c0
        samples = _pingpong(ports[1], rounds)
        c0 = cpu()
        conns = _connections(ports[1], conn_seconds, concurrency=16)
        conn_cpu = cpu() - c0
    finally:
        if proxy is not None:
            parent.send("stop")
            proxy.join(5)
            if proxy.is_alive():
                proxy.kill()
    hops = {"direct": "client → server", "plain": "2 plain relay hops", "mtls": "2 hops, mTLS"}
    bulk = {
        "suite": "relay",
        "name": f"bulk_{mode}",
        "mb_per_s": bulk_bytes / elapsed / 1e6,
        "mib": bulk_bytes // MiB,
        "path": hops[mode],
    }
    ping = {
        "suite": "relay",
        "name": f"pingpong_100B_{mode}",
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "rtt_per_s": len(samples) / sum(samples),
    }
    connect = {
        "suite": "relay",
        "name": f"new_conns_{mode}",
        "conns_per_s": conns / conn_seconds,
    }
    if proxy is not None:
        bulk["proxy_cpu_s_per_gb"] = bulk_cpu / (bulk_bytes / 1e9)
        connect["proxy_cpu_ms_per_conn"] = conn_cpu / max(conns, 1) * 1e3
    return [bulk, ping, connect]
