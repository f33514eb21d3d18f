"""Control-plane figures (issue: registration to the last of 1,000 watchers p50/p99; a
10,000-endpoint snapshot's size and encode time; RSS at 10,000 endpoints).

A real `meshlet control-plane run` in a subprocess on 127.0.0.1; watchers are real
grpc.aio streams over TLS from this process; registrations go through the REST API.

What the registration figure times: from the POST to the Delta carrying the endpoint
arriving on each watcher's stream (protobuf parsed, the change's key read). It does not
include turning the Delta into model objects (JSON + validation): a real watcher does that
once in its own process, while 1,000 of them here would do it 1,000 times in one process
and mostly time this client. That decode is reported on its own, per Delta
(``delta_decode_ms_p50``), to add to the figure for a single sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bench.stats import percentile
from control_plane.discovery_wire import snapshot_response
from meshlet.discovery_client import (
    DiscoveryStub,
    channel,
    decode_response,
    watch_request,
)
from meshlet.model import Endpoint, Service, ServicePort, Snapshot
from meshlet.proto import mesh_pb2


def _snapshot(endpoints: int, services: int) -> Snapshot:
    svcs = {
        f"bench/s{i}": Service(
            namespace="bench",
            name=f"s{i}",
            ports=(ServicePort(port=8080),),
            vip=f"198.19.{128 + i // 250}.{i % 250 + 1}",
        )
        for i in range(services)
    }
    eps = {
        f"e{i}": Endpoint(
            id=f"e{i}",
            namespace="bench",
            service=f"s{i % services}",
            address=f"198.19.{i // 250}.{i % 250 + 1}",
            app_port=8080,
            identity=f"spiffe://bench.local/ns/bench/sa/s{i % services}",
            labels={"version": "v1"},
        )
        for i in range(endpoints)
    }
    return Snapshot(revision=endpoints + services, services=svcs, endpoints=eps)


def snapshot_figures(quick: bool) -> dict[str, Any]:
    snap = _snapshot(10_000, 1_000)
    rounds = 3 if quick else 10
    encode, decode, size = [], [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        raw = snapshot_response(snap).SerializeToString()
        encode.append(time.perf_counter() - t0)
        size = len(raw)
        t0 = time.perf_counter()
        decode_response(mesh_pb2.WatchResponse.FromString(raw))
        decode.append(time.perf_counter() - t0)
    return {
        "suite": "control-plane",
        "name": "snapshot_10k_endpoints",
        "bytes": size,
        "encode_ms_p50": percentile(encode, 50) * 1e3,
        "decode_ms_p50": percentile(decode, 50) * 1e3,
    }


class ControlPlaneProcess:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ControlPlaneProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlet",
                "control-plane",
                "run",
                "--data-dir",
                str(self.data_dir),
                "--api",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--grpc-mtls",
                "127.0.0.1:0",
                "--trust-domain",
                "bench.local",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        info = self.data_dir / "control-plane.json"
        while not info.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the control plane did not start")
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.api, self.grpc, self.grpc_mtls = (
            f"http://{data['api']}",
            data["grpc"],
            data["grpc_mtls"],
        )
        self.token = (self.data_dir / "admin-token").read_text().strip()
        self.bundle = (self.data_dir / "ca" / "bundle.pem").read_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


WATCHER_PROCESSES = 2  # the watchers' gRPC reads spread like real sidecars', one per core
PER_CHANNEL = 100  # watch streams sharing one TLS connection


def _watch_group(
    address: str, bundle: bytes, token: str, first: int, count: int, conn: Connection
) -> None:
    """A worker process: ``count`` watchers; reports on ``conn`` when all are ready and, per
    probe endpoint, when all of them got it (with the arrival times); any message stops it."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_watch_group_async(address, bundle, token, first, count, conn))


