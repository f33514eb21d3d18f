"""The control-plane process as operators run it: first start (files and modes), SIGTERM
(exit 0, JSON logs), restart on the same data dir (nothing lost, nothing renumbered),
kill -9 in the middle of writes (every acknowledged change survives) and admin auth."""

from __future__ import annotations

import json
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess, call

pytestmark = pytest.mark.integration

POLICY = {
    "retries": {"attempts": 2},
    "circuit_breaker": {"max_requests": 64},
    "routes": [
        {
            "name": "split",
            "backends": [
                {"labels": {"version": "v1"}, "weight": 90},
                {"labels": {"version": "v2"}, "weight": 10},
            ],
        }
    ],
}


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess(tmp_path / "data")
    try:
        yield proc
    finally:
        proc.kill()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_tokens_and_sigterm_exits_0(cp: ControlPlaneProcess) -> None:
    cp.start()
    assert mode(cp.data_dir) == 0o700
    for name in ("admin-token", "join-token"):
        assert mode(cp.data_dir / name) == 0o600, name
        assert len((cp.data_dir / name).read_text().strip()) >= 32
    assert cp.token != (cp.data_dir / "join-token").read_text().strip()
    info = json.loads((cp.data_dir / "control-plane.json").read_text())
    assert set(info) >= {"pid", "api", "grpc", "trust_domain"}
    assert info["pid"] == cp.proc.pid and info["trust_domain"] == "mesh.local"

    started = time.monotonic()
    assert cp.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    lines = [line for line in cp.stderr().splitlines() if line.strip()]
    assert lines, "the control plane logged nothing"
    entries = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    assert all({"ts", "level", "msg"} <= set(e) for e in entries)
    messages = [e["msg"] for e in entries]
    assert "control plane serving" in messages and "control plane stopping" in messages


def test_restart_keeps_everything(cp: ControlPlaneProcess) -> None:
    cp.start()
    token = cp.token
    for name in ("orders", "web"):
        body = {"ports": [{"port": 8080, "protocol": "http"}], "policy": POLICY}
        assert cp.call("PUT", f"/v1/services/shop/{name}", body).status == 201
    node = {"underlay_address": "198.18.0.2", "vtep_mac": "02:42:c6:12:00:02"}
    assert cp.call("PUT", "/v1/nodes/node-a", node).status == 201
    for i, version in enumerate(("v1", "v2"), start=1):
        ep = {
            "id": f"orders-{i}",
            "namespace": "shop",
            "service": "orders",
            "address": f"198.19.0.{10 + i}",
            "app_port": 8080,
            "node": "node-a",
            "labels": {"version": version},
        }
        assert cp.call("POST", "/v1/endpoints", ep).status == 201
    before = cp.call("GET", "/v1/snapshot")
    assert {s["vip"] for s in before.data["services"]} == {"198.19.128.1", "198.19.128.2"}

    assert cp.stop(signal.SIGTERM) == 0
    assert not (cp.data_dir / "control-plane.json").exists()
    cp.start()

    assert cp.token == token  # the admin token survives a restart
    after = cp.call("GET", "/v1/snapshot")
    assert after.index == before.index
    assert after.data == before.data  # same VIPs, subnet, endpoints, policy, revision
    assert after.data["nodes"][0]["subnet"] == before.data["nodes"][0]["subnet"]
    # The next service gets the next VIP: allocation state came back too.
    put = cp.call("PUT", "/v1/services/shop/new", {"ports": [{"port": 1}]})
    assert put.data["vip"] == "198.19.128.3"
    assert put.index == before.index + 1


def test_kill_9_loses_no_acknowledged_change(cp: ControlPlaneProcess) -> None:
    cp.start()
    base, token = cp.base, cp.token
    acked: dict[str, int] = {}  # service key → X-Mesh-Index of its acknowledgement
    acked_endpoints: set[str] = set()
    sent: list[str] = []
    problems: list[str] = []  # a failed assert in the thread would vanish; collect instead
    stop = threading.Event()

    def writer() -> None:
        for i in range(5000):  # bounded: the kill comes long before this
            if stop.is_set():
                return
            key = f"crash/svc-{i}"
            sent.append(key)
            try:
                put = call(
                    base,
                    "PUT",
                    f"/v1/services/{key}",
                    {"ports": [{"port": 80}]},
                    token=token,
                    timeout=5,
                )
                if put.status != 201:
                    problems.append(f"PUT {key}: {put.status} {put.data}")
                    return
                acked[key] = put.index
                ep = {
                    "id": f"ep-{i}",
                    "namespace": "crash",
                    "service": f"svc-{i}",
                    "address": f"198.19.{i // 250}.{i % 250 + 1}",
                    "app_port": 80,
                }
                reg = call(base, "POST", "/v1/endpoints", ep, token=token, timeout=5)
                if reg.status != 201:
                    problems.append(f"POST endpoint ep-{i}: {reg.status} {reg.data}")
                    return
                acked_endpoints.add(f"ep-{i}")
                acked[key] = reg.index
            except OSError:  # the process is gone: stop writing
                return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 40 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert len(acked) >= 40, f"only {len(acked)} writes acknowledged:\n{cp.stderr()[-2000:]}"
    assert cp.stop(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert problems == []

    cp.start()
    snap = cp.call("GET", "/v1/snapshot")
    services = {f"{s['namespace']}/{s['name']}" for s in snap.data["services"]}
    endpoints = {e["id"] for e in snap.data["endpoints"]}
    assert set(acked) <= services
    assert acked_endpoints <= endpoints
    assert services <= set(sent)  # nothing appears that was never sent
    assert snap.index >= max(acked.values())
    vips = [s["vip"] for s in snap.data["services"]]
    assert len(vips) == len(set(vips))


def test_admin_auth(cp: ControlPlaneProcess) -> None:
    cp.start()
    assert cp.call("PUT", "/v1/services/auth/kept", {"ports": [{"port": 80}]}).status == 201
    before = cp.call("GET", "/v1/snapshot")

    for token in (None, "wrong", cp.token + "x", ""):
        for method, path, body in (
            ("GET", "/v1/services", None),
            ("GET", "/v1/snapshot", None),
            ("PUT", "/v1/services/auth/new", {"ports": [{"port": 80}]}),
            ("DELETE", "/v1/services/auth/kept", None),
            (
                "PUT",
                "/v1/nodes/intruder",
                {"underlay_address": "198.18.0.9", "vtep_mac": "02:00:00:00:00:09"},
            ),
        ):
            answer = cp.call(method, path, body, token=token)
            assert answer.status == 401, (token, method, path)
            assert answer.data["error"]["code"] == "unauthorized"
            assert "Authorization: Bearer" in answer.data["error"]["message"]
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert "X-Mesh-Index" not in answer.headers  # no state leaks to strangers

    after = cp.call("GET", "/v1/snapshot")
    assert after.index == before.index
    assert after.data == before.data
    for path in ("/healthz", "/readyz"):
        assert cp.call("GET", path, token=None).status == 200
