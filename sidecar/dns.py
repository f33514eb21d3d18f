"""What the sidecar's DNS server answers: mesh names from the catalog, everything else upstream.

``decide(query, catalog, namespace)`` turns one parsed DNS query into a ``Reply`` (a
response message we are authoritative for) or a ``Forward`` (ask the container's original
resolver). Around it: ``parse_query`` (wire bytes → query, or a FORMERR/NOTIMP reply, or
nothing to say), ``render`` (response → wire bytes, truncated with TC when it does not fit),
``check_upstream`` (is this datagram the answer to the query we forwarded?) and
``parse_resolv_conf``.

Names, after Docker Swarm: ``NAME`` (the caller's namespace), ``NAME.NS`` and
``NAME.NS.svc.meshlet`` answer the service's VIP; ``tasks.`` before any of them answers the
healthy endpoints' addresses. Matching ignores case; answers echo the question's bytes.

Pure: never imports asyncio or socket, never reads the clock or ``random``, never logs, and
never raises on any input — a malformed query becomes a FORMERR/NOTIMP reply or is dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshlet.model import Service
from sidecar.catalog import MESH_DOMAIN, Catalog

HEADER_LEN = 12
UDP_MIN_PAYLOAD = 512  # RFC 1035: what a client without EDNS can take over UDP
OUR_PAYLOAD = 1232  # DNS flag day 2020: the largest UDP answer we send, avoids fragmentation
TCP_MAX = 65535
MAX_NAMESERVERS = 3  # glibc's MAXNS: later `nameserver` lines are ignored
ZONE = dns.name.from_text(MESH_DOMAIN)
_HOSTMASTER = dns.name.from_text("hostmaster", ZONE)
_NS = dns.name.from_text("ns", ZONE)
_ADDRESS_TYPES = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}


class Outcome(StrEnum):
    """How a query ended; the DNS server counts queries by these names."""

    ANSWERED = "answered"  # we answered from the catalog (including NODATA)
    NXDOMAIN = "nxdomain"  # an unknown name inside the mesh domain
    FORWARDED = "forwarded"  # the upstream resolver answered
    FORWARD_FAILED = "forward_failed"  # no upstream answered in time: SERVFAIL
    FORMERR = "formerr"  # malformed or unsupported query: FORMERR, NOTIMP or BADVERS


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``message`` back to the client (``render`` it for the transport)."""

    message: dns.message.Message
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: send the client's query, unchanged, to the upstream resolver."""

    query: dns.message.Message


class Upstream(Enum):
    """``check_upstream``'s verdict on a datagram that came back from the upstream."""

    ANSWER = "answer"  # the response to our query: pass it to the client
    TRUNCATED = "truncated"  # the response, with TC: pass it through, the client retries on TCP
    TRY_NEXT = "try_next"  # SERVFAIL or REFUSED: ask the next upstream, if there is one
    NOT_OURS = "not_ours"  # garbage, or the answer to another query: ignore it, keep waiting


def parse_query(wire: bytes) -> dns.message.Message | Reply | None:
    """Parse a query off the wire; a reply says why it was refused; ``None`` means drop it.

    Messages shorter than a header, and responses (QR set), are dropped: answering a
    response invites two servers to bounce errors at each other forever (BIND and Unbound
    drop them too). Opcodes other than QUERY get NOTIMP; anything unparseable gets FORMERR.
    """
    if len(wire) < HEADER_LEN:
        return None
    query_id, flags = int.from_bytes(wire[0:2], "big"), int.from_bytes(wire[2:4], "big")
    if flags & dns.flags.QR:
        return None
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return Reply(_header_only(query_id, flags, dns.rcode.NOTIMP), Outcome.FORMERR)
    try:
        return dns.message.from_wire(wire)
    except Exception:  # dnspython raises many types for many kinds of garbage
        return Reply(_header_only(query_id, flags, dns.rcode.FORMERR), Outcome.FORMERR)


