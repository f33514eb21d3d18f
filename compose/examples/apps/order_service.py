"""order-service: HTTP in front, gRPC behind (meshlet compose examples, the shop).

For: ``GET /orders?user=U`` lists U's orders and asks payment-service (gRPC, by its
mesh name) whether they are paid; the answer names this replica and its version, so a
90/10 v1/v2 split and the balancing over replicas are visible to the caller.
Must never: listen on anything but ``LISTEN`` (default 127.0.0.1).

Environment: PORT (8080), LISTEN (127.0.0.1), VERSION (v1),
PAYMENTS (payment-service:50051).
"""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
from aiohttp import web
from google.protobuf import json_format, struct_pb2

STATUS = "/shop.Payments/Status"


async def orders(request: web.Request) -> web.Response:
    user = request.query.get("user", "anonymous")
    call = request.app["payments"].unary_unary(
        STATUS,
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )
    ask = struct_pb2.Struct()
    ask.update({"user": user})
    try:
        payment = json_format.MessageToDict(await call(ask, timeout=5))
    except grpc.aio.AioRpcError as e:
        return web.json_response(
            {"error": f"payment-service: {e.code().name}: {e.details()}"}, status=502
        )
    return web.json_response(
        {
            "service": "order-service",
            "version": os.environ.get("VERSION", "v1"),
            "replica": socket.gethostname(),
            "user": user,
            "orders": [{"id": f"{user}-1", "item": "book"}, {"id": f"{user}-2", "item": "pen"}],
            "payment": payment,
        }
    )


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def main() -> None:
    app = web.Application()
    # Plain gRPC to the mesh name: the sidecar resolves it and adds mTLS.
    app["payments"] = grpc.aio.insecure_channel(os.environ.get("PAYMENTS", "payment-service:50051"))
    app.router.add_get("/orders", orders)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = int(os.environ.get("PORT", "8080"))
    await web.TCPSite(runner, os.environ.get("LISTEN", "127.0.0.1"), port).start()
    print(f"order-service {os.environ.get('VERSION', 'v1')}: listening on port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
