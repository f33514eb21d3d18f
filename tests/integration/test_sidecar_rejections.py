"""Every mTLS refusal of a running sidecar, each made with a real certificate built for it.

Inbound (a caller dialling an orders sidecar's 127.0.0.x port directly): plaintext, a
certificate from another CA, an expired certificate from the mesh's own CA, no
certificate, a TLS 1.2-only client, and a valid SVID the service's policy does not allow.
Each must fail for the caller, be counted under its reason in
meshlet_tls_handshake_failures_total{direction="inbound"}, and never reach the app (the
echo app logs "conn" for every connection it accepts). Outbound: an endpoint listed for
shop/orders whose sidecar presents another service's identity is refused by the web
sidecar, counted, and traffic goes on through the real replicas.
"""

from __future__ import annotations

import datetime as dt
import functools
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from control_plane_helpers import ControlPlaneProcess
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from sidecar_helpers import Proc, Sidecar, echo_app, exchange, free_port, metric

from certs import pki

TD = "rej.test"
ORDERS_AT = ("127.0.0.2", "127.0.0.3")
PAY_AT = "127.0.0.5"
IMPOSTOR_AT = "127.0.0.6"
# Round robin, so that the impostor endpoint of the outbound test is surely picked (the
# default P2C prefers endpoints with a latency record over one without).
ROUND_ROBIN: dict[str, Any] = {"balancing": {"algorithm": "round_robin"}}
ORDERS_SERVICE: dict[str, Any] = {"ports": [{"port": 8080}], "policy": ROUND_ROBIN}
HANDSHAKE_FAILURES = "meshlet_tls_handshake_failures_total"


@dataclass
class Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    apps: dict[str, Proc]
    sidecars: dict[str, Sidecar]
    local: int  # the web sidecar's local port for shop/orders:8080

    @property
    def ca(self) -> Path:
        return Path(self.cp.data_dir) / "ca"

    @property
    def orders(self) -> Sidecar:
        return self.sidecars["orders-0"]

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


def meshlet(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshlet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def endpoint_count(sidecar: Sidecar, service: str) -> int:
    clusters = {c["service"]: c for c in sidecar.json("/clusters")["clusters"]}
    return len(clusters[service]["endpoints"])


def start_mesh(tmp: Path) -> Mesh:
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", TD)
    local = free_port()
    mesh = Mesh(tmp, cp, {}, {}, local)
    try:
        cp.start()
        cp.call("PUT", "/v1/services/shop/orders", ORDERS_SERVICE)
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80}]})
        cp.call("PUT", "/v1/services/shop/pay", {"ports": [{"port": 9090}]})
        plan: list[tuple[str, str, str, tuple[str, ...]]] = [
            (f"orders-{i}", "shop/orders", address, ()) for i, address in enumerate(ORDERS_AT)
        ]
        plan.append(("pay", "shop/pay", PAY_AT, ()))
        upstream = ("--upstream", f"shop/orders:8080=127.0.0.1:{local}")
        plan.append(("web", "shop/web", "127.0.0.1", upstream))
        for name, service, address, extra in plan:
            port = free_port()
            mesh.apps[name] = echo_app(name, "127.0.0.1", port, tmp)
            mesh.sidecars[name] = Sidecar(
                cp, tmp, service, port, address=address, extra=extra, name=name, protocol="tcp"
            ).start()
        for sc in mesh.sidecars.values():
            sc.wait_ready()
        wait_for(lambda: endpoint_count(mesh.web, "shop/orders") == 2, "web sees 2 orders")
    except BaseException:
        stop_mesh(mesh)
        raise
    return mesh


FORWARDER = textwrap.dedent(
    """
    import asyncio, sys
    host, port, to_host, to_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
    async def handle(reader, writer):
        try:
            to_reader, to_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, to_writer), pipe(to_reader, writer))
    async def main():
        server = await asyncio.start_server(handle, host, port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())
    """
)


def forwarder(tmp: Path, listen: tuple[str, int], to: tuple[str, int]) -> Proc:
    """A plain TCP forwarder process: what dials ``listen`` talks to ``to``."""
    args = [sys.executable, "-c", FORWARDER, listen[0], str(listen[1]), to[0], str(to[1])]
    proc = Proc(args, tmp / f"forwarder-{listen[1]}.log").start()
    try:
        wait_for(lambda: "ready" in proc.output() or not proc.alive, "forwarder ready", 10)
        assert proc.alive, proc.output()
    except BaseException:
        proc.kill()
        raise
    return proc


def stop_mesh(mesh: Mesh) -> None:
    for p in [*mesh.sidecars.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = start_mesh(tmp_path_factory.mktemp("rej"))
    try:
        yield m
    finally:
        stop_mesh(m)


# ---- certificates made for each refusal -----------------------------------------------------


def issue(ca_dir: Path, out: Path, spiffe_id: str) -> Path:
    """`meshlet certs issue` into ``out`` (cert.pem holds leaf + issuer, key.pem)."""
    meshlet("certs", "issue", "--dir", str(ca_dir), "--spiffe-id", spiffe_id, "--out", str(out))
    return out


def expired_svid(ca_dir: Path, out: Path, spiffe_id: str) -> Path:
    """A well-formed SVID signed by the mesh's own issuer, expired an hour ago."""
    issuer = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    issuer_key = pki.load_key((ca_dir / "ca-key.pem").read_bytes(), source="ca-key.pem")
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=25))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    out.mkdir(mode=0o700)
    (out / "cert.pem").write_bytes(pki.dump_certs([cert, issuer]))
    (out / "key.pem").write_bytes(pki.dump_key(key))
    return out


