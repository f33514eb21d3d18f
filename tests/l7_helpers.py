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


# ---- HTTP/2 and gRPC (tests/integration/test_sidecar_l7_h2.py) -------------------------------
#
# `shop/orders:8080` (protocol grpc) has two replicas, each a grpc.aio server (generic
# handlers, raw bytes) behind a sidecar; `shop/pages:8080` (protocol http) has one, an h2c
# server built on sidecar.h2conn. The `shop/web` sidecar has an explicit upstream to each.

GRPC_APP = textwrap.dedent(
    """
    import asyncio, hashlib, json, sys
    import grpc
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arrived, counts, cancelled = [0], {}, {}

    def seen(context):
        md = dict(context.invocation_metadata())
        tag = md.get("x-tag", "")
        counts[tag] = counts.get(tag, 0) + 1
        return md, tag

    class Arrivals(grpc.aio.ServerInterceptor):
        # Every call that reaches the app, whether or not a handler ends up running it.
        async def intercept_service(self, continuation, details):
            if details.method != "/test.Echo/Stats":
                arrived[0] += 1
            return await continuation(details)

    async def unary(request, context):
        seen(context)
        await context.send_initial_metadata((("x-replica", name),))
        context.set_trailing_metadata((("x-trailer", "yes"), ("x-replica", name)))
        return request[::-1]

    async def whoami(request, context):
        md, _ = seen(context)
        left = context.time_remaining()
        return json.dumps({"replica": name, "metadata": md, "time_remaining": left}).encode()

    async def bidi(requests, context):
        seen(context)
        async for msg in requests:
            yield b"echo:" + msg

    async def server_stream(request, context):
        seen(context)
        for i in range(int(request)):
            yield b"item-%d" % i

    async def client_stream(requests, context):
        seen(context)
        n = size = 0
        async for msg in requests:
            n, size = n + 1, size + len(msg)
        return b"%d messages, %d bytes" % (n, size)

    async def slow(request, context):
        _, tag = seen(context)
        try:
            await asyncio.sleep(float(request))
        except asyncio.CancelledError:
            cancelled[tag] = cancelled.get(tag, 0) + 1
            print("cancelled", tag, flush=True)
            raise
        return b"slept"

    async def missing(request, context):
        seen(context)
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")

    async def flaky(request, context):
        md, _ = seen(context)
        if name in md.get("x-fail-on", "").split(","):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try another replica")
        return name.encode() + b":" + hashlib.sha256(request).hexdigest().encode()

    async def stats(request, context):
        tag = request.decode()
        return json.dumps({"arrived": arrived[0], "tag": counts.get(tag, 0),
                           "cancelled": cancelled.get(tag, 0)}).encode()

    async def main():
        u, ss = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": u(unary), "Whoami": u(whoami), "Slow": u(slow), "Missing": u(missing),
            "Flaky": u(flaky), "Stats": u(stats), "ServerStream": ss(server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        })
        server = grpc.aio.server(interceptors=[Arrivals()])
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
    """
)

