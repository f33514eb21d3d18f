"""sidecar.dns without sockets: what each name means, what malformed input gets, and
(hypothesis) that no input makes the parse → decide → render path raise."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.model import Endpoint, Health, Service, ServicePort, Snapshot
from sidecar.catalog import Catalog
from sidecar.dns import (
    OUR_PAYLOAD,
    Forward,
    Outcome,
    Reply,
    Upstream,
    check_upstream,
    decide,
    parse_query,
    parse_resolv_conf,
    render,
    servfail,
    udp_limit,
)

VIP = "198.19.128.5"


def endpoint(i: int, service: str = "orders", health: Health = Health.HEALTHY) -> Endpoint:
    return Endpoint(
        id=f"{service}-{i}",
        namespace="shop",
        service=service,
        address=f"198.19.{i}.7",
        app_port=8080,
        health=health,
    )


def catalog(*endpoints: Endpoint, vip: str | None = VIP, revision: int = 9) -> Catalog:
    services = [
        Service(namespace="shop", name="orders", ports=(ServicePort(port=8080),), vip=vip),
        Service(namespace="shop", name="empty", ports=(ServicePort(port=80),), vip="198.19.128.9"),
        Service(
            namespace="billing", name="ledger", ports=(ServicePort(port=80),), vip="198.19.128.7"
        ),
    ]
    if not endpoints:
        endpoints = (endpoint(1), endpoint(2), endpoint(3, health=Health.UNHEALTHY))
    snap = Snapshot(
        revision=revision,
        services={s.key: s for s in services},
        endpoints={e.id: e for e in endpoints},
    )
    return Catalog.from_snapshot(snap)


CATALOG = catalog()


def ask(name: str, rdtype: str = "A", *, cat: Catalog = CATALOG, **kw: object) -> Reply:
    result = decide(dns.message.make_query(name, rdtype), cat, "shop", **kw)  # type: ignore[arg-type]
    assert isinstance(result, Reply), f"{name} was forwarded"
    return result


def addresses(reply: Reply) -> list[str]:
    return [rd.to_text() for rrset in reply.message.answer for rd in rrset]


# ---- what names mean


@pytest.mark.parametrize(
    "name",
    [
        "orders",
        "orders.shop",
        "orders.shop.svc.meshlet",
        "ORDERS.Shop.Svc.Meshlet.",
        "ledger.billing",
    ],
)
def test_service_names_answer_the_vip_authoritatively(name: str) -> None:
    reply = ask(name)
    expected = "198.19.128.7" if "ledger" in name else VIP
    assert addresses(reply) == [expected]
    assert reply.outcome is Outcome.ANSWERED
    assert reply.message.rcode() == dns.rcode.NOERROR
    assert reply.message.flags & dns.flags.AA and reply.message.flags & dns.flags.RA
    assert reply.message.answer[0].ttl == 5


def test_the_answer_echoes_the_question_bytes() -> None:
    reply = ask("oRdErS.sHoP")
    wire = dns.message.from_wire(render(reply, max_size=512))
    assert wire.answer[0].name.labels == (b"oRdErS", b"sHoP", b"")
    assert wire.question[0].name.labels == (b"oRdErS", b"sHoP", b"")


def test_ttl_is_the_one_given() -> None:
    assert ask("orders", ttl=1).message.answer[0].ttl == 1
    assert ask("nope.shop.svc.meshlet", ttl=2).message.authority[0].ttl == 2


def test_tasks_lists_healthy_endpoints_and_rotates() -> None:
    assert addresses(ask("tasks.orders")) == ["198.19.1.7", "198.19.2.7"]
    assert addresses(ask("tasks.orders.shop.svc.meshlet", rotation=1)) == [
        "198.19.2.7",
        "198.19.1.7",
    ]
    assert addresses(ask("tasks.orders", rotation=2)) == ["198.19.1.7", "198.19.2.7"]


def test_ipv6_endpoints_answer_aaaa_queries_only() -> None:
    v6 = Endpoint(id="o-6", namespace="shop", service="orders", address="fd00::7", app_port=80)
    cat = catalog(endpoint(1), v6)
    assert addresses(ask("tasks.orders", "A", cat=cat)) == ["198.19.1.7"]
    assert addresses(ask("tasks.orders", "AAAA", cat=cat)) == ["fd00::7"]


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("orders", "AAAA"),  # VIPs are IPv4: NODATA, so the app falls back to A
        ("orders.shop.svc.meshlet", "MX"),
        ("orders", "TXT"),
        ("tasks.empty", "A"),  # a service with no healthy endpoint (see decide's docstring)
        ("shop.svc.meshlet", "A"),  # a namespace: an empty non-terminal, not NXDOMAIN
        ("svc.meshlet", "A"),  # the zone apex
    ],
)
def test_known_names_without_such_records_are_nodata_with_soa(name: str, rdtype: str) -> None:
    reply = ask(name, rdtype)
    assert reply.message.rcode() == dns.rcode.NOERROR
    assert reply.message.answer == []
    soa = reply.message.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= 5 and soa[0].minimum <= 5
    assert reply.outcome is Outcome.ANSWERED


def test_a_service_without_vip_yet_is_nodata() -> None:
    reply = ask("orders", cat=catalog(vip=None))
    assert reply.message.rcode() == dns.rcode.NOERROR and reply.message.answer == []


def test_any_gets_the_addresses_we_have() -> None:
    assert addresses(ask("orders", "ANY")) == [VIP]  # RFC 8482: a subset is fine


def test_apex_soa_carries_the_catalog_revision() -> None:
    reply = ask("svc.meshlet", "SOA", cat=catalog(revision=42))
    assert reply.message.answer[0][0].serial == 42


@pytest.mark.parametrize(
    "name",
    [
        "nope.shop.svc.meshlet",
        "tasks.nope.shop.svc.meshlet",
        "orders.nowhere.svc.meshlet",
        "a.b.c.svc.meshlet",
        "nowhere.svc.meshlet",
        "or\\.ders.shop.svc.meshlet",  # a dot inside a label is not a service name
    ],
)
def test_unknown_names_in_the_mesh_domain_are_nxdomain(name: str) -> None:
    reply = ask(name)
    assert reply.outcome is Outcome.NXDOMAIN
    assert reply.message.rcode() == dns.rcode.NXDOMAIN
    assert reply.message.flags & dns.flags.AA
    soa = reply.message.authority[0]
    assert soa.name == dns.name.from_text("svc.meshlet")
    assert soa.ttl <= 5 and soa[0].minimum <= 5 and soa[0].serial == 9


@pytest.mark.parametrize(
    "name", ["db.example.test", "nope", "tasks.nope", "orders.billing", "example.test", "."]
)
def test_other_names_are_forwarded(name: str) -> None:
    query = dns.message.make_query(name, "A")
    result = decide(query, CATALOG, "shop")
    assert isinstance(result, Forward) and result.query is query


# ---- malformed and unsupported queries


def test_several_questions_get_formerr() -> None:
    query = dns.message.make_query("orders", "A")
    query.question.append(dns.rrset.RRset(dns.name.from_text("orders"), 1, 28))
    reply = decide(query, CATALOG, "shop")
    assert isinstance(reply, Reply) and reply.message.rcode() == dns.rcode.FORMERR
    assert reply.outcome is Outcome.FORMERR


def test_no_question_gets_formerr() -> None:
    query = dns.message.Message()
    reply = decide(query, CATALOG, "shop")
    assert isinstance(reply, Reply) and reply.message.rcode() == dns.rcode.FORMERR


def test_a_response_gets_formerr_from_decide_and_is_dropped_off_the_wire() -> None:
    response = dns.message.make_response(dns.message.make_query("orders", "A"))
    reply = decide(response, CATALOG, "shop")
    assert isinstance(reply, Reply) and reply.message.rcode() == dns.rcode.FORMERR
    assert parse_query(response.to_wire()) is None  # never answer a response (loops)


def test_other_opcodes_get_notimp() -> None:
    query = dns.message.make_query("orders", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    reply = decide(query, CATALOG, "shop")
    assert isinstance(reply, Reply) and reply.message.rcode() == dns.rcode.NOTIMP
    parsed = parse_query(query.to_wire())
    assert isinstance(parsed, Reply) and parsed.message.rcode() == dns.rcode.NOTIMP
    assert parsed.message.id == query.id


def test_edns_version_1_gets_badvers() -> None:
    query = dns.message.make_query("orders", "A", use_edns=1)
    reply = decide(query, CATALOG, "shop")
    assert isinstance(reply, Reply) and reply.message.rcode() == dns.rcode.BADVERS


def test_parse_query_cases() -> None:
    assert parse_query(b"") is None
    assert parse_query(b"\x12\x34\x01\x00") is None  # shorter than a header
    garbage = parse_query(b"\x12\x34\x01\x00\x00\x05" + b"\x00" * 6 + b"\xff\xff")
    assert isinstance(garbage, Reply)
    assert garbage.message.id == 0x1234 and garbage.message.rcode() == dns.rcode.FORMERR
    assert garbage.message.flags & dns.flags.RD  # copied from the query
    wire = render(garbage, max_size=512)
    assert len(wire) == 12 and dns.message.from_wire(wire).flags & dns.flags.QR
    query = dns.message.make_query("orders", "A")
    parsed = parse_query(query.to_wire())
    assert isinstance(parsed, dns.message.Message) and parsed.question == query.question


# ---- sizes


def test_big_answers_are_truncated_with_tc_and_whole_over_tcp() -> None:
    cat = catalog(*(endpoint(i, "orders") for i in range(1, 41)))
    reply = ask("tasks.orders", cat=cat)
    small = dns.message.from_wire(render(reply, max_size=udp_limit(None)))
    assert small.flags & dns.flags.TC and small.answer == []
    assert small.question == reply.message.question
    whole = dns.message.from_wire(render(reply, max_size=65535))
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 40


def test_udp_limit_follows_edns_within_bounds() -> None:
    assert udp_limit(dns.message.make_query("a", "A")) == 512
    assert udp_limit(dns.message.make_query("a", "A", use_edns=0, payload=4096)) == OUR_PAYLOAD
    assert udp_limit(dns.message.make_query("a", "A", use_edns=0, payload=100)) == 512
    assert udp_limit(dns.message.make_query("a", "A", use_edns=0, payload=900)) == 900
    query = dns.message.make_query("a", "A", use_edns=0, payload=4096)
    assert udp_limit(query, cap=65535) == 4096


# ---- upstream answers


def test_check_upstream() -> None:
    query = dns.message.make_query("db.example.test", "A")
    good = dns.message.make_response(query)
    assert check_upstream(query, good.to_wire()) is Upstream.ANSWER
    other_case = dns.message.make_response(dns.message.make_query("DB.example.TEST", "A"))
    other_case.id = query.id
    assert check_upstream(query, other_case.to_wire()) is Upstream.ANSWER
    good.flags |= dns.flags.TC
    assert check_upstream(query, good.to_wire()) is Upstream.TRUNCATED
    assert check_upstream(query, render(servfail(query), max_size=512)) is Upstream.TRY_NEXT
    wrong_id = dns.message.make_response(query)
    wrong_id.id = (query.id + 1) % 65536
    assert check_upstream(query, wrong_id.to_wire()) is Upstream.NOT_OURS
    other_name = dns.message.make_response(dns.message.make_query("x.example.test", "A"))
    other_name.id = query.id
    assert check_upstream(query, other_name.to_wire()) is Upstream.NOT_OURS
    assert check_upstream(query, query.to_wire()) is Upstream.NOT_OURS  # not a response
    assert check_upstream(query, b"\x00") is Upstream.NOT_OURS


def test_servfail_is_not_authoritative() -> None:
    reply = servfail(dns.message.make_query("db.example.test", "A"))
    assert reply.message.rcode() == dns.rcode.SERVFAIL
    assert not reply.message.flags & dns.flags.AA
    assert reply.outcome is Outcome.FORWARD_FAILED


# ---- resolv.conf


def test_parse_resolv_conf_reads_nameservers_like_glibc() -> None:
    text = """
