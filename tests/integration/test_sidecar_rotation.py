"""Certificate rotation in a running mesh, under traffic: real control plane, real sidecars.

Every sidecar asks for 60-second leaves (``--cert-ttl 60s``, the CA's minimum), so each
renews about 40 s after it got its leaf (2/3 of the lifetime, ± 5% jitter). That is what
both tests wait for: the leaf renewal itself, and in the root rotation the moment every
sidecar runs a leaf under the new root. A restarted sidecar would not do: it keeps a valid
cert.pem that is not yet due (``Identity.ensure``), whichever root it chains to, so a
restart does not move it to the new root.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane_helpers import ControlPlaneProcess
from cryptography import x509
from sidecar_helpers import Proc, Sidecar, echo_app, exchange, free_port

from certs import pki

TD = "rot.test"
ORDERS_AT = ("127.0.0.2", "127.0.0.3")
LEAF_TTL = ("--cert-ttl", "60s")
RENEWAL_BOUND_S = 75.0  # a 60 s leaf renews 36-43 s after issue; the last sidecar starts late


@dataclass
class Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    apps: dict[str, Proc] = field(default_factory=dict)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    local: int = 0  # the web sidecar's local port for shop/orders:8080

    @property
    def ca(self) -> Path:
        return Path(self.cp.data_dir) / "ca"

    @property
    def web(self) -> Sidecar:
        return self.sidecars["web"]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, KeyError, IndexError, AssertionError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting: {what}")


def start_mesh(tmp: Path) -> Mesh:
    """Two orders replicas and a web sidecar (local port → shop/orders), all on 60 s leaves."""
    mesh = Mesh(tmp, ControlPlaneProcess(tmp / "cp", "--trust-domain", TD), local=free_port())
    cp = mesh.cp
    try:
        cp.start()
        round_robin = {"balancing": {"algorithm": "round_robin"}}
        cp.call(
            "PUT", "/v1/services/shop/orders", {"ports": [{"port": 8080}], "policy": round_robin}
        )
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80}]})
        plan: list[tuple[str, str, str, tuple[str, ...]]] = [
            (f"orders-{i}", "shop/orders", address, LEAF_TTL) for i, address in enumerate(ORDERS_AT)
        ]
        upstream = ("--upstream", f"shop/orders:8080=127.0.0.1:{mesh.local}")
        plan.append(("web", "shop/web", "127.0.0.1", (*LEAF_TTL, *upstream)))
        for name, service, address, extra in plan:
            port = free_port()
            mesh.apps[name] = echo_app(name, "127.0.0.1", port, tmp)
            mesh.sidecars[name] = Sidecar(
                cp, tmp, service, port, address=address, extra=extra, name=name, protocol="tcp"
            ).start()
        for sc in mesh.sidecars.values():
            sc.wait_ready()
        wait_for(
            lambda: len(mesh.web.json("/clusters")["clusters"][0]["endpoints"]) == len(ORDERS_AT),
            "web sees every orders replica",
        )
    except BaseException:
        stop_mesh(mesh)
        raise
    return mesh


def stop_mesh(mesh: Mesh) -> None:
    for p in [*mesh.sidecars.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()


def not_after(certs: dict[str, Any]) -> dt.datetime:
    return dt.datetime.strptime(certs["not_after"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def issued_via(sc: Sidecar) -> list[str]:
    """How each certificate was issued, from the sidecar's JSON log ("join-token", "mtls")."""
    via = []
    for line in sc.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "certificate issued":
            via.append(entry.get("via"))
    return via


