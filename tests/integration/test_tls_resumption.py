"""TLS 1.3 session resumption on the mTLS leg between sidecars, and what it must not skip.

In process (real sockets, real TLS under uvloop, certificates from the `meshlet certs`
CLI): ``open_mtls`` with a ``SessionCache`` resumes the second connection to an endpoint;
a resumed connection still yields both peers' certificates; a session is never offered
with a new client context (leaf or bundle rotation), a ticket made under an old server
context is not accepted by a new one, an endpoint listed under another identity gets no
session, and an impostor answering with another identity is refused and its endpoint's
session dropped. With real sidecar processes: the web sidecar's second connection to
orders is resumed and counted on both sides, and a policy change between two
connections refuses the resumed caller.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from certs_helpers import cli_init, cli_issue
from control_plane_helpers import ControlPlaneProcess
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sidecar_helpers import Proc, Sidecar, echo_app, exchange, free_port, metric

from certs import cadir, pki
from certs.spiffe import parse
from meshlet.model import Endpoint
from sidecar import tls
from sidecar.connect import ConnectFailed, SessionCache, open_mtls
from sidecar.tlsleg import TlsLeg

pytestmark = pytest.mark.integration

TD = "resume.test"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"
PAY = f"spiffe://{TD}/ns/shop/sa/pay"
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    bundle: bytes
    dirs: dict[str, Path]

    def client(self, who: str = "web") -> ssl.SSLContext:
        d = self.dirs[who]
        return tls.client_context(d / "cert.pem", d / "key.pem", self.bundle)

    def server(self, who: str = "orders") -> ssl.SSLContext:
        d = self.dirs[who]
        return tls.server_context(d / "cert.pem", d / "key.pem", self.bundle)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("resume")
    ca = cli_init(base / "ca", TD)
    dirs = {
        name: cli_issue(ca, base / name, sid)
        for name, sid in (("web", WEB), ("orders", ORDERS), ("pay", PAY))
    }
    for name in dirs:  # cli_issue returns the directory it was given
        dirs[name] = base / name
    return Pki(bundle=(ca / "bundle.pem").read_bytes(), dirs=dirs)


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return uvloop.run(bounded())


class Server:
    """A server TlsLeg listener, as the inbound's: it holds the ticket until it accepts (or
    refuses, with ``refusing``) each caller; its context can be swapped (rotation)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.refusing = False
        self.legs: list[TlsLeg] = []
        self.server: asyncio.Server | None = None

    def _factory(self) -> TlsLeg:
        leg = TlsLeg(self.ctx, server_side=True, hold_until_accept=True)
        self.legs.append(leg)

        def decide(f: asyncio.Future[None]) -> None:
            if not f.exception():
                leg.refuse() if self.refusing else leg.accept()

        leg.handshake.add_done_callback(decide)
        return leg

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(self._factory, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for leg in self.legs:
            leg.abort()


def endpoint(port: int, identity: str = ORDERS) -> Endpoint:
    return Endpoint(
        id="orders-0",
        namespace="shop",
        service="orders",
        address="127.0.0.1",
        app_port=8080,
        inbound_port=port,
        identity=identity,
    )


async def dial(ep: Endpoint, ctx: ssl.SSLContext, sessions: SessionCache) -> TlsLeg:
    leg = await open_mtls(ep, ctx, 5.0, sessions=sessions)
    leg.abort()
    return leg


def der(who: str, certs: Pki) -> bytes:
    pem = (certs.dirs[who] / "cert.pem").read_bytes()
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER)