def decide(
    query: dns.message.Message,
    catalog: Catalog,
    local_namespace: str,
    *,
    ttl: int = 5,
    rotation: int = 0,
) -> Reply | Forward:
    """Answer ``query`` from ``catalog``, or say it must be forwarded.

    ``tasks.`` answers list the healthy endpoints rotated left by ``rotation`` (the server
    passes a counter: round robin across queries, as Docker shuffles). A known name asked
    for a type we have no records of — AAAA for a VIP, MX, TXT — is NODATA (NOERROR, no
    answer, SOA in authority), never NXDOMAIN, so resolvers don't cache the name away.
    ``tasks.NAME`` with no healthy endpoint is NODATA too: the service exists, its replica
    set is empty for now. (Docker forwards such names upstream, which leaks them and
    usually yields NXDOMAIN; the short negative TTL makes clients ask again soon.)
    """
    if query.flags & dns.flags.QR:
        return Reply(_header_only(query.id, query.flags, dns.rcode.FORMERR), Outcome.FORMERR)
    if query.opcode() != dns.opcode.QUERY:
        return Reply(_header_only(query.id, query.flags, dns.rcode.NOTIMP), Outcome.FORMERR)
    if len(query.question) != 1:
        return Reply(_response(query, dns.rcode.FORMERR, authoritative=False), Outcome.FORMERR)
    if query.edns > 0:  # RFC 6891 §6.1.3: we speak EDNS version 0 only
        return Reply(_response(query, dns.rcode.BADVERS, authoritative=False), Outcome.FORMERR)

    question = query.question[0]
    labels = _labels(question.name)
    service, tasks, in_domain = catalog.resolve_name(".".join(labels), local_namespace)
    zone = ZONE if in_domain else question.name
    if service is None:
        if not in_domain:
            return Forward(query)
        if labels[-2:] == ["svc", "meshlet"] and _exists_above_services(labels[:-2], catalog):
            soa_asked = len(labels) == 2 and question.rdtype in (
                dns.rdatatype.SOA,
                dns.rdatatype.ANY,
            )
            return _answer(
                query, [_soa(ZONE, catalog, ttl)] if soa_asked else [], zone, catalog, ttl
            )
        return _negative(query, dns.rcode.NXDOMAIN, ZONE, catalog, ttl)

    addresses = _addresses(catalog, service, tasks=tasks, rotation=rotation)
    rrsets = []
    if question.rdclass in (dns.rdataclass.IN, dns.rdataclass.ANY):
        for rdtype, version in _ADDRESS_TYPES.items():
            if question.rdtype not in (rdtype, dns.rdatatype.ANY):
                continue  # ANY gets the addresses we have (RFC 8482 allows a subset)
            wanted = [a for a in addresses if ipaddress.ip_address(a).version == version]
            if wanted:
                rrsets.append(
                    dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN, rdtype, wanted)
                )
    return _answer(query, rrsets, zone, catalog, ttl)


def render(reply: Reply, *, max_size: int) -> bytes:
    """Wire bytes of ``reply``, at most ``max_size`` long: what does not fit is left out
    and TC is set, so the client asks again over TCP (RFC 1035 §4.2.1, RFC 7766). Records
    keep their order (dnspython would shuffle them with ``random``; ``decide`` rotates)."""
    return reply.message.to_wire(max_size=max_size, prefer_truncation=True, want_shuffle=False)


def udp_limit(query: dns.message.Message | None, *, cap: int = OUR_PAYLOAD) -> int:
    """The largest UDP response ``query``'s sender accepts: 512, or its EDNS size up to ``cap``."""
    if query is None or query.edns < 0:
        return UDP_MIN_PAYLOAD
    return max(UDP_MIN_PAYLOAD, min(query.payload, cap))


def servfail(query: dns.message.Message) -> Reply:
    """The answer when no upstream answered (down, timed out, or too many forwards)."""
    return Reply(_response(query, dns.rcode.SERVFAIL, authoritative=False), Outcome.FORWARD_FAILED)


def truncated(query: dns.message.Message) -> Reply:
    """An empty answer with TC set: "ask me over TCP"."""
    message = _response(query, dns.rcode.NOERROR, authoritative=False)
    message.flags |= dns.flags.TC
    return Reply(message, Outcome.FORWARDED)


