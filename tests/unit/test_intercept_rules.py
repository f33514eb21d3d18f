"""The interception ruleset as text (sidecar/intercept.py) and the SO_ORIGINAL_DST
sockaddr parser (sidecar/origdst.py): what `meshlet sidecar init` would install, without
running nft. The real kernel behaviour is in tests/integration/test_interception_netns.py.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import InputError, MeshError
from sidecar.intercept import (
    PREAMBLE,
    InterceptConfig,
    parse_cidrs,
    parse_dns,
    parse_mark,
    parse_ports,
    removal,
    ruleset,
    summary,
)
from sidecar.origdst import AF_INET, AF_INET6, parse_sockaddr

DEFAULT_RULESET = """\
table inet meshlet {}
delete table inet meshlet
table inet meshlet {
\tcomment "installed by meshlet sidecar init; remove with --remove"
\tchain output {
\t\ttype nat hook output priority -110; policy accept;
\t\tmeta mark 0x539 return comment "sockets the sidecar marked"
\t\ttcp sport 15006 return comment "inbound listener: never captured"
\t\toifname "lo" return comment "stays in this namespace"
\t\tmeta l4proto tcp redirect to :15001 comment "app TCP to the outbound listener"
\t}
}
"""


def rules(script: str) -> list[str]:
    """The rule lines of the chain, in order (without the hook line)."""
    body = script.split("chain output {", 1)[1]
    lines = [line.strip() for line in body.splitlines()]
    return [line for line in lines if line and line != "}" and not line.startswith("type ")]


def index_of(lines: list[str], fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


def test_default_config_ruleset_is_exactly_this() -> None:
    assert ruleset(InterceptConfig()) == DEFAULT_RULESET


def test_full_config_has_every_rule_in_the_order_that_makes_it_correct() -> None:
    cfg = InterceptConfig(
        dns=("127.0.0.53", 53),
        exclude_ports=(9000, 22),
        exclude_cidrs=("198.18.5.0/24", "2001:db8::/32"),
        proxy_uid=1337,
    )
    lines = rules(ruleset(cfg))
    uid = index_of(lines, "meta skuid 1337 return")
    mark = index_of(lines, "meta mark 0x539 return")
    dns = index_of(lines, "th dport 53 dnat ip to 127.0.0.53:53")
    loopback = index_of(lines, 'oifname "lo" return')
    ports = index_of(lines, "tcp dport { 22, 9000 } return")
    v4 = index_of(lines, "ip daddr { 198.18.5.0/24 } return")
    v6 = index_of(lines, "ip6 daddr { 2001:db8::/32 } return")
    redirect = index_of(lines, "meta l4proto tcp redirect to :15001")
    # the sidecar's own DNS lookups and connections must never be captured, so the
    # exemptions come first; DNS to 127.0.0.53 is captured before the loopback return.
    assert uid < mark < dns < loopback < ports < min(v4, v6) < redirect == len(lines) - 1
    assert "meta nfproto ipv4 meta l4proto { tcp, udp }" in lines[dns]


def test_ipv6_dns_is_dnat_for_ipv6_only() -> None:
    script = ruleset(InterceptConfig(dns=parse_dns("[::1]:5353")))
    assert (
        "meta nfproto ipv6 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [::1]:5353" in script
    )
    assert "dnat ip " not in script


def test_without_dns_port_53_is_ordinary_traffic() -> None:
    assert "dport 53" not in ruleset(InterceptConfig())


def test_capture_loopback_drops_the_loopback_return() -> None:
    assert "oifname" not in ruleset(InterceptConfig(capture_loopback=True))


def test_custom_ports_and_mark() -> None:
    script = ruleset(InterceptConfig(outbound_port=16001, inbound_port=16006, proxy_mark=7))
    assert "redirect to :16001" in script
    assert "tcp sport 16006 return" in script
    assert "meta mark 0x7 return" in script


def test_removal_deletes_only_our_table_and_is_safe_when_absent() -> None:
    assert removal() == "table inet meshlet {}\ndelete table inet meshlet\n"


def test_summary_is_one_line_naming_what_is_captured() -> None:
    cfg = InterceptConfig(dns=("127.0.0.53", 53), proxy_uid=1337, exclude_ports=(22,))
    line = summary(cfg)
    assert "\n" not in line
    assert line == (
        "table inet meshlet: app TCP → :15001; DNS → 127.0.0.53:53; "
        "exempt uid 1337 and mark 0x539; excluded ports 22"
    )


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"outbound_port": 0}, "--outbound-port"),
        ({"outbound_port": 70000}, "--outbound-port"),
        ({"inbound_port": -1}, "--inbound-port"),
        ({"inbound_port": 15001}, "--inbound-port"),
        ({"dns": ("resolver", 53)}, "--dns"),
        ({"dns": ("127.0.0.53", 0)}, "--dns"),
        ({"exclude_ports": (22, 65536)}, "--exclude-ports"),
        ({"exclude_cidrs": ("198.18.0.0/33",)}, "--exclude-cidrs"),
        ({"proxy_uid": -1}, "--proxy-uid"),
        ({"proxy_uid": 2**32}, "--proxy-uid"),
        ({"proxy_mark": 0}, "--proxy-mark"),
        ({"proxy_mark": 2**32}, "--proxy-mark"),
    ],
)
def test_invalid_config_names_the_flag(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(InputError, match=re.escape(flag)):
        InterceptConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.53", ("127.0.0.53", 53)),
        ("127.0.0.53:5353", ("127.0.0.53", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_parse_dns(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns(text) == expected


@pytest.mark.parametrize("text", ["resolver", "127.0.0.53:", ":53", "127.0.0.53:x", "1.2.3.4:0"])
def test_parse_dns_rejects_with_the_flag(text: str) -> None:
    with pytest.raises(InputError, match="--dns"):
        parse_dns(text)


def test_parse_ports_takes_commas_and_repeats_and_dedupes() -> None:
    assert parse_ports(["22,80", "443", " 80 ,", ""]) == (22, 80, 443)
    with pytest.raises(InputError, match="--exclude-ports: 'http'"):
        parse_ports(["22,http"])


def test_parse_cidrs_and_mark() -> None:
    assert parse_cidrs(["198.18.5.9/24,2001:db8::1/64"]) == ("198.18.5.0/24", "2001:db8::/64")
    assert parse_mark("0x539") == 0x539 == parse_mark("1337")
    with pytest.raises(InputError, match="--proxy-mark"):
        parse_mark("lots")


def test_config_normalises_lists_so_equal_configs_compare_equal() -> None:
    a = InterceptConfig(exclude_ports=(80, 22, 80), exclude_cidrs=("198.18.5.9/24",))
    b = InterceptConfig(exclude_ports=(22, 80), exclude_cidrs=("198.18.5.0/24",))
    assert a == b and ruleset(a) == ruleset(b)


ports = st.integers(min_value=1, max_value=65535)
v4_nets = st.builds(
    lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_nets = st.builds(
    lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{p}", strict=False)),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
dns_addrs = st.sampled_from(["127.0.0.53", "198.18.0.53", "::1", "127.0.0.1"])


@st.composite
def configs(draw: st.DrawFn) -> InterceptConfig:
    outbound = draw(ports)
    inbound = draw(ports.filter(lambda p: p != outbound))
    return InterceptConfig(
        outbound_port=outbound,
        inbound_port=inbound,
        dns=draw(st.none() | st.tuples(dns_addrs, ports)),
        exclude_ports=tuple(draw(st.lists(ports, max_size=6))),
        exclude_cidrs=tuple(draw(st.lists(v4_nets | v6_nets, max_size=4))),
        proxy_uid=draw(st.none() | st.integers(0, 2**32 - 2)),
        proxy_mark=draw(st.integers(1, 2**32 - 1)),
        capture_loopback=draw(st.booleans()),
    )


@given(configs())
def test_every_config_gives_one_deterministic_idempotent_script(cfg: InterceptConfig) -> None:
    script = ruleset(cfg)
    assert script == ruleset(cfg)
    assert script.startswith(PREAMBLE)
    # the only table-level statements touch inet meshlet: never another table, never flush
    statements = [
        line for line in script.splitlines() if re.match(r"(table|delete|flush|add)\b", line)
    ]
    assert statements == [
        "table inet meshlet {}",
        "delete table inet meshlet",
        "table inet meshlet {",
    ]
    lines = rules(script)
    assert lines[-1].startswith(f"meta l4proto tcp redirect to :{cfg.outbound_port} ")
    assert sum("redirect" in line for line in lines) == 1
    # the sidecar's own traffic is exempted before anything else
    exempt = [f"meta skuid {cfg.proxy_uid} return"] if cfg.proxy_uid is not None else []
    exempt.append(f"meta mark {cfg.proxy_mark:#x} return")
    assert [line.split(" comment ")[0] for line in lines[: len(exempt)]] == exempt


def test_parse_sockaddr_ipv4() -> None:
    data = struct.pack("=H", AF_INET) + struct.pack("!H", 8080) + bytes([198, 19, 128, 5])
    assert parse_sockaddr(data + bytes(8)) == ("198.19.128.5", 8080)


def test_parse_sockaddr_ipv6() -> None:
    addr = ipaddress.IPv6Address("2001:db8::5").packed
    data = struct.pack("=H", AF_INET6) + struct.pack("!H", 443) + bytes(4) + addr + bytes(4)
    assert len(data) == 28
    assert parse_sockaddr(data) == ("2001:db8::5", 443)


@pytest.mark.parametrize("data", [b"", b"\x02", struct.pack("=H", 1) + bytes(14), b"\x02\x00\x00"])
def test_parse_sockaddr_rejects_what_is_not_a_sockaddr(data: bytes) -> None:
    with pytest.raises(MeshError, match="SO_ORIGINAL_DST"):
        parse_sockaddr(data)
