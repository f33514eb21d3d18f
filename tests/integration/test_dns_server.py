"""The sidecar DNS server on real sockets on 127.0.0.1, asked by dnspython and by `dig`.

The "container's original resolver" is a second tiny DNS server of our own on 127.0.0.1;
no query ever leaves loopback.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from meshlet.model import Endpoint, Health, Service, ServicePort, Snapshot
from sidecar.catalog import Catalog
from sidecar.dns_server import DnsServer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
VIP = "198.19.128.5"
TIMEOUT_S = 3.0
FORWARD_TIMEOUT_S = 0.5
UPSTREAM_BIG = 60
needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) not installed")


def make_catalog(*, revision: int = 1, orders_vip: str = VIP, extra: int = 0) -> Catalog:
    orders = Service(
        namespace="shop", name="orders", ports=(ServicePort(port=8080),), vip=orders_vip
    )
    big = Service(namespace="shop", name="big", ports=(ServicePort(port=80),), vip="198.19.128.6")
    services = {s.key: s for s in (orders, big)}
    for i in range(extra):
        s = Service(
            namespace="shop",
            name=f"new{i}",
            ports=(ServicePort(port=80),),
            vip=f"198.19.129.{i + 1}",
        )
        services[s.key] = s
    endpoints = [
        Endpoint(
            id="orders-1", namespace="shop", service="orders", address="198.19.1.7", app_port=8080
        ),
        Endpoint(
            id="orders-2", namespace="shop", service="orders", address="198.19.2.7", app_port=8080
        ),
        Endpoint(
            id="orders-3",
            namespace="shop",
            service="orders",
            address="198.19.3.7",
            app_port=8080,
            health=Health.UNHEALTHY,
        ),
    ] + [
        Endpoint(
            id=f"big-{i}", namespace="shop", service="big", address=f"198.19.4.{i}", app_port=80
        )
        for i in range(1, 41)
    ]
    snap = Snapshot(revision=revision, services=services, endpoints={e.id: e for e in endpoints})
    return Catalog.from_snapshot(snap)


# ---- the upstream: a tiny authoritative server for example.test, UDP and TCP


def upstream_answer(wire: bytes, *, tcp: bool) -> bytes | None:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    name = query.question[0].name.to_text().lower()
    if name == "db.example.test.":
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, 30, "IN", "A", "198.18.0.99")
        )
    elif name == "big.example.test.":
        addresses = [f"198.18.1.{i}" for i in range(1, UPSTREAM_BIG + 1)]
        response.answer.append(
            dns.rrset.from_text_list(query.question[0].name, 30, "IN", "A", addresses)
        )
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire(max_size=65535 if tcp else 512, prefer_truncation=True)


@dataclass
class Upstream:
    address: tuple[str, int]
    seen: list[tuple[str, str]] = field(default_factory=list)  # (transport, name)
    asked: asyncio.Event = field(default_factory=asyncio.Event)


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream, silent: bool) -> None:
        self.upstream, self.silent = upstream, silent

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.upstream.seen.append(("udp", dns.message.from_wire(data).question[0].name.to_text()))
        self.upstream.asked.set()
        if not self.silent:
            self.transport.sendto(upstream_answer(data, tcp=False), addr)


async def start_upstream(*, silent: bool = False) -> tuple[Upstream, Callable[[], None]]:
    loop = asyncio.get_running_loop()
    upstream = Upstream(address=(HOST, 0))
    udp, _ = await loop.create_datagram_endpoint(
        lambda: _UpstreamUdp(upstream, silent), local_addr=(HOST, 0)
    )
    port = udp.get_extra_info("sockname")[1]
    upstream.address = (HOST, port)

    async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            wire = await reader.readexactly(size)
            upstream.seen.append(("tcp", dns.message.from_wire(wire).question[0].name.to_text()))
            answer = upstream_answer(wire, tcp=True)
            writer.write(len(answer).to_bytes(2, "big") + answer)
            await writer.drain()
        finally:
            writer.close()

    tcp = await asyncio.start_server(serve_tcp, HOST, port)

    def close() -> None:
        udp.close()
        tcp.close()

    return upstream, close


# ---- fixtures


@dataclass
class Box:
    catalog: Catalog


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up, close = await start_upstream()
    yield up
    close()


@pytest.fixture
def box() -> Box:
    return Box(make_catalog())


@pytest.fixture
async def server(box: Box, upstream: Upstream) -> AsyncIterator[DnsServer]:
    srv = DnsServer(
        (HOST, 0),
        lambda: box.catalog,
        "shop",
        [upstream.address],
        forward_timeout_s=FORWARD_TIMEOUT_S,
    )
    await srv.start()
    yield srv
    await srv.stop()


# ---- clients


async def udp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return await asyncio.to_thread(
        dns.query.udp, query, HOST, timeout=TIMEOUT_S, port=server.address[1]
    )


async def tcp(server: DnsServer, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await asyncio.to_thread(
        dns.query.tcp, query, HOST, timeout=TIMEOUT_S, port=server.address[1]
    )


async def dig(server: DnsServer, name: str, *options: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "dig",
        f"@{HOST}",
        "-p",
        str(server.address[1]),
        name,
        "+tries=1",
        "+time=2",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return out.decode()


def addresses(response: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in response.answer for rd in rrset]


def short(output: str) -> list[str]:
    return sorted(line for line in output.split() if line)


# ---- mesh names

MESH_NAMES = ["orders", "orders.shop", "orders.shop.svc.meshlet"]


@pytest.mark.parametrize("name", MESH_NAMES)
async def test_mesh_names_answer_the_vip_over_udp_and_tcp(server: DnsServer, name: str) -> None:
    for response in (await udp(server, name), await tcp(server, name)):
        assert response.rcode() == dns.rcode.NOERROR
        assert response.flags & dns.flags.AA
        assert addresses(response) == [VIP]
        assert 0 < response.answer[0].ttl <= 5


@needs_dig
@pytest.mark.parametrize("name", MESH_NAMES)
async def test_dig_gets_the_vip(server: DnsServer, name: str) -> None:
    assert short(await dig(server, name, "+short")) == [VIP]
    assert short(await dig(server, name, "+short", "+tcp")) == [VIP]


async def test_the_answer_echoes_the_question_case(server: DnsServer) -> None:
    response = await udp(server, "oRdErS.ShOp.SVC.meshlet")
    assert response.answer[0].name.to_text() == "oRdErS.ShOp.SVC.meshlet."  # 0x20 safe
    assert addresses(response) == [VIP]


@needs_dig
async def test_tasks_lists_the_healthy_endpoints_only(server: DnsServer) -> None:
    healthy = ["198.19.1.7", "198.19.2.7"]  # 198.19.3.7 is unhealthy
    assert sorted(addresses(await udp(server, "tasks.orders"))) == healthy
    assert sorted(addresses(await tcp(server, "tasks.orders.shop.svc.meshlet"))) == healthy
    assert short(await dig(server, "tasks.orders.shop", "+short")) == healthy


@needs_dig
async def test_unknown_mesh_name_is_nxdomain_with_a_short_soa(server: DnsServer) -> None:
    response = await udp(server, "nope.shop.svc.meshlet")
    assert response.rcode() == dns.rcode.NXDOMAIN
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= 5 and soa[0].minimum <= 5
    assert "status: NXDOMAIN" in await dig(server, "nope.shop.svc.meshlet")
    assert server.counters["nxdomain"] == 2


async def test_aaaa_for_a_service_is_nodata_not_nxdomain(server: DnsServer) -> None:
    response = await udp(server, "orders", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


# ---- forwarding


@needs_dig
async def test_other_names_are_forwarded_to_the_upstream(
    server: DnsServer, upstream: Upstream
) -> None:
    assert addresses(await udp(server, "db.example.test")) == ["198.18.0.99"]
    assert addresses(await tcp(server, "db.example.test")) == ["198.18.0.99"]
    assert short(await dig(server, "db.example.test", "+short")) == ["198.18.0.99"]
    assert (await udp(server, "missing.example.test")).rcode() == dns.rcode.NXDOMAIN
    assert ("udp", "db.example.test.") in upstream.seen
    assert ("tcp", "db.example.test.") in upstream.seen  # a TCP client is forwarded over TCP
    assert server.counters["forwarded"] == 4


@needs_dig
async def test_a_truncated_upstream_answer_reaches_the_client_over_tcp(
    server: DnsServer, upstream: Upstream
) -> None:
    over_udp = await udp(server, "big.example.test")
    assert over_udp.flags & dns.flags.TC
    out = await dig(server, "big.example.test", "+short", "+noedns")  # dig retries over TCP
    assert len(out.split()) == UPSTREAM_BIG
    assert ("tcp", "big.example.test.") in upstream.seen


async def test_a_silent_upstream_gives_servfail_within_the_timeout(box: Box) -> None:
    silent, close = await start_upstream(silent=True)
    srv = DnsServer(
        (HOST, 0),
        lambda: box.catalog,
        "shop",
        [silent.address],
        forward_timeout_s=FORWARD_TIMEOUT_S,
    )
    await srv.start()
    try:
        started = time.monotonic()
        response = await udp(srv, "db.example.test")
        elapsed = time.monotonic() - started
        assert response.rcode() == dns.rcode.SERVFAIL
        assert FORWARD_TIMEOUT_S * 0.8 <= elapsed < FORWARD_TIMEOUT_S + 1.0
        assert silent.seen == [("udp", "db.example.test.")]
        assert srv.counters["forward_failed"] == 1
        assert addresses(await udp(srv, "orders")) == [VIP]  # mesh names don't wait on it
    finally:
        await srv.stop()
        close()


async def test_a_closed_upstream_port_gives_servfail_and_the_next_upstream_answers(
    box: Box, upstream: Upstream
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        closed = s.getsockname()
    srv = DnsServer((HOST, 0), lambda: box.catalog, "shop", [closed], forward_timeout_s=5.0)
    both = DnsServer(
        (HOST, 0), lambda: box.catalog, "shop", [closed, upstream.address], forward_timeout_s=5.0
    )
    await srv.start()
    await both.start()
    try:
        started = time.monotonic()
        assert (await udp(srv, "db.example.test")).rcode() == dns.rcode.SERVFAIL
        assert addresses(await udp(both, "db.example.test")) == ["198.18.0.99"]
        assert time.monotonic() - started < 2.0  # ICMP port unreachable: no waiting
    finally:
        await srv.stop()
        await both.stop()


# ---- sizes, changes, abuse


@needs_dig
async def test_forty_endpoints_truncate_over_udp_and_come_whole_over_tcp(
    server: DnsServer,
) -> None:
    over_udp = await udp(server, "tasks.big")
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == []
    over_tcp = await tcp(server, "tasks.big")
    assert len(addresses(over_tcp)) == 40
    with_edns = await udp(server, "tasks.big", use_edns=0, payload=1232)  # fits in 1232
    assert not with_edns.flags & dns.flags.TC and len(addresses(with_edns)) == 40
    assert " tc" in await dig(server, "tasks.big", "+noedns", "+ignore")
    assert len((await dig(server, "tasks.big", "+noedns", "+short")).split()) == 40


async def test_tasks_answers_rotate_between_queries(server: DnsServer) -> None:
    first = addresses(await tcp(server, "tasks.orders"))
    second = addresses(await tcp(server, "tasks.orders"))
    assert sorted(first) == sorted(second) and first != second


async def test_a_catalog_change_is_visible_on_the_next_query(server: DnsServer, box: Box) -> None:
    assert (await udp(server, "new0.shop.svc.meshlet")).rcode() == dns.rcode.NXDOMAIN
    box.catalog = make_catalog(revision=2, extra=1)
    assert addresses(await udp(server, "new0.shop.svc.meshlet")) == ["198.19.129.1"]
    box.catalog = make_catalog(revision=3)
    response = await udp(server, "new0.shop.svc.meshlet")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.authority[0][0].serial == 3


def send_raw(port: int, junk: list[bytes], probe: bytes) -> dns.message.Message:
    """Send ``junk`` datagrams then ``probe``; return the reply that carries probe's id."""
    probe_id = int.from_bytes(probe[:2], "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT_S)
        for datagram in [*junk, probe]:
            s.sendto(datagram, (HOST, port))
        while True:
            reply = dns.message.from_wire(s.recv(512))
            if reply.id == probe_id:
                return reply


async def test_garbage_never_breaks_the_server(server: DnsServer) -> None:
    port = server.address[1]
    no_question = (0xBEEF).to_bytes(2, "big") + b"\x01\x00\x00\x01" + b"\x00" * 6  # qdcount 1
    update = (0xCAFE).to_bytes(2, "big") + b"\x28\x00" + b"\x00" * 8  # opcode UPDATE
    response_bit = dns.message.make_response(dns.message.make_query("orders", "A")).to_wire()
    junk = [b"", b"\x00", b"\xff" * 11, b"\x80\x00" * 64, response_bit]  # all dropped
    formerr = await asyncio.to_thread(send_raw, port, junk, no_question)
    assert (formerr.rcode(), formerr.question) == (dns.rcode.FORMERR, [])
    notimp = await asyncio.to_thread(send_raw, port, [bytes(range(256)) * 2], update)
    assert notimp.rcode() == dns.rcode.NOTIMP

    # A TCP client announcing 65535 bytes, sending three, and leaving.
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"\xff\xffabc")
    await writer.drain()
    writer.close()
    # A TCP client that sends a zero-length message and a garbage one, then a good one.
    good = dns.message.make_query("orders", "A")
    reader, writer = await asyncio.open_connection(HOST, port)
    wire = good.to_wire()
    writer.write(b"\x00\x00" + b"\x00\x05hello" + len(wire).to_bytes(2, "big") + wire)
    size = int.from_bytes(await reader.readexactly(2), "big")
    answer = dns.message.from_wire(await reader.readexactly(size))
    writer.close()
    assert answer.id == good.id and addresses(answer) == [VIP]

    assert addresses(await udp(server, "orders")) == [VIP]
    assert server.counters["formerr"] == 3  # no question, UPDATE, and the 512 junk bytes
    assert server.counters["dropped"] == 7  # five junk datagrams, two short TCP frames