class LongLived:
    """One connection through the web sidecar that stays open and echoes line by line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reader.readline().decode().strip()
        self.echoes = 0

    def echo(self, line: bytes) -> None:
        self.sock.sendall(line)
        got = self.reader.readline()
        assert got == line, f"the long-lived connection broke after {self.echoes} echoes: {got!r}"
        self.echoes += 1

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Traffic(threading.Thread):
    """A new connection (greeting + echo) through the web sidecar every ``interval_s``."""

    def __init__(self, port: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.started_at = time.monotonic()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            payload = f"request {n}\n".encode()
            try:
                greeting, echoed = exchange(self.port, payload)
                if not greeting.startswith("hello from orders-") or echoed != payload:
                    raise AssertionError(f"answer {greeting!r} {echoed!r}")
                self.ok += 1
            except (OSError, AssertionError) as e:
                at = time.monotonic() - self.started_at
                self.failures.append(f"connection {n} at {at:.1f}s: {type(e).__name__}: {e}")
            self.stopping.wait(self.interval_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive(), "the traffic thread did not stop"


def served_serial(mesh: Mesh, target: Sidecar) -> str:
    """The serial of the leaf ``target`` presents to a new caller (using web's own SVID)."""
    cert_dir = mesh.web.cert_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=(cert_dir / "bundle.pem").read_text())
    ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    with (
        socket.create_connection((target.address, target.inbound_port), timeout=5) as raw,
        ctx.wrap_socket(raw) as s,
    ):
        der = s.getpeercert(binary_form=True)
        assert der is not None
        s.settimeout(5)
        assert s.recv(100).startswith(b"hello from orders-")
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


# ---- leaf renewal --------------------------------------------------------------------------------


def test_60s_leaves_renew_while_a_long_lived_connection_stays_open_and_new_ones_succeed(
    tmp_path: Path,
) -> None:
    mesh = start_mesh(tmp_path)
    long: LongLived | None = None
    try:
        first = {name: sc.json("/certs") for name, sc in mesh.sidecars.items()}
        for name, certs in first.items():
            assert 30 <= certs["expires_in_s"] <= 60, (name, certs)  # the 60 s asked for
        long = LongLived(mesh.local)
        assert long.greeting.startswith("hello from orders-")
        started = time.monotonic()
        renewed: dict[str, float] = {}  # sidecar → seconds into the test when it renewed
        failures: list[str] = []
        new_ok = 0
        next_new = started
        while (elapsed := time.monotonic() - started) < RENEWAL_BOUND_S:
            long.echo(f"tick {long.echoes}\n".encode())  # every ~0.5 s
            if time.monotonic() >= next_new:  # a new connection every ~1 s
                next_new += 1.0
                try:
                    greeting, echoed = exchange(mesh.local, b"new\n")
                    assert greeting.startswith("hello from orders-") and echoed == b"new\n"
                    new_ok += 1
                except (OSError, AssertionError) as e:
                    failures.append(f"at {elapsed:.1f}s: {type(e).__name__}: {e}")
            for name, sc in mesh.sidecars.items():
                if name not in renewed and sc.json("/certs")["serial"] != first[name]["serial"]:
                    renewed[name] = elapsed
            if len(renewed) == len(mesh.sidecars) and elapsed > max(renewed.values()) + 5:
                break  # everyone renewed, and traffic went on for 5 s on the new leaves
            time.sleep(0.5)
        assert set(renewed) == set(mesh.sidecars), (
            f"only {sorted(renewed)} renewed in {RENEWAL_BOUND_S:g}s:\n"
            + "\n".join(sc.output()[-1500:] for sc in mesh.sidecars.values())
        )
        assert failures == [], failures
        assert new_ok >= 30 and long.echoes >= 50  # the loop really ran through the renewals
        long.echo(b"still here after every renewal\n")
        for name, sc in mesh.sidecars.items():
            now = sc.json("/certs")
            assert now["serial"] != first[name]["serial"]
            assert not_after(now) > not_after(first[name])
            assert issued_via(sc)[0] == "join-token"
            assert "mtls" in issued_via(sc)[1:], issued_via(sc)  # renewed with its own SVID
        for name in ("orders-0", "orders-1"):  # a new caller is served the renewed leaf
            sc = mesh.sidecars[name]
            assert served_serial(mesh, sc) == sc.json("/certs")["serial"]
    finally:
        if long is not None:
            long.close()
        stop_mesh(mesh)


