"""The apps inside the lab's containers: they know nothing about the mesh and dial
services by name, as apps in Swarm do.

For (``python3 - KIND ...``, the source on stdin, as the container's user):
- ``http``: an aiohttp server on 127.0.0.1:PORT answering JSON with which replica (and
  node) served; with ``--call URL`` every request first calls URL (web → orders) and
  nests that answer, or answers 502 when it fails;
- ``grpc``: a grpcio server on 127.0.0.1:PORT with one unary method,
  ``/lab.Prices/Get`` (``google.protobuf.StringValue`` in and out), answering the price
  and the replica;
- ``load``: the traffic: paced, bounded generators (HTTP to web, gRPC to prices,
  redis-cli INCR to redis, each one request at a time with a 5 s timeout, for at most
  ``--duration`` seconds), counting what a client sees; ``GET /stats`` on
  127.0.0.1:PORT returns the counts (ok, failed, by replica, latency percentiles).

Each prints ``ready`` once it listens and exits 0 on SIGTERM.

Must never: import meshlet or anything outside the standard library, aiohttp, grpcio and
protobuf (it runs under the system's python3 as an unprivileged user, like the app of a
container image), listen on anything but 127.0.0.1 (its sidecar is the only way in), or
send without a bound (every generator is paced, sequential and stops by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

REQUEST_TIMEOUT_S = 5.0
GRPC_METHOD = "/lab.Prices/Get"
GRPC_CALLS_PER_CHANNEL = 20  # a new channel (connection) now and then: L4 balancing shows


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_http(args: argparse.Namespace) -> None:
    import aiohttp
    from aiohttp import web

    session = (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), trust_env=False
        )
        if args.call
        else None
    )

    async def handle(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "service": args.service,
            "replica": args.name,
            "node": args.node,
            "path": request.path,
        }
        if session is not None:
            try:
                async with session.get(args.call) as r:
                    text = await r.text()
                    if r.status != 200:
                        body["error"] = f"{args.call} answered {r.status}: {text[:200]}"
                        return web.json_response(body, status=502)
                    body["upstream"] = json.loads(text)
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                body["error"] = f"{args.call}: {e!r}"
                return web.json_response(body, status=502)
        return web.json_response(body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print("ready", flush=True)
    try:
        await _until_signal()
    finally:
        if session is not None:
            await session.close()
        await runner.cleanup()


def _price(item: str) -> float:
    return round(sum(item.encode()) % 1000 / 100 + 1, 2)


async def serve_grpc(args: argparse.Namespace) -> None:
    import grpc
    from google.protobuf import wrappers_pb2

    async def get(request: Any, context: Any) -> Any:
        answer = {
            "item": request.value,
            "price": _price(request.value),
            "replica": args.name,
            "node": args.node,
        }
        return wrappers_pb2.StringValue(value=json.dumps(answer))

    handler = grpc.method_handlers_generic_handler(
        "lab.Prices",
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=wrappers_pb2.StringValue.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print("ready", flush=True)
    try:
        await _until_signal()
    finally:
        await server.stop(1)


class Target:
    """What one generator saw, as a client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ok = 0
        self.failed = 0
        self.replicas: collections.Counter[str] = collections.Counter()
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=2000)
        self.errors: collections.deque[str] = collections.deque(maxlen=5)
        self.done = False

    def record(self, started: float, ok: bool, replicas: list[str], error: str = "") -> None:
        if ok:
            self.ok += 1
            self.latencies_ms.append((time.monotonic() - started) * 1000)
            self.replicas.update(replicas)
        else:
            self.failed += 1
            self.errors.append(f"{time.strftime('%H:%M:%S')} {error[:300]}")

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "replicas": dict(sorted(self.replicas.items())),
            "p50_ms": self.percentile(0.5),
            "p99_ms": self.percentile(0.99),
            "errors": list(self.errors),
            "done": self.done,
        }


async def _paced(
    per_s: float, deadline: float, target: Target, once: Callable[[], Awaitable[None]]
) -> None:
    if per_s <= 0:
        target.done = True
        return
    interval = 1.0 / per_s
    due = time.monotonic()
    while time.monotonic() < deadline:
        await once()
        due += interval
        now = time.monotonic()
        if due < now - 1.0:  # fell behind (slow answers): do not burst to catch up
            due = now
        await asyncio.sleep(max(0.0, due - now))
    target.done = True