def check_upstream(query: dns.message.Message, wire: bytes) -> Upstream:
    """Judge a message from the upstream: the same id, QR set, the same question
    (compared without case, as resolvers using 0x20 randomisation expect)."""
    try:
        response = dns.message.from_wire(wire, question_only=True)
    except Exception:  # the upstream, or someone spoofing it, sent garbage
        return Upstream.NOT_OURS
    if not query.is_response(response):
        return Upstream.NOT_OURS
    if response.flags & dns.flags.TC:
        return Upstream.TRUNCATED
    if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
        return Upstream.TRY_NEXT
    return Upstream.ANSWER


def parse_resolv_conf(text: str, *, exclude: Iterable[str] = ()) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order, as glibc reads them: the
    first three valid ones, without duplicates. Addresses in ``exclude`` (the sidecar DNS
    server's own, once it has replaced resolv.conf) are skipped so we never forward to
    ourselves."""
    skip = {_normal_ip(a) for a in exclude}
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        address = _normal_ip(fields[1])
        if address is None or address in skip or address in found:
            continue
        found.append(address)
        if len(found) == MAX_NAMESERVERS:
            break
    return found


def _normal_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _labels(name: dns.name.Name) -> list[str]:
    """Lower-case text labels. A dot inside a label becomes a backslash, so that label
    can never match a service, namespace or the mesh domain."""
    return [label.decode("latin-1").lower().replace(".", "\\") for label in name.labels if label]


def _exists_above_services(labels: list[str], catalog: Catalog) -> bool:
    """``svc.meshlet`` itself and ``NS.svc.meshlet`` for a namespace with services exist
    (empty non-terminals): NXDOMAIN there would tell RFC 8020 resolvers that every
    service name below is gone too."""
    if not labels:
        return True
    return len(labels) == 1 and any(s.namespace == labels[0] for s in catalog.services.values())


def _addresses(catalog: Catalog, service: Service, *, tasks: bool, rotation: int) -> list[str]:
    if not tasks:
        return [service.vip] if service.vip else []
    addresses = list(dict.fromkeys(e.address for e in catalog.endpoints(service)))
    if not addresses:
        return []
    turn = rotation % len(addresses)
    return addresses[turn:] + addresses[:turn]


def _answer(
    query: dns.message.Message,
    rrsets: list[dns.rrset.RRset],
    zone: dns.name.Name,
    catalog: Catalog,
    ttl: int,
) -> Reply:
    if not rrsets:
        return _negative(query, dns.rcode.NOERROR, zone, catalog, ttl)
    response = _response(query, dns.rcode.NOERROR)
    response.answer.extend(rrsets)
    return Reply(response, Outcome.ANSWERED)


def _negative(
    query: dns.message.Message,
    rcode: dns.rcode.Rcode,
    zone: dns.name.Name,
    catalog: Catalog,
    ttl: int,
) -> Reply:
    """NXDOMAIN or NODATA with the zone's SOA, whose TTL and MINIMUM bound negative
    caching (RFC 2308) to ``ttl``."""
    response = _response(query, rcode)
    response.authority.append(_soa(zone, catalog, ttl))
    outcome = Outcome.NXDOMAIN if rcode == dns.rcode.NXDOMAIN else Outcome.ANSWERED
    return Reply(response, outcome)


def _soa(zone: dns.name.Name, catalog: Catalog, ttl: int) -> dns.rrset.RRset:
    serial = catalog.revision & 0xFFFFFFFF
    text = f"{_NS} {_HOSTMASTER} {serial} {ttl} {ttl} {ttl} {ttl}"
    return dns.rrset.from_text_list(zone, ttl, dns.rdataclass.IN, dns.rdatatype.SOA, [text])


def _response(
    query: dns.message.Message, rcode: dns.rcode.Rcode, *, authoritative: bool = True
) -> dns.message.Message:
    # RA: we do recurse for the client, by forwarding what is not ours.
    response = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
    if authoritative:
        response.flags |= dns.flags.AA
    response.set_rcode(rcode)
    return response


def _header_only(query_id: int, flags: int, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """A response made from a query's header alone: same id, opcode and RD, no sections
    (the question is left out when it could not be read)."""
    response = dns.message.Message(id=query_id)
    response.flags = dns.flags.QR | dns.flags.RA | (flags & (0x7800 | dns.flags.RD))
    response.set_rcode(rcode)
    return response