async def _watch_group_async(
    address: str, bundle: bytes, token: str, first: int, count: int, conn: Connection
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(conn.fileno(), stop.set)  # a message or EOF
    seen: dict[str, list[float]] = {}
    ready = 0

    async def watcher(stub: DiscoveryStub, n: int) -> None:
        nonlocal ready
        req = watch_request(client_id=f"bench-{n}", kind="cli")
        response: mesh_pb2.WatchResponse
        async for response in stub.Watch(req):
            now = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
            if response.WhichOneof("body") != "delta":
                if response.WhichOneof("body") == "snapshot":
                    ready += 1
                    if ready == count:
                        conn.send(("ready",))
                continue
            for change in response.delta.changes:
                key = change.object.key
                if not key.startswith("probe-"):
                    continue
                times = seen.setdefault(key, [])
                times.append(now)
                if n == 0:  # what one sidecar adds on top: the Delta into model objects
                    t0 = time.perf_counter()
                    decode_response(response)
                    conn.send(("decode", time.perf_counter() - t0))
                if len(times) == count:
                    conn.send(("seen", key, seen.pop(key)))

    channels = [channel(address, bundle, join_token=token) for _ in range(0, count, PER_CHANNEL)]
    tasks = [
        asyncio.create_task(watcher(DiscoveryStub(channels[i // PER_CHANNEL]), first + i))  # type: ignore[no-untyped-call]
        for i in range(count)
    ]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()


async def _fanout(cp: ControlPlaneProcess, watchers: int, registrations: int) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {cp.token}"}
    seen: dict[str, list[float]] = {}
    groups_done: dict[str, int] = {}
    done: dict[str, asyncio.Event] = {}
    decode: list[float] = []
    ready = 0
    all_ready = asyncio.Event()
    failed: list[str] = []
    loop = asyncio.get_running_loop()
    token = (cp.data_dir / "join-token").read_text().strip()
    ctx = multiprocessing.get_context("spawn")  # no fork under a running loop and gRPC
    procs = min(WATCHER_PROCESSES, watchers)
    conns: list[Connection] = []
    workers: list[Any] = []

    def wake_all() -> None:
        all_ready.set()
        for event in done.values():
            event.set()

    def on_message(conn: Connection) -> None:
        nonlocal ready
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            failed.append("a watcher process ended early")
            wake_all()
            return
        if msg[0] == "ready":
            ready += 1
            if ready == procs:
                all_ready.set()
        elif msg[0] == "decode":
            decode.append(msg[1])
        elif msg[0] == "seen":
            key, times = msg[1], msg[2]
            seen.setdefault(key, []).extend(times)
            groups_done[key] = groups_done.get(key, 0) + 1
            if groups_done[key] == procs and key in done:
                done[key].set()

    for g in range(procs):
        first, end = g * watchers // procs, (g + 1) * watchers // procs
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_watch_group,
            args=(cp.grpc, cp.bundle, token, first, end - first, child),
            daemon=True,
        )
        proc.start()
        child.close()
        conns.append(parent)
        workers.append(proc)
        loop.add_reader(parent.fileno(), on_message, parent)
    last, every = [], []
    try:
        async with aiohttp.ClientSession() as http:
            await http.put(
                f"{cp.api}/v1/services/bench/target", json={"ports": [{"port": 8080}]}, headers=auth
            )
            async with asyncio.timeout(120):
                await all_ready.wait()
            if failed:
                raise RuntimeError(failed[0])
            await asyncio.sleep(0.5)
            for i in range(registrations):
                key = f"probe-{i}"
                done[key] = asyncio.Event()
                t0 = time.perf_counter()
                body = {
                    "id": key,
                    "namespace": "bench",
                    "service": "target",
                    "address": f"198.19.0.{i + 1}",
                    "app_port": 8080,
                }
                async with http.post(f"{cp.api}/v1/endpoints", json=body, headers=auth) as r:
                    assert r.status in (200, 201), await r.text()
                async with asyncio.timeout(60):
                    await done[key].wait()
                if failed:
                    raise RuntimeError(failed[0])
                delays = [t - t0 for t in seen.pop(key)]
                last.append(max(delays))
                every.extend(delays)
                await asyncio.sleep(0.05)
    finally:
        for conn in conns:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(conn.fileno())
                conn.send(("stop",))
        for proc in workers:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()
    return {
        "suite": "control-plane",
        "name": f"registration_to_{watchers}_watchers",
        "registrations": registrations,
        "watcher_processes": procs,
        "last_watcher_p50_ms": percentile(last, 50) * 1e3,
        "last_watcher_p99_ms": percentile(last, 99) * 1e3,
        "any_watcher_p50_ms": percentile(every, 50) * 1e3,
        "any_watcher_p99_ms": percentile(every, 99) * 1e3,
        "delta_decode_ms_p50": percentile(decode, 50) * 1e3,
    }


async def _fill(cp: ControlPlaneProcess, endpoints: int) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {cp.token}"}
    rss_before = cp.rss_kib()
    sem = asyncio.Semaphore(16)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        for s in range(100):
            await http.put(
                f"{cp.api}/v1/services/fill/s{s}", json={"ports": [{"port": 8080}]}, headers=auth
            )

        async def register(i: int) -> None:
            body = {
                "id": f"fill-{i}",
                "namespace": "fill",
                "service": f"s{i % 100}",
                "address": f"198.19.{64 + i // 250}.{i % 250 + 1}",
                "app_port": 8080,
            }
            async with sem, http.post(f"{cp.api}/v1/endpoints", json=body, headers=auth) as r:
                assert r.status in (200, 201), await r.text()

        await asyncio.gather(*(register(i) for i in range(endpoints)))
    elapsed = time.perf_counter() - t0
    return {
        "suite": "control-plane",
        "name": f"rss_at_{endpoints}_endpoints",
        "rss_mib": cp.rss_kib() / 1024,
        "rss_empty_mib": rss_before / 1024,
        "registrations_per_s": endpoints / elapsed,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    rows = [snapshot_figures(quick)]
    with (
        tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp,
        ControlPlaneProcess(Path(tmp) / "cp") as cp,
    ):
        rows.append(
            asyncio.run(
                _fanout(cp, watchers=200 if quick else 1000, registrations=5 if quick else 20)
            )
        )
        rows.append(asyncio.run(_fill(cp, 2_000 if quick else 10_000)))
    return rows
