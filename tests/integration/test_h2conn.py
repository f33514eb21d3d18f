"""HTTP/2 connections (sidecar.h2conn) against real peers on 127.0.0.1 under uvloop.

A server built on H2Connection answers curl, nghttp, h2load, our own client (plain and
over TlsLeg with ALPN h2) and a grpcio client through an h2c proxy assembled from two
H2Connections in front of a real grpc.aio server. Deliberately bad clients, written with
hyperframe and hpack, flood it (rapid reset, CONTINUATION, HPACK bomb, SETTINGS, PING,
empty frames, a peer that does not read) and must be cut off with a GOAWAY while the
server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import hpack
import pytest
import uvloop
from certs_helpers import cli_init, cli_issue
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from sidecar import tls
from sidecar.h2_limits import H2Limits
from sidecar.h2_stream import StreamResetError
from sidecar.h2conn import H2Connection, H2Stream, StreamHandler, splice
from sidecar.relay import PlainSide
from sidecar.tlsleg import TlsLeg

pytestmark = pytest.mark.integration
# The server in flood tests lingers briefly after its GOAWAY (the default is 2 s).
FLOOD = H2Limits(linger_s=0.3)

T = TypeVar("T")
MiB = 1 << 20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
need_nghttp2 = pytest.mark.skipif(
    not (shutil.which("nghttp") and shutil.which("h2load")),
    reason="needs nghttp2-client (apt-get install nghttp2-client)",
)


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run one scenario on uvloop, as the sidecar does, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return uvloop.run(bounded())


def request(path: str, method: str = "GET") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":path", path.encode()),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1"),
    ]


# ---- the test server application ---------------------------------------------------------


class Echo(StreamHandler):
    """The body back as it comes (flow control coupled), then trailers with its size."""

    def __init__(self) -> None:
        self.size = 0

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        self.size += len(data)
        stream.send_data(data)

    def on_end(self, stream: H2Stream) -> None:
        stream.send_trailers([(b"x-echo-bytes", str(self.size).encode())])


@dataclass
class App:
    """/echo: the body back with trailers; /hold: kept, nothing read or answered (the test
    drives it); /big?N: N bytes; anything else: 200 "ok"."""

    held: list[H2Stream] = field(default_factory=list)
    max_tracked: int = 0

    def on_stream(self, stream: H2Stream) -> None:
        self.max_tracked = max(self.max_tracked, stream.connection.tracked_streams)
        path = dict(stream.headers or []).get(b":path", b"/")
        if path.startswith(b"/echo"):
            stream.send_headers([(b":status", b"200")])
            stream.on_sent = stream.consumed
            stream.set_handler(Echo())
        elif path.startswith(b"/hold"):
            self.held.append(stream)
        elif path.startswith(b"/big"):
            size = int(path.partition(b"?")[2])
            stream.send_headers([(b":status", b"200"), (b"content-length", b"%d" % size)])
            stream.send_data(b"b" * size, end_stream=True)
            stream.set_handler(StreamHandler())
        else:
            stream.send_headers([(b":status", b"200"), (b"content-length", b"2")])
            stream.send_data(b"ok", end_stream=True)
            stream.set_handler(StreamHandler())


class _H2cSide(PlainSide):
    def __init__(self, start: Callable[[PlainSide], None]) -> None:
        super().__init__()
        self._start = start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start(self)


@dataclass
class Server:
    port: int
    conns: list[H2Connection]
    server: asyncio.Server
    tasks: set[asyncio.Task[None]]

    @property
    def conn(self) -> H2Connection:
        return self.conns[0]

    async def wait_conn(self) -> H2Connection:
        while not self.conns:
            await asyncio.sleep(0.005)
        return self.conns[0]

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.abort()


async def serve(
    on_stream: Callable[[H2Stream], object],
    *,
    limits: H2Limits | None = None,
    ctx: ssl.SSLContext | None = None,
) -> Server:
    loop = asyncio.get_running_loop()
    conns: list[H2Connection] = []
    tasks: set[asyncio.Task[None]] = set()

    def start(side: Any) -> None:
        conn = H2Connection(side, client=False, limits=limits, on_stream=on_stream)
        conns.append(conn)
        conn.start()

    async def after_handshake(leg: TlsLeg) -> None:
        with contextlib.suppress(Exception):
            await leg.handshake
            start(leg)

    def factory() -> asyncio.Protocol:
        if ctx is None:
            return _H2cSide(start)
        leg = TlsLeg(ctx, server_side=True)
        task = loop.create_task(after_handshake(leg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return leg

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return Server(server.sockets[0].getsockname()[1], conns, server, tasks)


async def connect(
    port: int, *, limits: H2Limits | None = None, ctx: ssl.SSLContext | None = None
) -> H2Connection:
    loop = asyncio.get_running_loop()
    side: Any
    if ctx is None:
        _, side = await loop.create_connection(PlainSide, "127.0.0.1", port)
    else:
        _, side = await loop.create_connection(
            lambda: TlsLeg(ctx, server_side=False), "127.0.0.1", port
        )
        await side.handshake
    conn = H2Connection(side, client=True, limits=limits)
    conn.start()
    return conn


async def exchange(
    conn: H2Connection, path: str, body: bytes = b""
) -> tuple[int, bytes, dict[bytes, bytes]]:
    """One request with our client: (status, body, trailers)."""
    await conn.stream_slot()
    stream = conn.open_stream(request(path, "POST" if body else "GET"), end_stream=not body)

    async def send() -> None:
        view = memoryview(body)
        for i in range(0, len(body), 64 * 1024):
            stream.send_data(bytes(view[i : i + 64 * 1024]))
            await stream.drain()
        stream.end()

    sender = asyncio.create_task(send()) if body else None
    head = dict(await stream.response())
    got = await stream.read_all()
    if sender is not None:
        await sender
    return int(head[b":status"]), got, dict(stream.trailers or [])


async def proxy(upstream_port: int) -> tuple[Server, H2Connection]:
    """An h2c forwarding proxy made of two H2Connections: one upstream connection shared
    by every downstream stream, each stream spliced frame by frame."""
    upstream = await connect(upstream_port)

    def on_stream(down: H2Stream) -> None:
        if not upstream.can_open_stream():
            down.reset(ErrorCodes.REFUSED_STREAM)
            return
        assert down.headers is not None
        up = upstream.open_stream(down.headers, end_stream=down.remote_ended)
        splice(down, up)

    return await serve(on_stream), upstream


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def tool(*argv: str, timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


# ---- real clients: curl, nghttp, h2load ---------------------------------------------------


def test_curl_many_requests_and_large_bodies_both_ways(tmp_path: Path) -> None:
    body = bytes(range(256)) * (8 * MiB // 256)
    (tmp_path / "up.bin").write_bytes(body)

    async def scenario() -> None:
        srv = await serve(App().on_stream)
        url = f"http://127.0.0.1:{srv.port}"
        # curl 7.88 (Debian 12) cannot reuse a prior-knowledge connection (curl/curl#10643,
        # fixed in 8.0), so 100 requests go at once, each on its own connection; nghttp and
        # h2load below put many streams on one.
        rc, out = await tool(
            "curl", "-s", "--http2-prior-knowledge", "--parallel", "--parallel-immediate",
            "--parallel-max", "100", "-o", "/dev/null", "-w", "got %{http_code} h%{http_version}\n",
            f"{url}/r[1-100]",
        )  # fmt: skip
        assert rc == 0, out
        assert out.count("got 200 h2\n") == 100, out
        assert len(srv.conns) == 100
        rc, out = await tool(
            "curl", "-s", "--http2-prior-knowledge", "--data-binary", f"@{tmp_path / 'up.bin'}",
            "-D", str(tmp_path / "head.txt"), "-o", str(tmp_path / "down.bin"), f"{url}/echo",
        )  # fmt: skip
        assert rc == 0, out
        assert (tmp_path / "down.bin").read_bytes() == body
        assert f"x-echo-bytes: {len(body)}" in (tmp_path / "head.txt").read_text()
        rc, out = await tool(
            "curl", "-s", "--http2-prior-knowledge", "-o", str(tmp_path / "big.bin"),
            f"{url}/big?{4 * MiB}",
        )  # fmt: skip
        assert rc == 0 and (tmp_path / "big.bin").stat().st_size == 4 * MiB
        srv.close()

    run(scenario, timeout=60)


@need_nghttp2
def test_nghttp_upload_and_repeated_requests(tmp_path: Path) -> None:
    (tmp_path / "up.bin").write_bytes(b"n" * (3 * MiB))

    async def scenario() -> None:
        srv = await serve(App().on_stream)
        url = f"http://127.0.0.1:{srv.port}"
        rc, out = await tool("nghttp", "-v", "-d", str(tmp_path / "up.bin"), f"{url}/echo")
        assert rc == 0, out[-2000:]
        assert f"x-echo-bytes: {3 * MiB}" in out
        rc, out = await tool("nghttp", "-nv", "-m", "50", f"{url}/")
        assert rc == 0, out[-2000:]
        assert out.count(":status: 200") == 50
        srv.close()

    run(scenario, timeout=60)


@need_nghttp2
def test_h2load_2000_requests_all_succeed_direct_and_through_a_proxy() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream)
        front, upstream = await proxy(srv.port)
        for port in (srv.port, front.port):
            rc, out = await tool(
                "h2load", "-n", "2000", "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/"
            )
            assert rc == 0, out
            assert "2000 succeeded, 0 failed, 0 errored" in out, out
        await until(lambda: upstream.active_streams == 0)
        assert upstream.stats.streams_opened == 2000
        # h2 remembers a bounded number of closed streams (its default: 65536, ~7 MB).
        assert len(upstream._h2._closed_streams) <= H2Limits().closed_streams_remembered
        front.close()
        srv.close()

    run(scenario, timeout=90)


# ---- our client: flow control, shutdown, keepalive ----------------------------------------


def test_flow_control_a_slow_reader_slows_the_sender_in_both_directions() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream)
        client = await connect(srv.port)
        window = H2Limits().initial_window_size
        # Upload to a server stream that reads nothing yet.
        up = client.open_stream(request("/hold", "POST"))
        up.send_data(b"u" * (2 * MiB), end_stream=True)
        await until(lambda: len(app.held) == 1)
        await asyncio.sleep(0.3)
        assert srv.conn.stats.bytes_received <= window
        assert up.out_size >= 2 * MiB - window  # the rest waits in the sender
        held = app.held[0]
        held.send_headers([(b":status", b"200")])
        held.send_data(b"d" * (2 * MiB), end_stream=True)
        # The client reads nothing for a while: the server's data waits at the server.
        await up.response()
        await asyncio.sleep(0.3)
        assert client.stats.bytes_received <= window
        assert held.out_size >= 2 * MiB - window
        got_up, got_down = await asyncio.gather(held.read_all(), up.read_all())
        assert got_up == b"u" * (2 * MiB) and got_down == b"d" * (2 * MiB)
        await until(lambda: srv.conn.active_streams == 0 and client.active_streams == 0)
        await client.shutdown(1.0)
        srv.close()

    run(scenario)


def test_through_the_proxy_a_slow_reader_holds_data_at_the_origin_not_in_the_proxy() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream)
        front, upstream = await proxy(srv.port)
        client = await connect(front.port)
        window = H2Limits().initial_window_size
        stream = client.open_stream(request(f"/big?{8 * MiB}"), end_stream=True)
        await stream.response()
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        in_proxy = upstream.stats.bytes_received - front.conn.stats.bytes_sent
        assert client.stats.bytes_received <= window
        assert 0 <= in_proxy <= window  # the proxy holds at most one stream window
        assert upstream.stats.bytes_received <= 2 * window
        assert len(await stream.read_all()) == 8 * MiB  # and then it all flows
        await client.shutdown(1.0)
        front.close()
        upstream.abort()
        srv.close()

    run(scenario)


def test_many_concurrent_echo_streams_wait_for_slots_and_all_complete() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream, limits=H2Limits(max_concurrent_streams=20))
        client = await connect(srv.port)
        bodies = [bytes([i % 256]) * (1000 * i) for i in range(150)]
        results = await asyncio.gather(*(exchange(client, "/echo", b) for b in bodies))
        for body, (status, got, trailers) in zip(bodies, results, strict=True):
            assert status == 200 and got == body
            assert trailers[b"x-echo-bytes"] == str(len(body)).encode()
        assert srv.conn.stats.max_active_streams <= 20
        assert srv.conn.stats.streams_refused == 0  # the client kept to our SETTINGS
        await client.shutdown(1.0)
        srv.close()

    run(scenario)


def test_graceful_shutdown_lets_open_streams_finish_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream)
        client = await connect(srv.port)
        streams = [client.open_stream(request("/echo", "POST")) for _ in range(3)]
        for s in streams:
            s.send_data(b"first half ")
        await until(lambda: bool(srv.conns) and srv.conn.active_streams == 3)
        shutdown = asyncio.create_task(srv.conn.shutdown(5.0))
        await until(lambda: client.goaway_received is not None)
        assert client.goaway_received == ErrorCodes.NO_ERROR
        assert not client.can_open_stream()
        for s in streams:  # streams below the GOAWAY's last id go on in both directions
            s.send_data(b"second half", end_stream=True)
        for s in streams:
            assert await s.read_all() == b"first half second half"
            assert dict(s.trailers or [])[b"x-echo-bytes"] == b"22"
        await asyncio.wait_for(shutdown, 5)
        await asyncio.wait_for(srv.conn.closed, 5)
        await asyncio.wait_for(client.closed, 5)
        assert srv.conn.close_reason == "shutdown"
        assert srv.conn.goaway_sent == ErrorCodes.NO_ERROR
        srv.close()

    run(scenario)


def test_shutdown_deadline_resets_streams_that_do_not_finish() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream)
        client = await connect(srv.port)
        stuck = client.open_stream(request("/hold", "POST"))
        await until(lambda: len(app.held) == 1)
        t0 = time.monotonic()
        await srv.conn.shutdown(0.3)
        assert 0.25 <= time.monotonic() - t0 < 3.5
        assert app.held[0].reset_reason == "connection"
        with pytest.raises(StreamResetError):
            await stuck.response()
        await asyncio.wait_for(client.closed, 5)
        srv.close()

    run(scenario)


def test_keepalive_pings_an_idle_peer_and_drops_one_that_never_answers() -> None:
    async def scenario() -> None:
        fast = H2Limits(ping_interval_s=0.1, ping_timeout_s=0.3, linger_s=0.2)
        srv = await serve(App().on_stream, limits=fast)
        client = await connect(srv.port, limits=fast)
        await asyncio.sleep(0.6)
        assert client.stats.pings_sent >= 2 and srv.conn.stats.pings_sent >= 2
        assert not client.closed.done()
        assert (await exchange(client, "/"))[1] == b"ok"  # still usable
        await client.shutdown(1.0)
        # A peer that sends the preface and then goes silent (never ACKs a PING).
        raw = await Raw.connect(srv.port)
        await until(lambda: len(srv.conns) == 2)
        silent = srv.conns[1]
        await asyncio.wait_for(silent.closed, 3.0)
        assert silent.close_reason == "ping_timeout"
        raw.close()
        srv.close()

    run(scenario)


# ---- TLS: h2 over TlsLeg with ALPN ---------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("h2tls")
    ca = cli_init(base / "ca", "mesh.test")
    cli_issue(ca, base / "web", "spiffe://mesh.test/ns/shop/sa/web")
    cli_issue(ca, base / "orders", "spiffe://mesh.test/ns/shop/sa/orders")
    return {"ca": ca, "web": base / "web", "orders": base / "orders"}


def test_h2_over_mtls_with_alpn_many_streams_on_one_connection(pki: dict[str, Path]) -> None:
    bundle = (pki["ca"] / "bundle.pem").read_bytes()
    server_ctx = tls.server_context(
        pki["orders"] / "cert.pem", pki["orders"] / "key.pem", bundle, alpn=("h2",)
    )
    client_ctx = tls.client_context(
        pki["web"] / "cert.pem", pki["web"] / "key.pem", bundle, alpn=("h2",)
    )

    async def scenario() -> None:
        srv = await serve(App().on_stream, ctx=server_ctx)
        client = await connect(srv.port, ctx=client_ctx)
        assert isinstance(client.side, TlsLeg) and client.side.alpn_protocol() == "h2"
        bodies = [b"%d" % i * (50 * i) for i in range(300)]
        results = await asyncio.gather(*(exchange(client, "/echo", b) for b in bodies))
        assert [r[1] for r in results] == bodies
        assert len(srv.conns) == 1 and srv.conn.stats.streams_opened == 300
        big = await exchange(client, "/echo", b"z" * (6 * MiB))
        assert big[1] == b"z" * (6 * MiB)
        await client.shutdown(2.0)
        await asyncio.wait_for(srv.conn.closed, 5)
        srv.close()

    run(scenario, timeout=60)


# ---- gRPC through an h2c proxy made of two H2Connections -----------------------------------


def _grpc_handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-trailer", "yes"),))
        return request[::-1]

    async def bidi(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for msg in requests:
            yield b"echo:" + msg

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(5)
        return request

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        raise AssertionError("abort returns by raising")

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Missing": grpc.unary_unary_rpc_method_handler(missing),
        },
    )


def test_grpc_unary_bidi_deadline_and_status_codes_through_the_proxy() -> None:
    async def scenario() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_grpc_handlers(),))
        gport = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        front, upstream = await proxy(gport)
        options = [("grpc.enable_http_proxy", 0)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}", options=options) as ch:
                unary = ch.unary_unary("/test.Echo/Unary")
                call = unary(b"hello", timeout=10)
                assert await call == b"olleh"
                assert ("x-trailer", "yes") in tuple(await call.trailing_metadata())
                assert await call.code() == grpc.StatusCode.OK
                many = await asyncio.gather(*(unary(b"%d" % i, timeout=10) for i in range(200)))
                assert many == [(b"%d" % i)[::-1] for i in range(200)]
                big = bytes(range(256)) * 4096  # 1 MiB each way: flow control through both legs
                assert await unary(big, timeout=10) == big[::-1]

                bidi = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
                for i in range(100):
                    await bidi.write(b"m%d" % i)
                    assert await bidi.read() == b"echo:m%d" % i
                await bidi.done_writing()
                assert await bidi.read() == grpc.aio.EOF
                assert await bidi.code() == grpc.StatusCode.OK

                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/test.Echo/Slow")(b"x", timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - t0 < 2.0

                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/test.Echo/Missing")(b"x", timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert err.value.details() == "no such order"
            await until(lambda: upstream.active_streams == 0)  # nothing leaked in the proxy
            assert upstream.stats.streams_opened == 205
        finally:
            front.close()
            upstream.abort()
            await server.stop(0)

    run(scenario, timeout=60)


# ---- deliberately bad clients --------------------------------------------------------------


class Raw:
    """A misbehaving HTTP/2 client: frames from hyperframe, header blocks from hpack."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.enc = hpack.Encoder()
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.eof = False

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        raw = cls(*await asyncio.open_connection(sock=sock))
        raw.send(PREFACE, SettingsFrame(0))
        return raw

    def headers(
        self, sid: int, path: str = "/", *, end_stream: bool = True, extra: Any = ()
    ) -> HeadersFrame:
        block = self.enc.encode([(k.decode(), v.decode()) for k, v in request(path)] + list(extra))
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        return HeadersFrame(sid, data=block, flags=flags)

    def send(self, *parts: Frame | bytes) -> None:
        self.writer.write(b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts))

    async def read_until(self, cond: Callable[[Raw], bool], timeout: float = 5.0) -> None:
        """Read frames until ``cond`` holds or the server closed (reset counts as closed)."""
        async with asyncio.timeout(timeout):
            while not cond(self) and not self.eof:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    self.eof = True
                self.buf += chunk
                while len(self.buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                    if len(self.buf) < 9 + length:
                        break
                    frame.parse_body(memoryview(self.buf[9 : 9 + length]))
                    del self.buf[: 9 + length]
                    self.frames.append(frame)

    async def closed(self, timeout: float = 5.0) -> None:
        await self.read_until(lambda r: False, timeout)

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)

    def resets(self) -> dict[int, int]:
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}

    def close(self) -> None:
        self.writer.transport.abort()


