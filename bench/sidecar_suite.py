"""Sidecar memory (issue: RSS idle, and per 1,000 idle proxied connections): a real
control plane, two real sidecars in explicit mode (web → orders, mutual TLS between
them) and an echo app, all on 127.0.0.1; this process holds the idle connections."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.control_plane_suite import ControlPlaneProcess

ECHO = (
    "import asyncio,sys\n"
    "async def h(r,w):\n"
    "    w.write(b'hi\\n'); await w.drain()\n"
    "    while await r.read(65536): pass\n"
    "    w.close()\n"
    "async def m():\n"
    "    s=await asyncio.start_server(h,'127.0.0.1',int(sys.argv[1]),backlog=4096)\n"
    "    async with s: await s.serve_forever()\n"
    "asyncio.run(m())\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _ready(admin: int, deadline: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        try:
            with opener.open(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"sidecar with admin port {admin} not ready")


def _sidecar(
    cp: ControlPlaneProcess, tmp: Path, service: str, app_port: int, address: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    admin = _free_port()
    args = [
        sys.executable,
        "-m",
        "meshlet",
        "sidecar",
        "run",
        "--service",
        service,
        "--control-plane",
        cp.grpc,
        "--control-plane-mtls",
        cp.grpc_mtls,
        "--ca-bundle",
        str(cp.data_dir / "ca" / "bundle.pem"),
        "--join-token",
        str(cp.data_dir / "join-token"),
        "--cert-dir",
        str(tmp / service.replace("/", "-")),
        "--app-port",
        str(app_port),
        "--app-protocol",
        "tcp",  # the echo app greets first: a declared L4 port, never peeked
        "--mode",
        "explicit",
        "--admin",
        f"127.0.0.1:{admin}",
        "--inbound",
        f"{address}:{_free_port()}",
        "--address",
        address,
        "--log-level",
        "warning",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), admin


def run(quick: bool) -> list[dict[str, Any]]:
    count = 200 if quick else 1000
    procs: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory(prefix="meshlet-bench-sc-") as tmp_s,
        ControlPlaneProcess(Path(tmp_s) / "cp") as cp,
    ):
        tmp = Path(tmp_s)
        try:
            app_port, web_app, local = _free_port(), _free_port(), _free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", ECHO, str(app_port)]))
            procs.append(subprocess.Popen([sys.executable, "-c", ECHO, str(web_app)]))
            orders, orders_admin = _sidecar(cp, tmp, "bench/orders", app_port, "127.0.0.2", [])
            web, web_admin = _sidecar(
                cp,
                tmp,
                "bench/web",
                web_app,
                "127.0.0.3",
                ["--upstream", f"bench/orders:8080=127.0.0.1:{local}"],
            )
            procs += [orders, web]
            deadline = time.monotonic() + 60
            _ready(orders_admin, deadline)
            _ready(web_admin, deadline)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            while time.monotonic() < deadline:  # until web knows the orders endpoint
                with opener.open(f"http://127.0.0.1:{web_admin}/clusters", timeout=2) as r:
                    if any(
                        c["service"] == "bench/orders" and c["endpoints"]
                        for c in json.loads(r.read())["clusters"]
                    ):
                        break
                time.sleep(0.1)
            time.sleep(1.0)
            idle = {"web": _rss_kib(web.pid), "orders": _rss_kib(orders.pid)}
            conns = []
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", local), timeout=10)
                s.recv(3)  # the greeting: the connection crosses both sidecars
                conns.append(s)
            time.sleep(1.0)
            loaded = {"web": _rss_kib(web.pid), "orders": _rss_kib(orders.pid)}
            for s in conns:
                s.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    return [
        {
            "suite": "sidecar",
            "name": "rss_idle",
            "outbound_sidecar_mib": idle["web"] / 1024,
            "inbound_sidecar_mib": idle["orders"] / 1024,
        },
        {
            "suite": "sidecar",
            "name": f"rss_with_{count}_idle_mtls_connections",
            "outbound_kib_per_conn": (loaded["web"] - idle["web"]) / count,
            "inbound_kib_per_conn": (loaded["orders"] - idle["orders"]) / count,
        },
    ]
