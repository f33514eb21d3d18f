"""The load generators, in one long-lived client process (``ClientWorker``) so each run
pays no interpreter start: bulk transfers, ping-pong, connection churn, gRPC unary and
idle connections held open. wrk is its own program (``bench.runner``).

The worker runs one uvloop event loop for its whole life (grpc.aio wants one loop) and
takes one command at a time over a pipe; blocking-socket workloads (bulk, ping-pong)
run inline, since nothing else is running in it then.

For: driving traffic at 127.0.0.1 ports and timing it.
Must never: aim at anything but 127.0.0.1, or run unbounded (every command has a size
or a duration).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import socket
import struct
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench.stats import percentile

MiB = 1 << 20
HOST = "127.0.0.1"


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def bulk(port: int, nbytes: int) -> dict[str, float]:
    """``nbytes`` up (client → server), then ``nbytes`` down, each on a fresh connection."""
    block = memoryview(bytes(MiB))
    with _connect(port) as s:
        t0 = time.perf_counter()
        s.sendall(b"U" + struct.pack(">Q", nbytes))
        left = nbytes
        while left:
            n = min(MiB, left)
            s.sendall(block[:n])
            left -= n
        if s.recv(1) != b"K":
            raise RuntimeError("the bulk server did not confirm the upload")
        up = time.perf_counter() - t0
    buf = bytearray(MiB)
    with _connect(port) as s:
        t0 = time.perf_counter()
        s.sendall(b"D" + struct.pack(">Q", nbytes))
        got = 0
        while got < nbytes:
            n = s.recv_into(buf, min(MiB, nbytes - got))
            if not n:
                raise RuntimeError(f"the download ended after {got} of {nbytes} bytes")
            got += n
        down = time.perf_counter() - t0
    return {
        "mb_per_s": 2 * nbytes / (up + down) / 1e6,
        "up_mb_per_s": nbytes / up / 1e6,
        "down_mb_per_s": nbytes / down / 1e6,
        "bytes_each_way": float(nbytes),
        "requests": 2.0,
    }


def pingpong(port: int, rounds: int) -> dict[str, float]:
    """100 bytes out, 100 back, ``rounds`` times on one connection (after 200 warm-ups)."""
    msg = b"x" * 100
    samples = []
    with _connect(port) as s:
        for _ in range(rounds + 200):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                chunk = s.recv(len(msg) - got)
                if not chunk:
                    raise RuntimeError("the echo connection closed during ping-pong")
                got += len(chunk)
            samples.append(time.perf_counter() - t0)
    samples = samples[200:]
    return {
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "rtt_per_s": len(samples) / sum(samples),
        "requests": float(len(samples)),
    }


async def churn(port: int, seconds: float, concurrency: int) -> dict[str, float]:
    """New connections, each carrying one 1-byte request and its answer, then closed."""
    errors = 0

    async def worker(deadline: float) -> int:
        nonlocal errors
        n = 0
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"x")
                await reader.readexactly(1)
                writer.close()
                await writer.wait_closed()
                n += 1
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                await asyncio.sleep(0.01)
        return n

    t0 = time.perf_counter()
    deadline = t0 + seconds
    done = sum(await asyncio.gather(*(worker(deadline) for _ in range(concurrency))))
    elapsed = time.perf_counter() - t0
    return {"conns_per_s": done / elapsed, "requests": float(done), "errors": float(errors)}


async def grpc_unary(port: int, seconds: float, concurrency: int) -> dict[str, float]:
    """``concurrency`` callers on one channel, each calling /bench.Echo/Call with 100
    bytes in a loop for ``seconds``."""
    import grpc

    options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        call = channel.unary_unary("/bench.Echo/Call")
        payload = b"p" * 100
        for _ in range(20):  # warm-up: the connection, and the first calls' allocations
            await call(payload, timeout=30)
        samples: list[float] = []
        errors = 0

        async def caller(deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    answer = await call(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                samples.append(time.perf_counter() - t0)
                if answer != payload:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(t0 + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "qps": len(samples) / elapsed,
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "requests": float(len(samples)),
        "errors": float(errors),
    }


class _Held:
    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def hold(self, port: int, count: int, parallel: int = 32) -> dict[str, float]:
        """Open ``count`` more connections, each proven end to end by one echoed byte,
        and keep them open and idle."""
        sem = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with sem:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"x")
                await asyncio.wait_for(reader.readexactly(1), 30)
                self.writers.append(writer)

        await asyncio.gather(*(one() for _ in range(count)))
        return {"held": float(len(self.writers))}

    async def release(self) -> dict[str, float]:
        for w in self.writers:
            w.close()
        for w in self.writers:
            with contextlib.suppress(OSError):
                await w.wait_closed()
        n = len(self.writers)
        self.writers = []
        return {"released": float(n)}


def _worker_main(conn: Connection) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = _Held()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg is None:
                await held.release()
                return
            name, kwargs = msg
            try:
                result: dict[str, float]
                if name == "bulk":
                    result = bulk(**kwargs)
                elif name == "pingpong":
                    result = pingpong(**kwargs)
                elif name == "churn":
                    result = await churn(**kwargs)
                elif name == "grpc":
                    result = await grpc_unary(**kwargs)
                elif name == "hold":
                    result = await held.hold(**kwargs)
                elif name == "release":
                    result = await held.release()
                else:
                    raise ValueError(f"no such client command {name!r}")
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))

    uvloop.run(main())


class ClientWorker:
    """The client process, started with ``spawn`` (no inherited loop or threads)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()

    def call(self, name: str, timeout: float = 300.0, **kwargs: Any) -> dict[str, float]:
        self.conn.send((name, kwargs))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"client command {name} gave no answer in {timeout:.0f} s")
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"client command {name} failed:\n{result}")
        return dict(result)

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