async def expect_goaway(raw: Raw, conn: H2Connection, reason: str, code: int) -> None:
    await raw.closed()
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == code, raw.frames[-3:]
    await asyncio.wait_for(conn.closed, 5)
    assert conn.close_reason == reason
    assert conn.tracked_streams <= 2  # nothing left behind


def test_rapid_reset_gets_goaway_and_tracked_streams_stay_bounded() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream, limits=FLOOD)
        raw = await Raw.connect(srv.port)
        pairs: list[Frame] = []
        for i in range(1000):
            sid = 2 * i + 1
            pairs += [raw.headers(sid, end_stream=False), RstStreamFrame(sid, error_code=8)]
        raw.send(*pairs)
        conn = await srv.wait_conn()
        await expect_goaway(raw, conn, "rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM)
        assert 400 <= conn.stats.streams_opened < 1000  # cut off well before the end
        assert conn.stats.max_active_streams <= H2Limits().max_concurrent_streams
        assert app.max_tracked <= 10  # ours + h2's, at every new stream
        srv.close()

    run(scenario)


def test_continuation_flood_gets_goaway_with_a_bounded_buffer() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream, limits=FLOOD)
        raw = await Raw.connect(srv.port)
        block = raw.enc.encode([(k.decode(), v.decode()) for k, v in request("/")])
        raw.send(HeadersFrame(1, data=block))  # no END_HEADERS: a header block starts
        reader = asyncio.create_task(raw.closed(10))
        sent = 0
        with contextlib.suppress(ConnectionError):
            while raw.goaway() is None and not raw.eof and sent < 16 * MiB:  # "endless"
                raw.send(*[ContinuationFrame(1, data=b"\x00" * 1024)] * 4)
                sent += 4 * 1033
                await raw.writer.drain()
                await asyncio.sleep(0)
        await reader
        goaway = raw.goaway()
        assert goaway is not None
        assert goaway.error_code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR)
        conn = srv.conn
        await asyncio.wait_for(conn.closed, 5)
        assert conn.close_reason == "continuation_flood"
        assert conn.stats.wire_bytes_received < 512 * 1024  # h2 never held more than that
        srv.close()

    run(scenario)


