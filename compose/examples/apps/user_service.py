"""user-service: the shop's front (meshlet compose examples).

For: ``GET /users/U/orders`` asks order-service by its mesh name (HTTP) for U's orders
and answers them together with which replicas served the call.
Must never: listen on anything but ``LISTEN`` (default 127.0.0.1).

Environment: PORT (8080), LISTEN (127.0.0.1), ORDERS (http://order-service:8080).
"""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
from aiohttp import web


async def user_orders(request: web.Request) -> web.Response:
    user = request.match_info["user"]
    url = f"{os.environ.get('ORDERS', 'http://order-service:8080')}/orders"
    session: aiohttp.ClientSession = request.app["session"]
    try:
        async with session.get(url, params={"user": user}) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return web.json_response({"error": f"order-service: {e!r}"}, status=502)
    return web.json_response(
        {"service": "user-service", "replica": socket.gethostname(), "user": user, "orders": body},
        status=200 if status == 200 else 502,
    )


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def main() -> None:
    app = web.Application()
    app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    app.router.add_get("/users/{user}/orders", user_orders)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = int(os.environ.get("PORT", "8080"))
    await web.TCPSite(runner, os.environ.get("LISTEN", "127.0.0.1"), port).start()
    print(f"user-service: listening on port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