async def test_pipelined_tcp_queries_and_a_half_closed_client(server: DnsServer) -> None:
    queries = [dns.message.make_query(n, "A") for n in ("orders", "db.example.test", "tasks.big")]
    reader, writer = await asyncio.open_connection(*server.address)
    for q in queries:
        wire = q.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
    writer.write_eof()  # still answered: the server closes only after the last answer
    by_id = {}
    for _ in queries:
        size = int.from_bytes(await reader.readexactly(2), "big")
        message = dns.message.from_wire(await reader.readexactly(size))
        by_id[message.id] = message
    assert await reader.read() == b""
    writer.close()
    assert addresses(by_id[queries[0].id]) == [VIP]
    assert addresses(by_id[queries[1].id]) == ["198.18.0.99"]
    assert len(addresses(by_id[queries[2].id])) == 40


def test_it_serves_under_uvloop(box: Box) -> None:
    """The sidecar runs on uvloop: the same server, the same answers."""

    async def scenario() -> None:
        up, close = await start_upstream()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            closed = s.getsockname()
        srv = DnsServer((HOST, 0), lambda: box.catalog, "shop", [closed, up.address])
        await srv.start()
        try:
            assert addresses(await udp(srv, "orders.shop")) == [VIP]
            assert "status: NXDOMAIN" in await dig(srv, "nope.shop.svc.meshlet")
            assert len(addresses(await tcp(srv, "tasks.big"))) == 40
            assert addresses(await udp(srv, "db.example.test")) == ["198.18.0.99"]
            assert addresses(await tcp(srv, "db.example.test")) == ["198.18.0.99"]
        finally:
            await srv.stop()
            close()

    uvloop.run(scenario())