def test_hpack_bomb_beyond_the_hard_cap_gets_goaway() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream, limits=FLOOD)
        raw = await Raw.connect(srv.port)
        # One 3.9 KB entry in the dynamic table, then referenced 100 times (1 byte each):
        # a 4 KB header block that decodes to ~400 KB.
        block = raw.enc.encode(
            [(k.decode(), v.decode()) for k, v in request("/")] + [("x-bomb", "a" * 3900)]
        )
        block += bytes([0x80 | 62]) * 100
        raw.send(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]))
        await expect_goaway(raw, await srv.wait_conn(), "hpack_bomb", ErrorCodes.ENHANCE_YOUR_CALM)
        assert srv.conn.stats.streams_opened == 0  # it never reached the application
        srv.close()

    run(scenario)


def test_headers_over_60k_or_100_fields_reset_the_stream_and_the_connection_goes_on() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream)
        raw = await Raw.connect(srv.port)
        big = raw.enc.encode(
            [(k.decode(), v.decode()) for k, v in request("/")] + [("x-big", "a" * 3900)]
        )
        big += bytes([0x80 | 62]) * 17  # ~70 KB decoded: over 60 KiB, under the hard cap
        many = [(f"x-h{i}", "v") for i in range(101)]
        raw.send(
            HeadersFrame(1, data=big, flags=["END_HEADERS", "END_STREAM"]),
            raw.headers(3, extra=many),
            raw.headers(5),  # a good request on the same connection
        )
        await raw.read_until(
            lambda r: any(isinstance(f, DataFrame) and f.stream_id == 5 for f in r.frames)
        )
        assert raw.resets() == {1: ErrorCodes.PROTOCOL_ERROR, 3: ErrorCodes.PROTOCOL_ERROR}
        assert raw.goaway() is None
        assert srv.conn.stats.streams_rejected == 2 and srv.conn.stats.streams_opened == 1
        raw.close()
        srv.close()

    run(scenario)


