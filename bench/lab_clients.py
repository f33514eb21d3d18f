"""The load generators of `make bench BENCH_ARGS=--lab`, inside a lab container:
``bench.clients`` in one long-lived process that enters the container's network
namespace (setns, while still single-threaded) and, for the meshed client, drops to uid
65534 so the container's nft rules capture its connections. Each command names the host
it dials (127.0.0.1, a container's overlay address or a service VIP).

For: ``NetnsWorker``, driven by bench/lab_bench.py.
Must never: dial anything but loopback or the lab's own addresses, or run unbounded
(every command has a size or a duration, and every call a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench import procs

NOBODY = 65534
CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> None:
    """This (still single-threaded) process into ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
    finally:
        os.close(fd)


def _become(uid: int) -> None:
    """Down to ``uid`` (its sockets are then captured by the container's nft rules).
    Everything the worker will import is imported before: the interpreter may live
    where ``uid`` cannot read (a pyenv under /root)."""
    import encodings.idna  # noqa: F401  (host names are idna-encoded on connect)

    import grpc.aio  # noqa: F401
    import uvloop  # noqa: F401

    from bench import clients  # noqa: F401

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


async def _wait_port(host: str, port: int, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return {"ok": 1.0}


def _worker_main(conn: Connection, netns: str, uid: int | None) -> None:
    _enter(netns)
    if uid is not None:
        _become(uid)
    import uvloop

    from bench import clients

    async def main() -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg is None:
                return
            name, host, kwargs = msg
            clients.HOST = host  # the clients dial clients.HOST; here it varies per variant
            try:
                result: dict[str, float]
                if name == "bulk":
                    result = clients.bulk(**kwargs)
                elif name == "pingpong":
                    result = clients.pingpong(**kwargs)
                elif name == "churn":
                    result = await clients.churn(**kwargs)
                elif name == "grpc":
                    result = await clients.grpc_unary(**kwargs)
                elif name == "wait_port":
                    result = await _wait_port(host, **kwargs)
                else:
                    raise ValueError(f"no such client command {name!r}")
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))

    uvloop.run(main())


class NetnsWorker:
    """``bench.clients`` in one long-lived process inside a container's namespace."""

    def __init__(self, netns: str, uid: int | None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, netns, uid), daemon=True)
        self.proc.start()

    def call(self, name: str, host: str, timeout: float = 300.0, **kw: Any) -> dict[str, float]:
        self.conn.send((name, host, kw))
        if not self.conn.poll(timeout):
            raise procs.BenchError(f"client command {name} gave no answer in {timeout:.0f} s")
        status, result = self.conn.recv()
        if status != "ok":
            raise procs.BenchError(f"client command {name} against {host} failed:\n{result}")
        return dict(result)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
