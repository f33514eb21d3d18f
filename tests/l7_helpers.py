"""Run an L7 (HTTP/1.1) mesh for tests: a real control plane, three `shop/orders` replicas
(real sidecars with `--app-protocol http`, each in front of a real aiohttp backend) and
a `shop/web` sidecar whose explicit upstream leads to `shop/orders:8080` (protocol http).
Every process runs on 127.0.0.x and is killed by PID.

The backend (``BACKEND_APP``) answers every path with JSON: its replica name, the
method, path, headers and body digest it saw, and ``x-replica`` in the response. Request
headers steer it: ``x-status: N`` answers N, ``x-fail-on: a,b`` answers 503 on those
replicas, ``x-delay: S`` sleeps (and counts a cancellation when its client leaves),
``x-close-once: TAG`` closes the connection without answering the first time TAG is
seen. ``x-size: N`` answers N bytes of a fixed pattern (``x-chunked: 1``: chunked, in
64 KiB writes). A WebSocket upgrade is accepted and every message echoed with the replica name. ``x-tag: T`` counts requests per tag; ``GET /__count?tag=T`` (on the app port,
never through the mesh) reads the counters.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane_helpers import ControlPlaneProcess
from sidecar_helpers import Proc, Sidecar, echo_app, free_port, http_get

BACKEND_APP = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    from aiohttp import web
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    counts, cancelled, closed_once = {}, {}, set()
    total = [0]

    async def handle(request):
        if request.path == "/__count":
            tag = request.query.get("tag", "")
            return web.json_response({
                "total": total[0], "tag": counts.get(tag, 0), "cancelled": cancelled.get(tag, 0)
            })
        total[0] += 1
        if request.headers.get("upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"{name}:{msg.data}")
            return ws
        tag = request.headers.get("x-tag", "")
        counts[tag] = counts.get(tag, 0) + 1
        once = request.headers.get("x-close-once")
        if once and once not in closed_once:
            closed_once.add(once)
            request.transport.close()
            return web.Response(status=500)
        body = await request.read()
        delay = float(request.headers.get("x-delay", "0"))
        if delay:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                cancelled[tag] = cancelled.get(tag, 0) + 1
                print("cancelled", tag, flush=True)
                raise
        size = int(request.headers.get("x-size", "0"))
        if size:  # a large body of a known pattern, chunked on request
            data = (bytes(range(256)) * (size // 256 + 1))[:size]
            if request.headers.get("x-chunked"):
                resp = web.StreamResponse(headers={"x-replica": name})
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for i in range(0, size, 65536):
                    await resp.write(data[i : i + 65536])
                await resp.write_eof()
                return resp
            return web.Response(body=data, headers={"x-replica": name})
        status = int(request.headers.get("x-status", "200"))
        if name in request.headers.get("x-fail-on", "").split(","):
            status = 503
        payload = {
            "replica": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        return web.json_response(payload, status=status, headers={"x-replica": name})

    async def main():
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def pattern(size: int) -> bytes:
    """What the backend answers to ``x-size: size``."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


REPLICAS = (
    ("orders-0", "127.0.0.2", "v1"),
    ("orders-1", "127.0.0.3", "v1"),
    ("orders-2", "127.0.0.4", "v2"),
)


def base_policy() -> dict[str, Any]:
    """Round robin (so spreads are exact), no ejections unless a test asks, and routes:
    ``x-pin: orders-N`` pins a replica, ``/slow`` (orders-1, 1 s timeout), ``/split``
    (90/10 over version v1/v2), and the rest over every replica."""
    pins = [
        {
            "name": f"pin-{name}",
            "match": {"headers": [{"name": "x-pin", "exact": name}]},
            "backends": [{"labels": {"replica": name}}],
        }
        for name, _, _ in REPLICAS
    ]
    return {
        "balancing": {"algorithm": "round_robin"},
        "outlier_detection": {"consecutive_failures": 100000},
        "routes": [
            *pins,
            {
                "name": "slow",
                "match": {"path_prefix": "/slow"},
                "backends": [{"labels": {"replica": "orders-1"}}],
                "timeout_s": 1.0,
            },
            {
                "name": "split",
                "match": {"path_prefix": "/split"},
                "backends": [
                    {"labels": {"version": "v1"}, "weight": 90},
                    {"labels": {"version": "v2"}, "weight": 10},
                ],
            },
            {"name": "all"},
        ],
    }


def backend_app(name: str, host: str, port: int, tmp: Path) -> Proc:
    app = Proc(
        [sys.executable, "-c", BACKEND_APP, name, host, str(port)], tmp / f"app-{name}.log"
    ).start()
    deadline = time.monotonic() + 20
    while "ready" not in app.output():
        assert app.alive and time.monotonic() < deadline, app.output()
        time.sleep(0.05)
    return app