@pytest.mark.parametrize(
    ("reason", "frames"),
    [
        ("settings_flood", lambda: [SettingsFrame(0)] * 300),
        ("ping_flood", lambda: [PingFrame(0, opaque_data=b"12345678")] * 300),
        ("empty_frames_flood", lambda: [DataFrame(1, data=b"")] * 1500),
    ],
)
def test_control_frame_floods_get_goaway_enhance_your_calm(
    reason: str, frames: Callable[[], list[Frame]]
) -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream, limits=FLOOD)
        raw = await Raw.connect(srv.port)
        raw.send(raw.headers(1, "/hold", end_stream=False), *frames())
        await expect_goaway(raw, await srv.wait_conn(), reason, ErrorCodes.ENHANCE_YOUR_CALM)
        srv.close()

    run(scenario)


def test_a_peer_that_makes_us_write_but_never_reads_is_cut_off() -> None:
    async def scenario() -> None:
        limits = H2Limits(max_pings_per_s=10**9, max_outbound_backlog=64 * 1024, linger_s=0.2)
        srv = await serve(App().on_stream, limits=limits)
        raw = await Raw.connect(srv.port, rcvbuf=4096)
        conn = await srv.wait_conn()
        batch = PingFrame(0, opaque_data=b"12345678").serialize() * 1000
        sent = 0
        with contextlib.suppress(ConnectionError):
            while not conn.closed.done() and sent < 64 * MiB:
                raw.send(batch)
                sent += len(batch)
                await asyncio.wait_for(raw.writer.drain(), 5)
        await asyncio.wait_for(conn.closed, 5)
        assert conn.close_reason == "outbound_backlog"
        raw.close()
        srv.close()

    run(scenario)