def client_context(mesh: Mesh, svid: Path | None, *, tls12: bool = False) -> ssl.SSLContext:
    """Trusts the mesh's bundle (the server is genuine); presents ``svid`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=(mesh.ca / "bundle.pem").read_text())
    version = ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = version
    if svid is not None:
        ctx.load_cert_chain(svid / "cert.pem", svid / "key.pem")
    return ctx


def dial(ctx: ssl.SSLContext, target: Sidecar) -> tuple[bool, str]:
    """(True, greeting) when the app answered through the sidecar, else (False, why).

    In TLS 1.3 the client finishes its handshake before the server has checked the
    client certificate, so a refusal may only show on the first read.
    """
    with socket.create_connection((target.address, target.inbound_port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.settimeout(5)
                data = s.recv(100)
        except TimeoutError:
            return False, "timeout"
        except OSError as e:  # ssl.SSLError (an alert) or a reset
            return False, f"{type(e).__name__}: {e}"
    if not data:
        return False, "eof"
    return True, data.decode(errors="replace").strip()


def conns(app: Proc) -> int:
    return int(app.output().count("conn"))


def refusals(sc: Sidecar, reason: str) -> float:
    return float(metric(sc.metrics(), HANDSHAKE_FAILURES, direction="inbound", reason=reason))


def assert_refused(mesh: Mesh, reason: str, attempt: Callable[[], tuple[bool, str]]) -> str:
    """Run ``attempt`` against orders-0: it fails, is counted as ``reason``, app untouched."""
    target, app = mesh.orders, mesh.apps["orders-0"]
    counted, accepted = refusals(target, reason), conns(app)
    ok, why = attempt()
    assert not ok, f"expected a refusal ({reason}), the app answered {why!r}"
    wait_for(lambda: refusals(target, reason) == counted + 1, f"{reason} counted once", 10)
    time.sleep(0.3)  # an app connection, had one been made, would be logged by now
    assert conns(app) == accepted, f"a refused caller ({reason}) reached the app"
    assert "orders-0" not in why
    return why


# ---- inbound -----------------------------------------------------------------------------------


def test_plaintext_to_the_inbound_port_is_refused(mesh: Mesh) -> None:
    def attempt() -> tuple[bool, str]:
        target = mesh.orders
        with socket.create_connection((target.address, target.inbound_port), timeout=5) as s:
            s.sendall(b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n")
            try:
                answer = s.recv(100)
            except ConnectionResetError:
                answer = b""
        return bool(answer), answer.decode(errors="replace")

    assert_refused(mesh, "plaintext", attempt)


def test_a_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    other = mesh.tmp / "other-ca"
    meshlet("certs", "init", "--dir", str(other), "--trust-domain", TD)  # same trust domain
    foreign = issue(other, mesh.tmp / "foreign-web", f"spiffe://{TD}/ns/shop/sa/web")
    why = assert_refused(
        mesh, "unknown_ca", lambda: dial(client_context(mesh, foreign), mesh.orders)
    )
    assert "UNKNOWN_CA" in why.upper(), why  # the alert tells the caller why


def test_an_expired_certificate_from_the_mesh_ca_is_refused(mesh: Mesh) -> None:
    svid = expired_svid(mesh.ca, mesh.tmp / "expired-web", f"spiffe://{TD}/ns/shop/sa/web")
    why = assert_refused(mesh, "expired", lambda: dial(client_context(mesh, svid), mesh.orders))
    assert "EXPIRED" in why.upper(), why


def test_a_caller_without_a_certificate_is_refused(mesh: Mesh) -> None:
    assert_refused(mesh, "no_certificate", lambda: dial(client_context(mesh, None), mesh.orders))


def test_a_tls12_only_caller_is_refused_even_with_a_valid_certificate(mesh: Mesh) -> None:
    web = issue(mesh.ca, mesh.tmp / "web-svid-tls12", f"spiffe://{TD}/ns/shop/sa/web")
    why = assert_refused(
        mesh, "protocol_version", lambda: dial(client_context(mesh, web, tls12=True), mesh.orders)
    )
    assert "VERSION" in why.upper(), why


def orders_policy_seen(sc: Sidecar, allowed: list[str] | None) -> bool:
    services = {f"{s['namespace']}/{s['name']}": s for s in sc.json("/config_dump")["services"]}
    return bool(services["shop/orders"]["policy"].get("allowed_callers") == allowed)


def test_a_caller_the_policy_does_not_allow_is_refused_and_an_allowed_one_served(
    mesh: Mesh,
) -> None:
    evil = issue(mesh.ca, mesh.tmp / "evil", f"spiffe://{TD}/ns/shop/sa/evil")
    web = issue(mesh.ca, mesh.tmp / "web-svid", f"spiffe://{TD}/ns/shop/sa/web")
    ok, greeting = dial(client_context(mesh, evil), mesh.orders)
    assert ok and greeting == "hello from orders-0"  # no policy: the whole trust domain may call
    policy = {**ORDERS_SERVICE, "policy": {**ROUND_ROBIN, "allowed_callers": ["shop/web"]}}
    assert mesh.cp.call("PUT", "/v1/services/shop/orders", policy).status == 200
    try:
        wait_for(lambda: orders_policy_seen(mesh.orders, ["shop/web"]), "orders-0 has the policy")
        assert_refused(
            mesh, "caller_not_allowed", lambda: dial(client_context(mesh, evil), mesh.orders)
        )
        app = mesh.apps["orders-0"]
        accepted = conns(app)
        ok, greeting = dial(client_context(mesh, web), mesh.orders)
        assert ok and greeting == "hello from orders-0"
        wait_for(lambda: conns(app) == accepted + 1, "the allowed caller reached the app", 5)
        wait_for(lambda: orders_policy_seen(mesh.web, ["shop/web"]), "web has the policy")
        assert exchange(mesh.local)[1] == b"ping\n"  # the real web sidecar is still welcome
    finally:
        mesh.cp.call("PUT", "/v1/services/shop/orders", ORDERS_SERVICE)
        wait_for(lambda: orders_policy_seen(mesh.orders, None), "orders-0 lost the policy")


def test_a_sidecar_refused_by_policy_counts_the_refusal_as_a_connect_error(mesh: Mesh) -> None:
    policy = {**ORDERS_SERVICE, "policy": {**ROUND_ROBIN, "allowed_callers": ["shop/nobody"]}}
    assert mesh.cp.call("PUT", "/v1/services/shop/orders", policy).status == 200
    try:
        for sc in (mesh.orders, mesh.sidecars["orders-1"], mesh.web):
            seen = functools.partial(orders_policy_seen, sc, ["shop/nobody"])
            wait_for(seen, f"{sc.name} has the policy")
        before = mesh.web.metrics()
        try:
            greeting, _ = exchange(mesh.local)
        except OSError:
            greeting = ""
        assert greeting == ""  # the app is refused
        after = mesh.web.metrics()
    finally:
        mesh.cp.call("PUT", "/v1/services/shop/orders", ORDERS_SERVICE)
        for sc in (mesh.orders, mesh.sidecars["orders-1"]):
            wait_for(functools.partial(orders_policy_seen, sc, None), f"{sc.name} lost the policy")
    opened = "meshlet_tcp_open_total"
    labels = {"direction": "outbound", "service": "shop/orders"}
    assert metric(after, opened, **labels) == metric(before, opened, **labels)
    errors = [
        line
        for line in after.splitlines()
        if line.startswith('meshlet_tcp_connect_errors_total{reason="tls_refused"')
        and 'service="shop/orders"' in line
    ]
    assert errors, "the calling sidecar never learnt why its connection was refused"


# ---- outbound -----------------------------------------------------------------------------------


def test_an_endpoint_presenting_another_services_identity_is_refused_by_the_caller(
    mesh: Mesh,
) -> None:
    pay = mesh.sidecars["pay"]
    # The control plane refuses a second endpoint at pay's own address:port, so the
    # impostor entry reaches pay's sidecar through a plain TCP forwarder (as a reused
    # address or a stale NAT rule would): whoever answers there proves to be shop/pay.
    listen = (IMPOSTOR_AT, free_port(IMPOSTOR_AT))
    relay = forwarder(mesh.tmp, listen, (pay.address, pay.inbound_port))
    impostor = {
        "id": "impostor",
        "namespace": "shop",
        "service": "orders",
        "address": listen[0],
        "app_port": pay.app_port,
        "inbound_port": listen[1],
    }
    try:
        assert mesh.cp.call("POST", "/v1/endpoints", impostor).status == 201
        wait_for(lambda: endpoint_count(mesh.web, "shop/orders") == 3, "web lists the impostor")
        before = mesh.web.metrics()
        greetings = [exchange(mesh.local) for _ in range(9)]
        after = mesh.web.metrics()
    finally:
        mesh.cp.call("DELETE", "/v1/endpoints/impostor")
        relay.kill()
    assert all(echo == b"ping\n" for _, echo in greetings)  # every connection was served ...
    assert {g for g, _ in greetings} == {"hello from orders-0", "hello from orders-1"}  # ... right
    refused = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in after.splitlines()
        if line.startswith("meshlet_tcp_connect_errors_total{")
        and 'service="shop/orders"' in line
        and 'reason="identity_' in line
    }
    assert refused, "the web sidecar never counted the wrong identity"
    gained = {
        reason: value
        - metric(before, "meshlet_tcp_connect_errors_total", service="shop/orders", reason=reason)
        for reason, value in refused.items()
    }
    assert sum(gained.values()) >= 1 and set(refused) == {"identity_wrong_identity"}, gained