# Generated by Docker Engine.
search shop.example
nameserver 127.0.0.11   # Docker's embedded DNS: the original resolver, kept
nameserver 127.0.0.53
;nameserver 127.0.0.9
nameserver not-an-address
nameserver 127.0.0.11
nameserver ::1
options ndots:0
nameserver 127.0.0.8
"""
    assert parse_resolv_conf(text) == ["127.0.0.11", "127.0.0.53", "::1"]
    assert parse_resolv_conf(text, exclude=["127.0.0.53"]) == ["127.0.0.11", "::1", "127.0.0.8"]
    assert parse_resolv_conf("") == []
    assert parse_resolv_conf("nameserver\nnameserver0 127.0.0.1") == []


# ---- properties


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_never_raise(wire: bytes) -> None:
    parsed = parse_query(wire)
    if parsed is None:
        return
    result = parsed if isinstance(parsed, Reply) else decide(parsed, CATALOG, "shop")
    if isinstance(result, Reply):
        out = render(result, max_size=512)
        assert len(out) <= 512
        assert int.from_bytes(out[:2], "big") == int.from_bytes(wire[:2], "big")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200), st.integers(0, 255))
def test_mutated_queries_never_raise(name: bytes, position: int, byte: int) -> None:
    wire = bytearray(dns.message.make_query("orders.shop", "A", use_edns=0).to_wire())
    wire[position % len(wire)] = byte
    wire += name[: position % 4]
    parsed = parse_query(bytes(wire))
    if isinstance(parsed, dns.message.Message):
        result = decide(parsed, CATALOG, "shop")
        if isinstance(result, Reply):
            render(result, max_size=65535)


any_label = st.binary(min_size=1, max_size=20) | st.sampled_from(
    [b"tasks", b"orders", b"shop", b"svc", b"meshlet", b"ORDERS", b"Svc", b"or.ders"]
)
rdtypes = st.sampled_from(["A", "AAAA", "ANY", "MX", "TXT", "SOA", "NS", "PTR", "SRV", "TYPE65280"])


@settings(max_examples=400, deadline=None)
@given(st.lists(any_label, max_size=6), rdtypes, st.sampled_from(["IN", "CH", "ANY"]))
def test_any_name_never_raises_and_the_question_comes_back(
    labels: list[bytes], rdtype: str, rdclass: str
) -> None:
    try:
        name = dns.name.Name([*labels, b""])
    except dns.name.NameTooLong:
        return
    query = dns.message.make_query(name, rdtype, rdclass)
    parsed = parse_query(query.to_wire())
    assert isinstance(parsed, dns.message.Message)
    result = decide(parsed, CATALOG, "shop")
    if isinstance(result, Forward):
        return
    back = dns.message.from_wire(render(result, max_size=65535))
    assert back.id == query.id
    assert [q.name.labels for q in back.question] == [name.labels]  # byte for byte
    for rrset in back.answer:
        assert rrset.name.labels == name.labels


dns_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda s: s not in {"tasks", "svc", "meshlet"}  # Docker's prefix and our domain
)


@st.composite
def catalogs(draw: st.DrawFn) -> tuple[Catalog, str]:
    namespaces = draw(st.lists(dns_label, min_size=1, max_size=3, unique=True))
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(namespaces), dns_label),
            min_size=1,
            max_size=12,
            unique=True,
        )
    )
    services = {}
    for i, (ns, name) in enumerate(keys):
        service = Service(
            namespace=ns, name=name, ports=(ServicePort(port=80),), vip=f"198.19.{128 + i}.{i + 1}"
        )
        services[service.key] = service
    snap = Snapshot(revision=draw(st.integers(0, 2**40)), services=services)
    return Catalog.from_snapshot(snap), draw(st.sampled_from(namespaces))


def recase(text: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c for c in text)


@settings(max_examples=150, deadline=None)
@given(catalogs(), st.randoms(use_true_random=False))
def test_mesh_names_always_answer_the_vip(
    generated: tuple[Catalog, str], rnd: random.Random
) -> None:
    cat, local = generated
    for service in cat.services.values():
        forms = [
            f"{service.name}.{service.namespace}",
            f"{service.name}.{service.namespace}.svc.meshlet",
        ]
        if service.namespace == local:
            forms.append(service.name)
        for form in forms:
            asked = recase(form, rnd)
            result = decide(dns.message.make_query(asked, "A"), cat, local)
            assert isinstance(result, Reply), asked
            assert result.message.flags & dns.flags.AA
            assert addresses(result) == [service.vip], asked
            assert result.message.answer[0].name.labels == dns.name.from_text(asked).labels