def test_streams_beyond_max_concurrent_streams_are_refused_one_by_one() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream, limits=H2Limits(max_concurrent_streams=10))
        raw = await Raw.connect(srv.port)
        raw.send(*[raw.headers(2 * i + 1, "/hold", end_stream=False) for i in range(15)])
        await raw.read_until(lambda r: len(r.resets()) >= 5)
        assert raw.resets() == {sid: ErrorCodes.REFUSED_STREAM for sid in range(21, 31, 2)}
        assert len(app.held) == 10 and raw.goaway() is None
        assert srv.conn.stats.streams_refused == 5
        raw.close()
        srv.close()

    run(scenario)


def test_a_frame_longer_than_max_frame_size_is_not_buffered() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream, limits=FLOOD)
        raw = await Raw.connect(srv.port)
        raw.send(raw.headers(1, "/hold", end_stream=False))
        header = DataFrame(1, data=b"").serialize()[:9]
        announced = bytearray(header)
        announced[0:3] = (2**24 - 1).to_bytes(3, "big")  # a 16 MiB DATA frame, announced
        raw.send(bytes(announced), b"x" * (64 * 1024))
        conn = await srv.wait_conn()
        await expect_goaway(raw, conn, "frame_too_large", ErrorCodes.FRAME_SIZE_ERROR)
        srv.close()

    run(scenario)


