"""The servers at the end of every path (`python -m bench.backends BULK ECHO GRPC`):
one uvloop process on 127.0.0.1 with

- bulk: a 9-byte header (``U`` or ``D`` + 8-byte big-endian length); ``U``: read that
  many bytes, answer ``K``; ``D``: send that many bytes. Lengths, not half-close, end
  each transfer, so no proxy's shutdown semantics are measured by accident.
- echo: every byte back, at once (ping-pong, churn, idle connections).
- gRPC: ``/bench.Echo/Call``, a generic unary handler on raw bytes that answers the
  request's bytes (grpc.aio, h2c).

Prints ``ready`` when all three listen; exits on SIGTERM.

For: the app side of the benchmark; nginx is the HTTP/1.1 app (started by the runner).
Must never: listen beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import struct
import sys
from typing import Any

CHUNK = 1 << 20
_ZEROS = memoryview(bytes(CHUNK))


class Bulk(asyncio.Protocol):
    def __init__(self) -> None:
        self.head = b""
        self.left = 0
        self.sending = 0
        self.paused = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        while data:
            if self.left:
                take = min(self.left, len(data))
                self.left -= take
                data = data[take:]
                if not self.left:
                    self.transport.write(b"K")
                continue
            self.head += data
            if len(self.head) < 9:
                return
            op, n = self.head[:1], struct.unpack(">Q", self.head[1:9])[0]
            data, self.head = self.head[9:], b""
            if op == b"U":
                self.left = n
            elif op == b"D":
                self.sending = n
                self._pump()
            else:
                self.transport.close()
                return

    def _pump(self) -> None:
        while self.sending and not self.paused:
            n = min(CHUNK, self.sending)
            self.sending -= n
            self.transport.write(_ZEROS[:n])

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _grpc_server(port: int) -> Any:
    import grpc

    async def call(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def main(bulk: int, echo: int, grpc_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    servers = [
        await loop.create_server(Bulk, "127.0.0.1", bulk, backlog=4096),
        await loop.create_server(Echo, "127.0.0.1", echo, backlog=4096),
    ]
    grpc_server = await _grpc_server(grpc_port)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    await grpc_server.stop(0)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(*(int(a) for a in sys.argv[1:4])))