async def _resolvable(names: list[str], limit_s: float) -> None:
    """Wait until every name resolves (the container's DNS — its sidecar — is up), so the
    first requests do not fail only because the mesh was still starting."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + limit_s
    for name in names:
        while True:
            try:
                await loop.getaddrinfo(name, None)
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(
                        f"{name} does not resolve after {limit_s:.0f}s; sending anyway", flush=True
                    )
                    return
                await asyncio.sleep(0.2)


def _chain(answer: dict[str, Any]) -> list[str]:
    """Every replica named along the call chain (web-0, then the orders replica it called)."""
    out = []
    while isinstance(answer, dict):
        if "replica" in answer:
            out.append(str(answer["replica"]))
        answer = answer.get("upstream")  # type: ignore[assignment]
    return out


async def run_load(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRPC_DNS_RESOLVER", "native")  # getaddrinfo: resolv.conf, as libc
    import aiohttp
    import grpc
    from aiohttp import web
    from google.protobuf import wrappers_pb2

    deadline = time.monotonic() + args.duration
    targets = {name: Target(name) for name in ("http", "grpc", "redis")}
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), trust_env=False
    )

    async def http_once() -> None:
        t, started = targets["http"], time.monotonic()
        try:
            async with session.get(args.http_url) as r:
                text = await r.text()
            if r.status != 200:
                t.record(started, False, [], f"HTTP {r.status}: {text[:200]}")
                return
            t.record(started, True, _chain(json.loads(text)))
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            t.record(started, False, [], repr(e))

    channel: list[Any] = []
    calls = [0]

    async def grpc_once() -> None:
        t, started = targets["grpc"], time.monotonic()
        if not channel or calls[0] % GRPC_CALLS_PER_CHANNEL == 0:
            if channel:
                await channel.pop().close()
            channel.append(grpc.aio.insecure_channel(args.grpc_target))
        calls[0] += 1
        call = channel[0].unary_unary(
            GRPC_METHOD,
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        try:
            reply = await call(wrappers_pb2.StringValue(value="apple"), timeout=REQUEST_TIMEOUT_S)
            t.record(started, True, _chain(json.loads(reply.value)))
        except grpc.aio.AioRpcError as e:
            t.record(started, False, [], f"{e.code().name}: {e.details()}")
        except ValueError as e:
            t.record(started, False, [], repr(e))

    async def redis_once() -> None:
        t, started = targets["redis"], time.monotonic()
        argv = ["redis-cli", "-h", args.redis_host, "-p", str(args.redis_port), "INCR", "lab:hits"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), REQUEST_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            t.record(started, False, [], "redis-cli: no answer in 5s")
            return
        text = out.decode(errors="replace").strip()
        if proc.returncode == 0 and text.isdigit():
            t.record(started, True, [f"{args.redis_host}"])
        else:
            t.record(started, False, [], f"redis-cli exit {proc.returncode}: {text[:200]}")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "elapsed_s": round(args.duration - max(0.0, deadline - time.monotonic()), 1),
                "targets": {name: t.as_json() for name, t in targets.items()},
            }
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print("ready", flush=True)
    host = args.http_url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    await _resolvable([host, args.grpc_target.rsplit(":", 1)[0], args.redis_host], 60.0)
    deadline = time.monotonic() + args.duration
    print("sending", flush=True)
    generators = [
        asyncio.ensure_future(_paced(args.http_per_s, deadline, targets["http"], http_once)),
        asyncio.ensure_future(_paced(args.grpc_per_s, deadline, targets["grpc"], grpc_once)),
        asyncio.ensure_future(_paced(args.redis_per_s, deadline, targets["redis"], redis_once)),
    ]
    try:
        await _until_signal()
    finally:
        for g in generators:
            g.cancel()
        await asyncio.gather(*generators, return_exceptions=True)
        await session.close()
        for c in channel:
            await c.close()
        await runner.cleanup()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lab_apps", description=__doc__)
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in ("http", "grpc"):
        s = sub.add_parser(kind)
        s.add_argument("--name", required=True, help="replica name, e.g. orders-1")
        s.add_argument("--service", required=True, help="NS/NAME")
        s.add_argument("--node", default="")
        s.add_argument("--port", type=int, required=True)
        if kind == "http":
            s.add_argument("--call", default="", help="URL to call for every request")
    s = sub.add_parser("load")
    s.add_argument("--port", type=int, required=True, help="stats on 127.0.0.1:PORT")
    s.add_argument("--http-url", required=True)
    s.add_argument("--http-per-s", type=float, default=20.0)
    s.add_argument("--grpc-target", required=True)
    s.add_argument("--grpc-per-s", type=float, default=5.0)
    s.add_argument("--redis-host", required=True)
    s.add_argument("--redis-port", type=int, default=6379)
    s.add_argument("--redis-per-s", type=float, default=2.0)
    s.add_argument("--duration", type=float, default=3600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    run = {"http": serve_http, "grpc": serve_grpc, "load": run_load}[args.kind]
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
