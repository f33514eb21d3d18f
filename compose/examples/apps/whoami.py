"""whoami: an HTTP service that says which replica answered (meshlet compose examples).

For: showing balancing across replicas. ``GET /`` (any path) answers JSON with the
service, its version label and the replica's hostname; ``GET /healthz`` answers ``ok``.
Must never: listen on anything but ``LISTEN`` (default 127.0.0.1, so only the sidecar in
the same network namespace reaches it; peers come in over mTLS).

Environment: PORT (8080), LISTEN (127.0.0.1), SERVICE (whoami), VERSION (v1).
"""

from __future__ import annotations

import asyncio
import os
import socket

from aiohttp import web


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "service": os.environ.get("SERVICE", "whoami"),
            "version": os.environ.get("VERSION", "v1"),
            "replica": socket.gethostname(),
            "path": request.path_qs,
        }
    )


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def main() -> None:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = int(os.environ.get("PORT", "8080"))
    await web.TCPSite(runner, os.environ.get("LISTEN", "127.0.0.1"), port).start()
    print(f"whoami: listening on port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
