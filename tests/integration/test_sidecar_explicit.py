"""The L4 sidecar in explicit mode on 127.0.0.x: a real control plane, real sidecar
processes with mutual TLS between them, and echo apps behind them."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess
from sidecar_helpers import (
    Proc,
    Sidecar,
    echo_app,
    exchange,
    free_port,
    http_get,
    http_post,
    metric,
)

REPLICAS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclass
class Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    apps: dict[str, Proc]
    orders: dict[str, Sidecar]
    web: Sidecar
    local: int  # the web sidecar's local port for shop/orders:8080

    def new_web(self) -> Sidecar:
        return Sidecar(
            self.cp,
            self.tmp,
            "shop/web",
            self.web.app_port,
            extra=("--upstream", f"shop/orders:8080=127.0.0.1:{self.local}"),
            name="web",
            protocol="tcp",
        )


def start_mesh(tmp: Path) -> Mesh:
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", "l4.test")
    apps: dict[str, Proc] = {}
    orders: dict[str, Sidecar] = {}
    local = free_port()
    web_port = free_port()
    web = Sidecar(
        cp,
        tmp,
        "shop/web",
        web_port,
        extra=("--upstream", f"shop/orders:8080=127.0.0.1:{local}"),
        name="web",
        protocol="tcp",
    )
    mesh = Mesh(tmp, cp, apps, orders, web, local)
    try:
        cp.start()
        cp.call(
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080}], "policy": {"balancing": {"algorithm": "round_robin"}}},
        )
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80}]})
        for i, address in enumerate(REPLICAS):
            name = f"orders-{i}"
            port = free_port()
            apps[name] = echo_app(name, "127.0.0.1", port, tmp)
            orders[name] = Sidecar(
                cp, tmp, "shop/orders", port, address=address, name=name, protocol="tcp"
            ).start()
        apps["web"] = echo_app("web", "127.0.0.1", web_port, tmp)  # the caller's own app
        web.start()
        for sc in [*orders.values(), web]:
            sc.wait_ready()
        wait_for(
            lambda: len(web.json("/clusters")["clusters"][0]["endpoints"]) == 3,
            "web sees 3 orders endpoints",
        )
    except BaseException:
        stop_mesh(mesh)
        raise
    return mesh


def stop_mesh(mesh: Mesh) -> None:
    for p in [mesh.web, *mesh.orders.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()


def wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (OSError, KeyError, IndexError, AssertionError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting: {what}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = start_mesh(tmp_path_factory.mktemp("l4"))
    try:
        yield m
    finally:
        stop_mesh(m)


def test_echo_crosses_two_sidecars_with_half_close(mesh: Mesh) -> None:
    greeting, echoed = exchange(mesh.local, b"ping\n")
    assert greeting.startswith("hello from orders-")
    assert echoed == b"ping\n"  # the app saw our EOF (half-close) and answered before closing
    blob = os.urandom(1 << 20)
    greeting, echoed = exchange(mesh.local, blob)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()


def test_round_robin_spreads_connections_evenly_over_three_replicas(mesh: Mesh) -> None:
    seen = collections.Counter(exchange(mesh.local)[0] for _ in range(30))
    assert seen == {f"hello from orders-{i}": 10 for i in range(3)}


def test_plaintext_to_the_inbound_port_is_refused_and_never_reaches_the_app(mesh: Mesh) -> None:
    target = mesh.orders["orders-0"]
    app = mesh.apps["orders-0"]
    before = app.output().count("conn")
    with socket.create_connection((target.address, target.inbound_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
        s.settimeout(5)
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
    assert b"HTTP" not in answer and b"hello" not in answer
    time.sleep(0.3)
    assert app.output().count("conn") == before
    assert (
        metric(
            target.metrics(),
            "meshlet_tls_handshake_failures_total",
            direction="inbound",
            reason="plaintext",
        )
        >= 1
    )


def test_admin_endpoint(mesh: Mesh) -> None:
    certs = mesh.web.json("/certs")
    assert certs["spiffe_id"] == "spiffe://l4.test/ns/shop/sa/web"
    assert "key" not in str(certs).lower().replace("bundle_fingerprint", "")
    clusters = {c["service"]: c for c in mesh.web.json("/clusters")["clusters"]}
    orders = clusters["shop/orders"]
    assert (
        sorted(e["identity"] for e in orders["endpoints"])
        == ["spiffe://l4.test/ns/shop/sa/orders"] * 3
    )
    dump = mesh.web.json("/config_dump")
    assert dump["sidecar"]["service"] == "shop/web" and dump["revision"] > 0
    for path in ("/quitquitquit", "/drain_listeners", "/healthcheck/fail"):
        assert http_get(mesh.web.admin + path)[0] == 405
    text = mesh.web.metrics()
    assert metric(text, "meshlet_tcp_open_total", direction="outbound", service="shop/orders") >= 1
    assert metric(text, "meshlet_cert_expiry_seconds") > 3600


def test_a_killed_replica_is_ejected_and_traffic_continues(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path)
    try:
        victim = mesh.orders["orders-1"]
        victim.kill()
        results = collections.Counter(exchange(mesh.local)[0] for _ in range(30))
        assert sum(results.values()) == 30 and "hello from orders-1" not in results
        text = mesh.web.metrics()
        assert (
            metric(
                text, "meshlet_tcp_connect_errors_total", service="shop/orders", reason="refused"
            )
            >= 1
        )
        assert (
            metric(text, "meshlet_outlier_ejections_total", service="shop/orders") >= 1
        )  # five refused connects in a row eject it
    finally:
        stop_mesh(mesh)


def test_traffic_survives_the_control_plane_and_a_restarted_sidecar_serves_from_disk(
    tmp_path: Path,
) -> None:
    mesh = start_mesh(tmp_path)
    try:
        mesh.cp.kill()
        assert exchange(mesh.local)[1] == b"ping\n"
        mesh.web.signal(signal.SIGTERM)
        assert mesh.web.wait(timeout=15) == 0
        mesh.web = mesh.new_web().start()
        mesh.web.wait_ready()  # certificate from its cert dir, mesh map from its disk cache
        seen = collections.Counter(exchange(mesh.local)[0] for _ in range(6))
        assert sum(seen.values()) == 6
    finally:
        stop_mesh(mesh)


def test_sigterm_drains_then_deregisters(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path)
    try:
        victim = mesh.orders["orders-2"]
        assert http_post(victim.admin + "/healthcheck/fail") == 200
        assert http_get(victim.admin + "/ready")[0] == 503
        victim.signal(signal.SIGTERM)
        assert victim.wait(timeout=20) == 0
        ids = [
            e["id"] for e in mesh.cp.call("GET", "/v1/services/shop/orders/endpoints").data["items"]
        ]
        assert "orders-2" not in ids and len(ids) == 2
    finally:
        stop_mesh(mesh)


def test_the_circuit_breaker_resets_connections_beyond_the_limit_at_once(mesh: Mesh) -> None:
    policy = {"balancing": {"algorithm": "round_robin"}, "circuit_breaker": {"max_connections": 2}}
    mesh.cp.call("PUT", "/v1/services/shop/orders", {"ports": [{"port": 8080}], "policy": policy})
    wait_for(
        lambda: (
            mesh.web.json("/clusters")["clusters"][0]["circuit_breaker"]["connections"]["limit"]
            == 2
        ),
        "the new limit reaches the web sidecar",
    )
    held = [socket.create_connection(("127.0.0.1", mesh.local), timeout=5) for _ in range(2)]
    try:
        for s in held:
            assert s.makefile("rb").readline().startswith(b"hello from orders-")
        before = metric(
            mesh.web.metrics(),
            "meshlet_breaker_overflow_total",
            service="shop/orders",
            kind="connections",
        )
        started = time.monotonic()
        try:  # the reset can come so fast that connect() itself reports it
            with socket.create_connection(("127.0.0.1", mesh.local), timeout=5) as third:
                data = third.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"" and time.monotonic() - started < 2.0  # closed at once, no greeting
        after = metric(
            mesh.web.metrics(),
            "meshlet_breaker_overflow_total",
            service="shop/orders",
            kind="connections",
        )
        assert after == before + 1
    finally:
        for s in held:
            s.close()
        mesh.cp.call(
            "PUT",
            "/v1/services/shop/orders",
            {"ports": [{"port": 8080}], "policy": {"balancing": {"algorithm": "round_robin"}}},
        )
    wait_for(
        lambda: exchange(mesh.local)[1] == b"ping\n", "connections flow again under the old limit"
    )


def test_when_every_endpoint_is_ejected_the_balancer_panics_and_says_so(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path)
    try:
        policy = {
            "balancing": {"algorithm": "round_robin"},
            "outlier_detection": {"max_ejection_percent": 100, "consecutive_failures": 2},
        }
        mesh.cp.call(
            "PUT", "/v1/services/shop/orders", {"ports": [{"port": 8080}], "policy": policy}
        )
        time.sleep(1.0)  # let the policy reach the web sidecar
        for sc in mesh.orders.values():
            sc.kill()
        for _ in range(12):
            with contextlib.suppress(OSError):
                exchange(mesh.local, timeout=3)
        text = mesh.web.metrics()
        assert metric(text, "meshlet_outlier_ejections_total", service="shop/orders") >= 3
        assert metric(text, "meshlet_lb_panic_total", service="shop/orders") >= 1
        assert metric(text, "meshlet_no_healthy_endpoint_total", service="shop/orders") >= 1
    finally:
        stop_mesh(mesh)
