"""The sidecar's admin endpoint on its own small HTTP/1.1 server: what curl, a Docker
health check and Prometheus see, over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshlet.runtime import SystemClock
from sidecar.admin import AdminState
from sidecar.admin_server import AdminServer
from sidecar.catalog import Catalog
from sidecar.clusters import Clusters
from sidecar.config import Mode, SidecarConfig
from sidecar.metrics import SidecarMetrics

WAIT_S = 10.0


async def _get(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        data = await reader.read()  # the server closes after one response
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split(" ")[1]), headers, body


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[AdminServer, AdminState, list[str]]]:
    app = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    cfg = SidecarConfig(
        namespace="shop",
        service="orders",
        control_plane="127.0.0.1:1",
        control_plane_mtls="127.0.0.1:1",
        ca_bundle=tmp_path / "bundle.pem",
        cert_dir=tmp_path,
        app_port=app_port,
        mode=Mode.EXPLICIT,
        admin=("127.0.0.1", 0),
    )
    events: list[str] = []

    async def drain() -> None:
        events.append("drain")

    state = AdminState(
        cfg=cfg,
        metrics=SidecarMetrics(lambda: ()),
        clusters=Clusters(SystemClock(), random.Random(1)),
        catalog=lambda: Catalog(),
        certs=lambda: None,
        discovery=lambda: {"connected": False, "revision": 0, "has_snapshot": False},
        drain=drain,
        quit=lambda: events.append("quit"),
    )
    server = AdminServer(state)
    await server.start("127.0.0.1", 0)
    try:
        yield server, state, events
    finally:
        await server.close()
        app.close()


async def test_ready_says_why_not_then_metrics_and_clusters_answer(admin: Any) -> None:
    server, _, _ = admin
    status, headers, body = await _get(server.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert b"no workload certificate yet" in body
    status, headers, body = await _get(server.port, b"GET /stats/prometheus HTTP/1.1\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"# TYPE" in body
    status, _, body = await _get(server.port, b"GET /clusters?format=json HTTP/1.0\r\n\r\n")
    assert status == 200 and b'"clusters"' in body


async def test_mutating_paths_take_post_only(admin: Any) -> None:
    server, state, events = admin
    status, headers, _ = await _get(server.port, b"GET /quitquitquit HTTP/1.1\r\n\r\n")
    assert (status, headers["allow"]) == (405, "POST")
    assert events == []
    req = b"POST /healthcheck/fail HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    status, _, _ = await _get(server.port, req)
    assert status == 200 and state.failing
    status, _, _ = await _get(server.port, b"POST /quitquitquit HTTP/1.1\r\n\r\n")
    assert status == 200
    async with asyncio.timeout(WAIT_S):
        while "quit" not in events:
            await asyncio.sleep(0.01)


async def test_unknown_paths_and_garbage_get_an_answer_not_a_hang(admin: Any) -> None:
    server, _, _ = admin
    assert (await _get(server.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
    assert (await _get(server.port, b"hello\r\n\r\n"))[0] == 400
    huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await _get(server.port, huge))[0] == 431
    status, headers, body = await _get(server.port, b"HEAD /ready HTTP/1.1\r\n\r\n")
    assert status == 503 and body == b"" and int(headers["content-length"]) > 0


def test_an_idle_sidecar_imports_no_aiohttp_for_its_admin_endpoint() -> None:
    code = "import sys, sidecar.admin, sidecar.admin_server; print('aiohttp' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"
