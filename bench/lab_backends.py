"""The bench's servers inside a lab container (`python -m bench.lab_backends HOST BULK ECHO
GRPC`, a port of 0 leaves that server out): the same bulk, echo and gRPC servers as
``bench.backends``, bound to HOST — 127.0.0.1 behind a sidecar or for the loopback
reference, 0.0.0.0 in a plain container the direct-overlay client dials across the overlay.

Prints ``ready`` when every server listens; exits on SIGTERM.

For: the app side of `make bench BENCH_ARGS=--lab`.
Must never: be started outside a namespace the lab created (bench/lab_bench.py starts it
with the lab's ``spawn``), since it may bind every address there.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from bench.backends import Bulk, Echo


async def _grpc_server(host: str, port: int) -> Any:
    import grpc

    async def call(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server


async def main(host: str, bulk: int, echo: int, grpc_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    servers = []
    if bulk:
        servers.append(await loop.create_server(Bulk, host, bulk, backlog=4096))
    if echo:
        servers.append(await loop.create_server(Echo, host, echo, backlog=4096))
    grpc_server = await _grpc_server(host, grpc_port) if grpc_port else None
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    if grpc_server is not None:
        await grpc_server.stop(0)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], *(int(a) for a in sys.argv[2:5])))
