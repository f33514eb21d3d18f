"""Control-plane figures (issue: registration to the last of 1,000 watchers p50/p99; a
10,000-endpoint snapshot's size and encode time; RSS at 10,000 endpoints).

A real `meshlet control-plane run` in a subprocess on 127.0.0.1; watchers are real
grpc.aio streams over TLS from this process; registrations go through the REST API.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.stats import percentile
from control_plane.discovery_wire import snapshot_response
from meshlet.discovery_client import (
    Delta,
    DiscoveryStub,
    channel,
    decode_response,
    watch,
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


async def _fanout(cp: ControlPlaneProcess, watchers: int, registrations: int) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {cp.token}"}
    seen: dict[str, list[float]] = {}
    done: dict[str, asyncio.Event] = {}
    ready = 0
    all_ready = asyncio.Event()

    async def watcher(stub: DiscoveryStub, n: int) -> None:
        nonlocal ready
        req = watch_request(client_id=f"bench-{n}", kind="cli")
        first = True
        async for update in watch(stub, req, idle_timeout_s=120):
            now = time.perf_counter()
            if first:
                first = False
                ready += 1
                if ready == watchers:
                    all_ready.set()
            if isinstance(update, Delta):
                for ev in update.events:
                    times = seen.get(ev.key)
                    if times is not None:
                        times.append(now)
                        if len(times) == watchers:
                            done[ev.key].set()

    per_channel = 100
    token = (cp.data_dir / "join-token").read_text().strip()
    count = (watchers + per_channel - 1) // per_channel
    channels = [channel(cp.grpc, cp.bundle, join_token=token) for _ in range(count)]
    tasks = [
        asyncio.create_task(watcher(DiscoveryStub(channels[i // per_channel]), i))  # type: ignore[no-untyped-call]
        for i in range(watchers)
    ]
    last, every = [], []
    try:
        async with aiohttp.ClientSession() as http:
            await http.put(
                f"{cp.api}/v1/services/bench/target", json={"ports": [{"port": 8080}]}, headers=auth
            )
            async with asyncio.timeout(120):
                await all_ready.wait()
            await asyncio.sleep(0.5)
            for i in range(registrations):
                key = f"probe-{i}"
                seen[key], done[key] = [], asyncio.Event()
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
                delays = [t - t0 for t in seen[key]]
                last.append(max(delays))
                every.extend(delays)
                await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    return {
        "suite": "control-plane",
        "name": f"registration_to_{watchers}_watchers",
        "registrations": registrations,
        "last_watcher_p50_ms": percentile(last, 50) * 1e3,
        "last_watcher_p99_ms": percentile(last, 99) * 1e3,
        "any_watcher_p50_ms": percentile(every, 50) * 1e3,
        "any_watcher_p99_ms": percentile(every, 99) * 1e3,
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
