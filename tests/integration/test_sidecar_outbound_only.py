"""A workload that only calls others (a worker, a job, a load generator) runs its sidecar
without ``--app-port``: it gets its own identity and the mesh map, calls services by
name over mutual TLS, but serves nothing and registers no endpoint (Linkerd's and
Istio's client-only workloads). Real control plane, real sidecar processes, echo apps."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess
from l7_helpers import wait_for
from sidecar_helpers import Proc, Sidecar, echo_app, exchange, free_port

TD = "outbound-only.test"


@dataclass
class Mesh:
    cp: ControlPlaneProcess
    app: Proc
    orders: Sidecar
    worker: Sidecar
    local: int  # the worker's local port for shop/orders:8080


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("outbound-only")
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", TD)
    app_port, local = free_port(), free_port()
    app = echo_app("orders-0", "127.0.0.1", app_port, tmp)
    orders = Sidecar(cp, tmp, "shop/orders", app_port, address="127.0.0.2", name="orders-0",
                     protocol="tcp")  # fmt: skip
    worker = Sidecar(cp, tmp, "shop/worker", None, name="worker",
                     extra=("--upstream", f"shop/orders:8080=127.0.0.1:{local}"))  # fmt: skip
    procs: list[Proc] = [app, orders, worker]
    try:
        cp.start()
        # Only the worker may call orders: a wrong identity would be refused.
        orders_svc = {"ports": [{"port": 8080, "protocol": "tcp"}],
                      "policy": {"allowed_callers": ["shop/worker"]}}  # fmt: skip
        assert cp.call("PUT", "/v1/services/shop/orders", orders_svc).status == 201
        orders.start().wait_ready()
        worker.start()
        yield Mesh(cp, app, orders, worker, local)
    finally:
        for p in procs:
            p.kill()
        cp.kill()


def test_it_is_ready_without_an_app_and_says_it_is_outbound_only(mesh: Mesh) -> None:
    mesh.worker.wait_ready()  # no app listens anywhere: ready all the same
    dump = mesh.worker.json("/config_dump")["sidecar"]
    assert dump["outbound_only"] is True and dump["app_port"] is None
    # nothing listens on the inbound address it was given
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mesh.worker.inbound_port), timeout=2).close()


def test_it_calls_a_service_by_name_over_mtls_as_its_own_identity(mesh: Mesh) -> None:
    mesh.worker.wait_ready()
    wait_for(lambda: exchange(mesh.local)[0] == "hello from orders-0", "worker → orders")
    for _ in range(5):
        greeting, echoed = exchange(mesh.local, b"job 42\n")
        assert (greeting, echoed) == ("hello from orders-0", b"job 42\n")
    # orders allows only shop/worker, and served: the worker's certificate says shop/worker
    certs = mesh.worker.json("/certs")
    assert certs["spiffe_id"] == f"spiffe://{TD}/ns/shop/sa/worker"


def test_it_registers_no_endpoint_and_no_service(mesh: Mesh) -> None:
    mesh.worker.wait_ready()
    wait_for(lambda: mesh.cp.call("GET", "/v1/services/shop/orders/endpoints").status == 200,
             "orders registered")  # fmt: skip
    orders = mesh.cp.call("GET", "/v1/services/shop/orders/endpoints").data
    assert [e["id"] for e in orders["items"]] == ["orders-0"]
    assert mesh.cp.call("GET", "/v1/services/shop/worker/endpoints").status == 404
    assert mesh.cp.call("GET", "/v1/services/shop/worker").status == 404


def test_sigterm_ends_it_at_once_and_cleanly(tmp_path: Path, mesh: Mesh) -> None:
    sc = Sidecar(mesh.cp, tmp_path, "shop/batch", None, name="batch").start()
    try:
        sc.wait_ready()
        started = time.monotonic()
        sc.signal(signal.SIGTERM)
        assert sc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5  # nothing to drain: no 3 s drain wait
        assert "sidecar stopped" in sc.output()
    finally:
        sc.kill()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--label", "version=v2"), "--label"),
        (("--app-protocol", "http"), "--app-protocol"),
    ],
)
def test_served_port_options_without_an_app_port_are_refused_clearly(
    tmp_path: Path, mesh: Mesh, extra: tuple[str, ...], named: str
) -> None:
    cp = mesh.cp
    out = subprocess.run(
        [sys.executable, "-m", "meshlet", "sidecar", "run", "--service", "shop/x",
         "--control-plane", cp.info["grpc"], "--ca-bundle", str(cp.data_dir / "ca" / "bundle.pem"),
         "--join-token", str(cp.data_dir / "join-token"), "--cert-dir", str(tmp_path / "c"),
         "--mode", "explicit", *extra],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert named in lines[0] and "--app-port" in lines[0], lines
    assert not (tmp_path / "c").exists()  # nothing was created