# Prints "request <path> <x-tag>" for every stream and "reset <x-tag>" when one is reset.
# /echo: the body back, then trailers with its size; /slow?S: answers after S seconds;
# anything else: JSON with the replica, the path and the headers seen (x-status: N).
H2C_APP = textwrap.dedent(
    """
    import asyncio, json, sys
    from sidecar.h2conn import H2Connection, H2Limits, StreamHandler
    from sidecar.relay import PlainSide
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Echo(StreamHandler):
        size = 0
        def on_data(self, stream, data):
            self.size += len(data)
            stream.send_data(data)
        def on_end(self, stream):
            stream.send_trailers([(b"x-echo-bytes", str(self.size).encode())])

    class Watch(StreamHandler):
        def __init__(self, tag):
            self.tag = tag
        def on_reset(self, stream, code):
            print("reset", self.tag, flush=True)

    def on_stream(stream):
        head = dict(stream.headers)
        path, tag = head[b":path"].decode(), head.get(b"x-tag", b"-").decode()
        print("request", path, tag, flush=True)
        if path.startswith("/echo"):
            stream.send_headers([(b":status", b"200")])
            stream.on_sent = stream.consumed
            stream.set_handler(Echo())
        elif path.startswith("/slow"):
            stream.set_handler(Watch(tag))
            def answer():
                if stream.reset_code is None:
                    stream.send_headers([(b":status", b"200")])
                    stream.send_data(b"slow", end_stream=True)
            asyncio.get_running_loop().call_later(float(path.partition("?")[2]), answer)
        else:
            body = json.dumps({"replica": name, "path": path, "headers": [
                [k.decode(), v.decode()] for k, v in stream.headers]}).encode()
            stream.send_headers([(b":status", head.get(b"x-status", b"200")),
                                 (b"content-type", b"application/json"),
                                 (b"content-length", b"%d" % len(body)),
                                 (b"x-replica", name.encode())])
            stream.send_data(body, end_stream=True)
            stream.set_handler(StreamHandler())

    class Side(PlainSide):
        def connection_made(self, transport):
            super().connection_made(transport)
            # Lenient like common servers: the mesh adds fields to what the app sent.
            limits = H2Limits(max_header_count=1000, max_header_list_size=100 * 1024)
            H2Connection(self, client=False, limits=limits, on_stream=on_stream).start()

    async def main():
        await asyncio.get_running_loop().create_server(Side, host, port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)

H2_REPLICAS = (("orders-0", "127.0.0.2"), ("orders-1", "127.0.0.3"))


def h2_policy() -> dict[str, Any]:
    """Round robin, no ejections; ``x-route: timeout`` takes a route with a 0.5 s timeout."""
    return {
        "balancing": {"algorithm": "round_robin"},
        "outlier_detection": {"consecutive_failures": 100000},
        "routes": [
            {
                "name": "timeout",
                "match": {"headers": [{"name": "x-route", "exact": "timeout"}]},
                "timeout_s": 0.5,
            },
            {"name": "slow", "match": {"path_prefix": "/slow"}, "timeout_s": 0.5},
            {"name": "all"},
        ],
    }


@dataclass
class H2Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    apps: dict[str, Proc]
    app_ports: dict[str, int]
    sidecars: dict[str, Sidecar]  # orders-0, orders-1, pages-0, web
    grpc_local: int  # web's local port for shop/orders:8080 (grpc)
    http_local: int  # web's local port for shop/pages:8080 (http)

    @property
    def web(self) -> Sidecar:
        return self.sidecars["web"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_local}"

    def stats(self, replica: str, tag: str = "") -> dict[str, int]:
        """The gRPC app's counters, asked directly (not through the mesh)."""
        import grpc

        with grpc.insecure_channel(
            f"127.0.0.1:{self.app_ports[replica]}", options=[("grpc.enable_http_proxy", 0)]
        ) as ch:
            answer = ch.unary_unary("/test.Echo/Stats")(tag.encode(), timeout=5)
        return dict(json.loads(answer))

    def arrived(self) -> int:
        return sum(self.stats(name)["arrived"] for name, _ in H2_REPLICAS)

    def set_policy(self, policy: dict[str, Any], service: str = "orders") -> None:
        """PUT the policy of ``service`` (orders: grpc, pages: http) and wait until the web
        sidecar runs on it."""
        protocol = {"orders": "grpc", "pages": "http"}[service]
        answer = self.cp.call(
            "PUT",
            f"/v1/services/shop/{service}",
            {"ports": [{"port": 8080, "protocol": protocol}], "policy": policy},
        )
        assert answer.status == 200, answer
        revision = self.cp.revision()
        wait_for(
            lambda: self.web.json("/config_dump")["revision"] >= revision,
            f"the web sidecar reaches revision {revision}",
        )


def _app(script: str, name: str, port: int, tmp: Path) -> Proc:
    app = Proc(
        [sys.executable, "-c", script, name, "127.0.0.1", str(port)], tmp / f"app-{name}.log"
    ).start()
    deadline = time.monotonic() + 20
    while "ready" not in app.output():
        assert app.alive and time.monotonic() < deadline, app.output()
        time.sleep(0.05)
    return app


def start_h2_mesh(tmp: Path) -> H2Mesh:
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", "h2.test")
    grpc_local, http_local, web_port = free_port(), free_port(), free_port()
    mesh = H2Mesh(tmp, cp, {}, {}, {}, grpc_local, http_local)
    try:
        cp.start()
        for svc, protocol in (("orders", "grpc"), ("pages", "http")):
            answer = cp.call(
                "PUT",
                f"/v1/services/shop/{svc}",
                {"ports": [{"port": 8080, "protocol": protocol}], "policy": h2_policy()},
            )
            assert answer.status in (200, 201), answer
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80, "protocol": "tcp"}]})
        replicas = [(n, a, "shop/orders", GRPC_APP, "grpc") for n, a in H2_REPLICAS]
        replicas.append(("pages-0", "127.0.0.4", "shop/pages", H2C_APP, "http"))
        for name, address, service, script, protocol in replicas:
            port = mesh.app_ports[name] = free_port()
            mesh.apps[name] = _app(script, name, port, tmp)
            mesh.sidecars[name] = Sidecar(
                cp, tmp, service, port, address=address, name=name,
                extra=("--app-protocol", protocol, "--label", f"replica={name}"),
            ).start()  # fmt: skip
        mesh.apps["web"] = echo_app("web", "127.0.0.1", web_port, tmp)
        mesh.sidecars["web"] = Sidecar(
            cp, tmp, "shop/web", web_port, name="web",
            extra=("--upstream", f"shop/orders:8080=127.0.0.1:{grpc_local}",
                   "--upstream", f"shop/pages:8080=127.0.0.1:{http_local}"),
        ).start()  # fmt: skip
        for sc in mesh.sidecars.values():
            sc.wait_ready()

        def endpoints() -> dict[str, int]:
            return {
                c["service"]: len(c["endpoints"]) for c in mesh.web.json("/clusters")["clusters"]
            }

        wait_for(
            lambda: endpoints().get("shop/orders") == 2 and endpoints().get("shop/pages") == 1,
            "web sees 2 orders and 1 pages endpoints",
        )
    except BaseException:
        stop_h2_mesh(mesh)
        raise
    return mesh


def stop_h2_mesh(mesh: H2Mesh) -> None:
    for p in [*mesh.sidecars.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()
