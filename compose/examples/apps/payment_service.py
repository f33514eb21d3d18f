"""payment-service: a gRPC service (meshlet compose examples, the shop).

For: the gRPC hop of the shop: ``/shop.Payments/Status`` takes and returns a
``google.protobuf.Struct`` (no generated code needed), answering whether the user's
orders are paid and which replica answered.
Must never: listen on anything but ``LISTEN`` (default 127.0.0.1): callers come in
through the sidecar, over mTLS.

Environment: PORT (50051), LISTEN (127.0.0.1), VERSION (v1).
"""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
from google.protobuf import struct_pb2

SERVICE = "shop.Payments"


async def status(request: struct_pb2.Struct, _: grpc.aio.ServicerContext) -> struct_pb2.Struct:
    fields = dict(request.items())
    reply = struct_pb2.Struct()
    reply.update(
        {
            "user": fields.get("user", ""),
            "paid": True,
            "service": "payment-service",
            "version": os.environ.get("VERSION", "v1"),
            "replica": socket.gethostname(),
        }
    )
    return reply


async def main() -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        status,
        request_deserializer=struct_pb2.Struct.FromString,
        response_serializer=struct_pb2.Struct.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Status": handler}),)
    )
    port = int(os.environ.get("PORT", "50051"))
    server.add_insecure_port(f"{os.environ.get('LISTEN', '127.0.0.1')}:{port}")
    await server.start()
    print(f"payment-service: gRPC on port {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