# ---- root rotation -------------------------------------------------------------------------------


def rotate_root(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlet",
            "certs",
            "rotate",
            "root",
            "--dir",
            str(mesh.ca),
            "--control-plane",
            mesh.cp.base,
            "--token-file",
            str(mesh.cp.token_file),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rotation_status(mesh: Mesh) -> dict[str, Any]:
    done = rotate_root(mesh, "--status", "-o", "json")
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def wait_until_ready_for(mesh: Mesh, step: str, timeout: float) -> None:
    """Ask ``--status`` until the mesh (every sidecar, all reporting) is ready for ``step``."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = rotation_status(mesh)
        mesh_view = status["mesh"]
        if (
            status["next_step"] == step
            and mesh_view["clients"] == len(mesh.sidecars)
            and not mesh_view["waiting_for"]
        ):
            return
        time.sleep(1.0)
    raise AssertionError(f"the mesh was not ready for {step} in {timeout:g}s: {status}")


def take_step(mesh: Mesh, step: str) -> None:
    done = rotate_root(mesh, "--step", step)
    assert done.returncode == 0, (step, done.stdout, done.stderr)
    assert f"{step}: done" in done.stdout


def roots_in(path: Path) -> list[x509.Certificate]:
    return pki.load_certs(path.read_bytes(), source=str(path))


def holds_only(path: Path, root: x509.Certificate) -> bool:
    return roots_in(path) == [root]


def test_root_rotation_add_promote_retire_across_running_sidecars_with_no_failed_connection(
    tmp_path: Path,
) -> None:
    mesh = start_mesh(tmp_path)
    traffic = Traffic(mesh.local, interval_s=0.15)
    try:
        old_root = roots_in(mesh.ca / "root-cert.pem")[0]
        traffic.start()
        take_step(mesh, "add")
        wait_until_ready_for(mesh, "promote", timeout=30)  # every sidecar trusts both roots
        for sc in mesh.sidecars.values():
            assert len(roots_in(sc.cert_dir / "bundle.pem")) == 2
        take_step(mesh, "promote")
        new_root = roots_in(mesh.ca / "root-cert.pem")[0]
        assert new_root != old_root

        early = rotate_root(mesh, "--step", "retire")  # the leaves are still under the old root
        assert early.returncode != 0 and "not ready to retire" in early.stderr, early
        assert roots_in(mesh.ca / "bundle.pem") == [old_root, new_root]

        wait_until_ready_for(mesh, "retire", timeout=RENEWAL_BOUND_S)  # every leaf renewed
        take_step(mesh, "retire")
        assert roots_in(mesh.ca / "bundle.pem") == [new_root]
        for sc in mesh.sidecars.values():
            wait_for(
                functools.partial(holds_only, sc.cert_dir / "bundle.pem", new_root),
                f"{sc.name} adopts the bundle with the new root only",
            )

        def every_sidecar_current() -> bool:
            clients = mesh.cp.call("GET", "/v1/ca").data["clients"]
            return len(clients) == len(mesh.sidecars) and all(
                c["connected"] and c["bundle_current"] and c["leaf_under_current_root"]
                for c in clients
            )

        wait_for(every_sidecar_current, "every sidecar watches again with the new bundle")
        time.sleep(2.0)  # traffic on the one-root bundle
    finally:
        if traffic.is_alive():
            traffic.stop()
        try:
            after = {name: sc.json("/certs") for name, sc in mesh.sidecars.items()}
        finally:
            stop_mesh(mesh)
    assert traffic.failures == [], traffic.failures
    assert traffic.ok >= 100, traffic.ok
    for name, sc in mesh.sidecars.items():
        chain = roots_in(sc.cert_dir / "cert.pem")  # leaf + issuer, as served
        assert format(chain[0].serial_number, "x") == after[name]["serial"]
        assert pki.anchor_of(chain, [new_root]) == new_root, name
        assert pki.anchor_of(chain, [old_root]) is None, name
        assert roots_in(sc.cert_dir / "bundle.pem") == [new_root], name