async def test_forwards_beyond_the_limit_get_servfail_at_once(box: Box) -> None:
    silent, close = await start_upstream(silent=True)
    srv = DnsServer(
        (HOST, 0),
        lambda: box.catalog,
        "shop",
        [silent.address],
        forward_timeout_s=1.0,
        max_forwards=1,
    )
    await srv.start()
    try:
        waiting = asyncio.ensure_future(udp(srv, "db.example.test"))
        await asyncio.wait_for(silent.asked.wait(), TIMEOUT_S)
        started = time.monotonic()
        assert (await udp(srv, "other.example.test")).rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 0.5
        assert (await waiting).rcode() == dns.rcode.SERVFAIL
        assert srv.counters["forward_failed"] == 2
    finally:
        await srv.stop()
        close()


async def test_an_idle_tcp_client_is_disconnected(box: Box) -> None:
    srv = DnsServer((HOST, 0), lambda: box.catalog, "shop", [], tcp_idle_timeout_s=0.2)
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection(*srv.address)
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""  # closed by the server
        writer.close()
        assert addresses(await tcp(srv, "orders")) == [VIP]
    finally:
        await srv.stop()


async def test_a_failing_catalog_provider_gives_servfail_not_silence(box: Box) -> None:
    broken = True

    def provider() -> Catalog:
        if broken:
            raise RuntimeError("catalog not loaded")
        return box.catalog

    srv = DnsServer((HOST, 0), provider, "shop", [])
    await srv.start()
    try:
        assert (await udp(srv, "orders")).rcode() == dns.rcode.SERVFAIL
        broken = False
        assert addresses(await udp(srv, "orders")) == [VIP]
        assert srv.counters["error"] == 1
    finally:
        await srv.stop()