@dataclass
class L7Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    apps: dict[str, Proc]
    app_ports: dict[str, int]
    orders: dict[str, Sidecar]
    web: Sidecar
    local: int  # the web sidecar's local port for shop/orders:8080
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local}"

    def count(self, replica: str, tag: str = "") -> dict[str, int]:
        status, body = http_get(f"http://127.0.0.1:{self.app_ports[replica]}/__count?tag={tag}")
        assert status == 200, body
        return dict(json.loads(body))

    def tagged(self, tag: str) -> int:
        return sum(self.count(name, tag)["tag"] for name in self.app_ports)

    def total(self) -> int:
        return sum(self.count(name)["total"] for name in self.app_ports)

    def set_policy(self, policy: dict[str, Any]) -> None:
        """PUT the orders policy and wait until the web sidecar runs on it."""
        answer = self.cp.call(
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080, "protocol": "http"}], "policy": policy},
        )
        assert answer.status == 200, answer
        revision = self.cp.revision()
        wait_for(
            lambda: self.web.json("/config_dump")["revision"] >= revision,
            f"the web sidecar reaches revision {revision}",
        )

    def restart_order(self, name: str, sig: int) -> Sidecar:
        old = self.orders[name]
        if old.alive:
            old.signal(sig)
        with contextlib.suppress(Exception):
            old.wait(timeout=20)
        old.kill()
        new = order_sidecar(self, name, old.address, old.inbound_port, old.admin_port)
        self.orders[name] = new.start().wait_ready()
        return new


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, KeyError, IndexError, AssertionError, ValueError):
            if predicate():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting: {what}")


def order_sidecar(
    mesh: L7Mesh, name: str, address: str, inbound_port: int = 0, admin_port: int = 0
) -> Sidecar:
    version = next(v for n, _, v in REPLICAS if n == name)
    sc = Sidecar(
        mesh.cp,
        mesh.tmp,
        "shop/orders",
        mesh.app_ports[name],
        address=address,
        name=name,
        extra=(
            "--app-protocol",
            "http",
            "--label",
            f"version={version}",
            "--label",
            f"replica={name}",
            *mesh.extra.get("orders", ()),
        ),
    )
    if inbound_port:
        sc.inbound_port = inbound_port
    if admin_port:
        sc.admin_port = admin_port
    return sc


def start_l7_mesh(tmp: Path, *, web_extra: tuple[str, ...] = ()) -> L7Mesh:
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", "l7.test")
    local = free_port()
    web_port = free_port()
    web = Sidecar(
        cp,
        tmp,
        "shop/web",
        web_port,
        extra=("--upstream", f"shop/orders:8080=127.0.0.1:{local}", *web_extra),
        name="web",
    )
    mesh = L7Mesh(tmp, cp, {}, {}, {}, web, local)
    try:
        cp.start()
        cp.call(
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080, "protocol": "http"}], "policy": base_policy()},
        )
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80}]})
        for name, address, _ in REPLICAS:
            port = free_port()
            mesh.app_ports[name] = port
            mesh.apps[name] = backend_app(name, "127.0.0.1", port, tmp)
            mesh.orders[name] = order_sidecar(mesh, name, address).start()
        mesh.apps["web"] = echo_app("web", "127.0.0.1", web_port, tmp)
        web.start()
        for sc in [*mesh.orders.values(), web]:
            sc.wait_ready()
        wait_for(
            lambda: len(web.json("/clusters")["clusters"][0]["endpoints"]) == 3,
            "web sees 3 orders endpoints",
        )
    except BaseException:
        stop_l7_mesh(mesh)
        raise
    return mesh


def stop_l7_mesh(mesh: L7Mesh) -> None:
    for p in [mesh.web, *mesh.orders.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes to 127.0.0.1:port; return everything read until the peer closed
    (or the timeout), and whether it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_until_close(s, timeout)


def read_until_close(s: Any, timeout: float) -> tuple[bytes, bool]:
    chunks = []
    deadline = time.monotonic() + timeout
    closed = False
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not data:
            closed = True
            break
        chunks.append(data)
    return b"".join(chunks), closed


def log_lines(proc: Proc, key: str = "start_time") -> list[dict[str, Any]]:
    """The JSON objects in a process's output that have ``key`` (access log lines)."""
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{") and f'"{key}"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def split_responses(data: bytes) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Content-Length-framed HTTP/1.1 responses read back to back: (status line, headers,
    body) each."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        size = int(headers.get("content-length", "0"))
        out.append((lines[0].encode(), headers, rest[:size]))
        data = rest[size:]
    return out