def test_the_second_connection_resumes_and_both_sides_still_see_the_peer(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ctx, ep = SessionCache(), certs.client(), endpoint(port)
        try:
            first = await dial(ep, ctx, sessions)
            assert not first.session_reused() and len(sessions) == 1
            second = await dial(ep, ctx, sessions)
            assert second.session_reused()
            assert server.legs[1].session_reused()
            # OpenSSL keeps the peer's leaf in the session: identity checks still work.
            assert second.peer_certificate() == der("orders", certs)
            assert server.legs[1].peer_certificate() == der("web", certs)
            third = await dial(ep, ctx, sessions)  # the cached ticket resumes again
            assert third.session_reused()
        finally:
            server.close()

    run(scenario)


def test_a_new_client_context_never_offers_the_old_session(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ep = SessionCache(), endpoint(port)
        try:
            await dial(ep, certs.client(), sessions)
            rotated = certs.client()  # what sidecar.identity builds for a new leaf or bundle
            assert sessions.get(ep, rotated) is None
            assert len(sessions) == 0  # dropped, not kept for later
            leg = await dial(ep, rotated, sessions)
            assert not leg.session_reused() and not server.legs[1].session_reused()
        finally:
            server.close()

    run(scenario)


def test_a_ticket_from_an_old_server_context_is_not_accepted_after_rotation(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ctx, ep = SessionCache(), certs.client(), endpoint(port)
        try:
            await dial(ep, ctx, sessions)
            server.ctx = certs.server()  # a new bundle or leaf: new context, new ticket keys
            leg = await dial(ep, ctx, sessions)  # the old session is offered...
            assert not server.legs[1].session_reused()  # ...and the server does a full handshake
            assert not leg.session_reused()
            assert (await dial(ep, ctx, sessions)).session_reused()  # the new ticket works
        finally:
            server.close()

    run(scenario)


def test_an_endpoint_listed_under_another_identity_gets_no_session(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ctx = SessionCache(), certs.client()
        try:
            await dial(endpoint(port), ctx, sessions)
            assert sessions.get(endpoint(port, PAY), ctx) is None
            with pytest.raises(ConnectFailed) as info:  # orders answers, pay was expected
                await dial(endpoint(port, PAY), ctx, sessions)
            assert info.value.reason == "identity_wrong_identity"
            assert not server.legs[1].session_reused()
        finally:
            server.close()

    run(scenario)


def test_an_impostor_behind_the_same_address_is_refused_and_the_session_dropped(
    certs: Pki,
) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ctx, ep = SessionCache(), certs.client(), endpoint(port)
        try:
            await dial(ep, ctx, sessions)
            server.ctx = certs.server("pay")  # another workload now answers on that port
            with pytest.raises(ConnectFailed) as info:
                await dial(ep, ctx, sessions)
            assert info.value.reason == "identity_wrong_identity"
            assert not server.legs[1].session_reused()
            assert len(sessions) == 0
        finally:
            server.close()

    run(scenario)


def test_a_refused_connection_leaves_no_session(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        sessions, ctx, ep = SessionCache(), certs.client(), endpoint(port)
        try:
            await dial(ep, ctx, sessions)
            server.refusing = True  # e.g. the policy changed
            with pytest.raises(ConnectFailed) as info:
                await dial(ep, ctx, sessions)
            assert info.value.reason == "tls_refused"
            assert server.legs[1].session_reused()  # it was resumed, and still refused
            assert len(sessions) == 0
        finally:
            server.close()

    run(scenario)


def test_the_cache_is_bounded_and_respects_expiry(certs: Pki) -> None:
    async def scenario() -> None:
        server = Server(certs.server())
        port = await server.start()
        clock = [time.time()]
        sessions, ctx = SessionCache(2, now=lambda: clock[0]), certs.client()
        try:
            leg = await open_mtls(endpoint(port), ctx, 5.0)
            session = leg.session()
            leg.abort()
            assert session is not None and session.has_ticket
            for i in range(3):
                other = Endpoint(
                    id=f"e{i}", namespace="shop", service="orders", address=f"127.0.0.{i + 2}",
                    app_port=8080, inbound_port=port, identity=ORDERS,
                )  # fmt: skip
                sessions.put(other, ctx, session, clock[0] + 60)
            assert len(sessions) == 2  # the least recently used went
            last = Endpoint(
                id="e2", namespace="shop", service="orders", address="127.0.0.4",
                app_port=8080, inbound_port=port, identity=ORDERS,
            )  # fmt: skip
            assert sessions.get(last, ctx) is session
            clock[0] += 61  # past the peer certificate's end given above
            assert sessions.get(last, ctx) is None
            sessions.put(last, ctx, session, clock[0] + 10**6)
            clock[0] = session.time + session.timeout  # past the ticket lifetime
            assert sessions.get(last, ctx) is None
        finally:
            server.close()

    run(scenario)


# ---- real sidecar processes ---------------------------------------------------------------------


@dataclass
class Mesh:
    cp: ControlPlaneProcess
    procs: list[Proc]
    orders: Sidecar
    web: Sidecar
    local: int


ORDERS_SERVICE: dict[str, Any] = {"ports": [{"port": 8080}]}


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


def endpoint_count(sidecar: Sidecar, service: str) -> int:
    clusters = {c["service"]: c for c in sidecar.json("/clusters")["clusters"]}
    return len(clusters[service]["endpoints"])


def orders_policy_seen(sc: Sidecar, allowed: list[str] | None) -> bool:
    services = {f"{s['namespace']}/{s['name']}": s for s in sc.json("/config_dump")["services"]}
    return bool(services["shop/orders"]["policy"].get("allowed_callers") == allowed)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("resume-mesh")
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", TD)
    procs: list[Proc] = []
    local = free_port()
    try:
        cp.start()
        cp.call("PUT", "/v1/services/shop/orders", ORDERS_SERVICE)
        cp.call("PUT", "/v1/services/shop/web", {"ports": [{"port": 80}]})
        app_port = free_port()
        procs.append(echo_app("orders-0", "127.0.0.1", app_port, tmp))
        orders = Sidecar(
            cp, tmp, "shop/orders", app_port, address="127.0.0.2", name="orders-0", protocol="tcp"
        ).start()
        procs.append(orders)
        web_app = free_port()
        procs.append(echo_app("web", "127.0.0.1", web_app, tmp))
        upstream = ("--upstream", f"shop/orders:8080=127.0.0.1:{local}")
        web = Sidecar(cp, tmp, "shop/web", web_app, extra=upstream, name="web", protocol="tcp")
        procs.append(web.start())
        orders.wait_ready()
        web.wait_ready()
        wait_for(lambda: endpoint_count(web, "shop/orders") == 1, "web sees orders")
        yield Mesh(cp, procs, orders, web, local)
    finally:
        for p in procs:
            p.kill()
        cp.kill()


RESUMED = "meshlet_tls_resumed_total"


def test_sidecars_resume_and_count_it_and_a_policy_change_still_refuses(mesh: Mesh) -> None:
    assert exchange(mesh.local) == ("hello from orders-0", b"ping\n")
    out_before = metric(mesh.web.metrics(), RESUMED, direction="outbound")
    in_before = metric(mesh.orders.metrics(), RESUMED, direction="inbound")
    for _ in range(3):
        assert exchange(mesh.local) == ("hello from orders-0", b"ping\n")
    assert metric(mesh.web.metrics(), RESUMED, direction="outbound") == out_before + 3
    assert metric(mesh.orders.metrics(), RESUMED, direction="inbound") == in_before + 3

    # The web sidecar holds a session for orders; the policy now turns web away.
    policy = {**ORDERS_SERVICE, "policy": {"allowed_callers": ["shop/nobody"]}}
    assert mesh.cp.call("PUT", "/v1/services/shop/orders", policy).status == 200
    try:
        wait_for(functools.partial(orders_policy_seen, mesh.orders, ["shop/nobody"]), "policy")
        before = mesh.orders.metrics()
        try:
            greeting, _ = exchange(mesh.local)
        except OSError:
            greeting = ""
        assert greeting == ""  # refused although the session was resumed
        after = mesh.orders.metrics()
        refused = "meshlet_tls_handshake_failures_total"
        labels = {"direction": "inbound", "reason": "caller_not_allowed"}
        assert metric(after, refused, **labels) >= metric(before, refused, **labels) + 1
        assert metric(after, RESUMED, direction="inbound") == (
            metric(before, RESUMED, direction="inbound") + 1
        )
    finally:
        mesh.cp.call("PUT", "/v1/services/shop/orders", ORDERS_SERVICE)
        wait_for(functools.partial(orders_policy_seen, mesh.orders, None), "policy lifted")
    # The refusal dropped the session: the next connection is a full handshake, then resumes.
    out = metric(mesh.web.metrics(), RESUMED, direction="outbound")
    assert exchange(mesh.local) == ("hello from orders-0", b"ping\n")
    assert metric(mesh.web.metrics(), RESUMED, direction="outbound") == out
    assert exchange(mesh.local) == ("hello from orders-0", b"ping\n")
    assert metric(mesh.web.metrics(), RESUMED, direction="outbound") == out + 1


def raw_dial(
    ctx: ssl.SSLContext, sc: Sidecar, session: ssl.SSLSession | None = None
) -> tuple[bool, str, ssl.SSLSession | None]:
    """(resumed, greeting or "", session) for one connection straight to ``sc``'s inbound."""
    raw = socket.create_connection((sc.address, sc.inbound_port), timeout=5)
    with raw, ctx.wrap_socket(raw, session=session) as s:
        try:
            line = s.recv(100).decode().strip()
        except (OSError, ssl.SSLError):
            line = ""
        return bool(s.session_reused), line, s.session


def test_a_caller_whose_certificate_expired_cannot_resume_its_session(mesh: Mesh) -> None:
    ca = cadir.load(Path(mesh.cp.data_dir) / "ca")
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    leaf = pki.build_leaf(
        key.public_key(),
        spiffe_id=parse(WEB),
        issuer=ca.issuer,
        issuer_key=ca.issuer_key,
        now=now - dt.timedelta(minutes=1),
        ttl=dt.timedelta(minutes=1, seconds=4),
    ).cert
    svid = Path(mesh.cp.data_dir) / "short-lived"
    svid.mkdir()
    (svid / "cert.pem").write_bytes(pki.dump_certs([leaf, ca.issuer]))
    (svid / "key.pem").write_bytes(pki.dump_key(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=(Path(mesh.cp.data_dir) / "ca" / "bundle.pem").read_text())
    ctx.load_cert_chain(svid / "cert.pem", svid / "key.pem")

    resumed, greeting, session = raw_dial(ctx, mesh.orders)
    assert (resumed, greeting) == (False, "hello from orders-0")
    assert session is not None and session.has_ticket
    # Wait out the certificate (a few seconds of wall clock: what expiry is measured in).
    time.sleep(max(0.0, leaf.not_valid_after_utc.timestamp() - time.time()) + 1.0)
    before = mesh.orders.metrics()
    resumed, greeting, _ = raw_dial(ctx, mesh.orders, session)
    assert resumed  # OpenSSL resumed without looking at the certificate again...
    assert greeting == ""  # ...and the inbound refused it
    after = mesh.orders.metrics()
    refused = "meshlet_tls_handshake_failures_total"
    labels = {"direction": "inbound", "reason": "expired"}
    assert metric(after, refused, **labels) == metric(before, refused, **labels) + 1