def test_a_misbehaving_server_gets_its_streams_reset_not_our_connection() -> None:
    """Client role: endless 1xx heads, or a response head over 100 fields, reset that
    stream (the proxy answers 502); the connection serves the next request."""

    async def scenario() -> None:
        enc = hpack.Encoder()

        async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(PREFACE))
            writer.write(SettingsFrame(0).serialize())
            out = []
            for _ in range(50):  # stream 1: 1xx forever
                out.append(
                    HeadersFrame(1, data=enc.encode([(":status", "103")]), flags=["END_HEADERS"])
                )
            many = [(":status", "200")] + [(f"x-h{i}", "v") for i in range(101)]
            out.append(HeadersFrame(3, data=enc.encode(many), flags=["END_HEADERS", "END_STREAM"]))
            ok = [(":status", "200")]
            out.append(HeadersFrame(5, data=enc.encode(ok), flags=["END_HEADERS", "END_STREAM"]))
            await asyncio.sleep(0.1)  # the client's three requests are in
            writer.write(b"".join(f.serialize() for f in out))
            await reader.read(1 << 20)
            await asyncio.sleep(2)
            writer.close()

        server = await asyncio.start_server(bad_server, "127.0.0.1", 0)
        client = await connect(server.sockets[0].getsockname()[1])
        streams = [client.open_stream(request(f"/{i}"), end_stream=True) for i in range(3)]
        for s in streams[:2]:
            with pytest.raises(StreamResetError) as err:
                await s.response()
            assert err.value.reason == "headers"
        assert dict(await streams[2].response())[b":status"] == b"200"
        assert client.stats.streams_rejected == 2 and not client.closed.done()
        assert streams[0].informational == 16
        client.abort()
        server.close()

    run(scenario)
