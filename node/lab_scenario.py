"""What a lab is made of, decided before anything is built: names, addresses, placement,
the demo scenario's services, and the nftables scripts the lab installs.

For: ``Layout`` (a prefix, a node count and an underlay /24 → every namespace name,
underlay address and replica placement), ``DEMO`` (the Swarm-like demo: ``web`` calling
``orders`` over HTTP, ``prices`` over gRPC, ``redis`` over TCP, and a ``load`` client),
``BENCH`` (the services of `make bench BENCH_ARGS=--lab`; the bench builds the containers),
``scale_plan`` (current replica indexes + a target → which to add and remove) and the
nft scripts for the containers' way to the control plane (masquerade) and for a
partition (drop VXLAN's UDP).

Must never: touch the system (no netlink, files, processes or sockets), read the clock or
``random``. The I/O lives in node/lab.py and its helpers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from meshlet.errors import InputError

DEFAULT_PREFIX = "meshlet-lab"
DEFAULT_UNDERLAY = "198.18.20.0/24"
OVERLAY_CIDR = "198.19.0.0/17"  # the control plane's default: one /24 per node
VXLAN_PORT = 4789
VNI = 4096
MAX_NODES = 8
MAX_REPLICAS = 16
UNDERLAY_DEV = "eth0"  # the underlay interface in every node and in the control plane
# resolv.conf names an address nobody in the lab has: a name resolves only because nft
# hands the query to the sidecar's DNS.
RESOLVER_OFFSET = 53
SIDECAR_DNS = "127.0.0.53:53"
SIDECAR_ADMIN_PORT = 15000
APP_UID = 65534  # apps run as nobody: their traffic is captured; sidecars run as root (uid 0)
CP_API_PORT, CP_GRPC_PORT, CP_GRPC_MTLS_PORT = 15080, 15010, 15012
DRAIN_TIMEOUT_S = 5.0

_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,22}[a-z0-9]")
_SERVICE = re.compile(r"(?P<ns>[a-z0-9-]+)/(?P<name>[a-z0-9-]+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """One service of a scenario: its port, what app its replicas run, how many, where."""

    namespace: str
    name: str
    port: int
    protocol: str  # "http" | "grpc" | "tcp": declared to the control plane
    app: str  # the app kind in node/lab_apps.py: "http", "grpc", "redis", "load"
    replicas: int
    first_node: int = 0  # replica i runs on node (first_node + i) % nodes
    policy: dict[str, Any] = field(default_factory=dict)  # the REST body's "policy"
    call: str = ""  # http apps: the URL each request calls (web → orders)
    client: bool = False  # a traffic source: not shown in `lab top`

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Traffic:
    """What the load container sends, per second, and for how long at most."""

    http_url: str = "http://web:8080/"
    http_per_s: float = 20.0
    grpc_target: str = "prices:50051"
    grpc_per_s: float = 5.0
    redis_host: str = "redis"
    redis_port: int = 6379
    redis_per_s: float = 2.0
    duration_s: float = 3600.0  # generators stop by themselves after this


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    services: tuple[ServiceSpec, ...]
    traffic: Traffic = field(default_factory=Traffic)

    def service(self, key: str) -> ServiceSpec:
        for s in self.services:
            if s.key == key:
                return s
        known = ", ".join(s.key for s in self.services)
        raise InputError(f"service {key!r} is not in the lab (it has {known})")


# Lab-tuned policy: round robin shows the spread at a glance; a short connect timeout, a
# per-try timeout (a request sent to a partitioned node gets no answer and no reset: it is
# abandoned and retried elsewhere) and short ejections make a kill or a partition play out
# in seconds instead of Envoy's defaults (5 s connects, no request timeout, 30 s ejection).
_SERVER_POLICY: dict[str, Any] = {
    "balancing": {"algorithm": "round_robin"},
    "timeouts": {"connect_s": 1.0, "request_s": 4.0},
    "retries": {"attempts": 3, "per_try_timeout_s": 1.0},
    "outlier_detection": {
        "consecutive_failures": 3,
        "base_ejection_s": 10.0,
        "max_ejection_percent": 50,
    },
}

DEMO = Scenario(
    name="demo",
    services=(
        ServiceSpec(
            namespace="shop",
            name="web",
            port=8080,
            protocol="http",
            app="http",
            replicas=1,
            call="http://orders:8080/orders",
            # web waits on orders (its tries and their timeouts): no per-try timeout here,
            # or the two layers of retries would multiply.
            policy={"timeouts": {"connect_s": 1.0, "request_s": 8.0}},
        ),
        ServiceSpec(
            namespace="shop",
            name="orders",
            port=8080,
            protocol="http",
            app="http",
            replicas=3,
            policy=_SERVER_POLICY,
        ),
        ServiceSpec(
            namespace="shop",
            name="prices",
            port=50051,
            protocol="grpc",
            app="grpc",
            replicas=2,
            first_node=1,
            policy=_SERVER_POLICY,
        ),
        ServiceSpec(
            namespace="shop",
            name="redis",
            port=6379,
            protocol="tcp",
            app="redis",
            replicas=1,
            first_node=1,
            policy={"timeouts": {"connect_s": 1.0}},
        ),
        ServiceSpec(
            namespace="shop",
            name="load",
            port=8080,
            protocol="http",
            app="load",
            replicas=1,
            client=True,
        ),
    ),
)
# `make bench BENCH_ARGS=--lab` (bench/lab_bench.py): only the services are declared here
# (their VIPs and policy); the bench builds its own containers (its apps, its clients, and
# plain containers without sidecars for the direct-overlay path), so no replica is started.
# The bench's path names and ports (bench/workloads.py PATHS); both proxies of the loopback
# comparison allow 8,000 connections per path, so the sidecars do here too.
_BENCH_POLICY: dict[str, Any] = {
    "circuit_breaker": {"max_connections": 8000, "max_pending": 8000, "max_requests": 8000}
}
_BENCH_PATHS: tuple[tuple[str, int, str], ...] = (
    ("bulk", 9000, "tcp"),
    ("echo", 9001, "tcp"),
    ("http", 8080, "http"),
    ("httpl4", 8081, "tcp"),  # nginx again, relayed as TCP: wrk through L4
    ("grpc", 50051, "grpc"),
    ("client", 9001, "tcp"),
)
BENCH = Scenario(
    name="bench",
    services=tuple(
        ServiceSpec(
            namespace="bench",
            name=name,
            port=port,
            protocol=protocol,
            app="bench",
            replicas=0,
            first_node=0 if name == "client" else 1,
            policy=_BENCH_POLICY,
            client=name == "client",
        )
        for name, port, protocol in _BENCH_PATHS
    ),
)
SCENARIOS = {DEMO.name: DEMO, BENCH.name: BENCH}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(
            f"--scenario {name!r} is not known: use one of {', '.join(sorted(SCENARIOS))}"
        ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Every name and underlay address of one lab, from its prefix and node count."""

    prefix: str
    nodes: int
    underlay: str = DEFAULT_UNDERLAY

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise InputError(
                f"--prefix {self.prefix!r}: use 2-24 lowercase letters, digits and '-', "
                "starting with a letter (like meshlet-lab)"
            )
        if not 1 <= self.nodes <= MAX_NODES:
            raise InputError(f"--nodes {self.nodes}: the lab builds 1-{MAX_NODES} nodes")
        try:
            net = ipaddress.IPv4Network(self.underlay)
        except ValueError:
            raise InputError(f"--underlay {self.underlay!r} is not an IPv4 network") from None
        if net.prefixlen != 24 or not net.subnet_of(ipaddress.IPv4Network("198.18.0.0/16")):
            raise InputError(
                f"--underlay {self.underlay}: use a /24 inside 198.18.0.0/16, "
                "like 198.18.20.0/24 (the lab never uses other ranges)"
            )

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.underlay)

    def _host(self, offset: int) -> str:
        return str(self.network.network_address + offset)

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def cp_netns(self) -> str:
        return f"{self.prefix}-cp"

    @property
    def cp_address(self) -> str:
        return self._host(2)

    @property
    def resolver(self) -> str:
        return self._host(RESOLVER_OFFSET)

    @property
    def api_url(self) -> str:
        return f"http://{self.cp_address}:{CP_API_PORT}"

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(f"node{i + 1}" for i in range(self.nodes))

    def node_netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def node_address(self, node: str) -> str:
        return self._host(10 + self.node_names.index(node) + 1)

    def container_netns(self, service: str, index: int) -> str:
        return f"{self.prefix}-{service}-{index}"

    def place(self, spec: ServiceSpec, index: int) -> str:
        """The node replica ``index`` of ``spec`` runs on: round robin from first_node."""
        return self.node_names[(spec.first_node + index) % self.nodes]

    def check_node(self, node: str) -> str:
        if node not in self.node_names:
            raise InputError(
                f"node {node!r} is not in the lab (it has {', '.join(self.node_names)})"
            )
        return node


def replica_name(service: str, index: int) -> str:
    """The replica's endpoint id and display name, e.g. ``orders-2``."""
    return f"{service}-{index}"


def parse_scale(text: str) -> tuple[str, int]:
    """``NS/NAME=N`` → (key, N)."""
    key, sep, count = text.partition("=")
    if not sep or not _SERVICE.fullmatch(key) or not count.isdigit():
        raise InputError(f"{text!r} must be NS/NAME=N, like shop/orders=4")
    n = int(count)
    if n > MAX_REPLICAS:
        raise InputError(f"{text!r}: the lab runs at most {MAX_REPLICAS} replicas of a service")
    return key, n


def parse_replica(text: str) -> tuple[str, int]:
    """``NS/NAME#I`` → (key, I)."""
    key, sep, index = text.partition("#")
    if not sep or not _SERVICE.fullmatch(key) or not index.isdigit():
        raise InputError(f"{text!r} must be NS/NAME#INDEX, like shop/orders#1")
    return key, int(index)


def scale_plan(current: set[int], target: int) -> tuple[list[int], list[int]]:
    """Indexes to add (the lowest unused) and to remove (the highest) to reach ``target``."""
    if target >= len(current):
        add: list[int] = []
        i = 0
        while len(current) + len(add) < target:
            if i not in current:
                add.append(i)
            i += 1
        return add, []
    return [], sorted(current, reverse=True)[: len(current) - target]


MASQUERADE_TABLE = "meshlet_lab_nat"
PARTITION_TABLE = "meshlet_lab_partition"


def masquerade_ruleset(overlay_cidr: str = OVERLAY_CIDR, dev: str = UNDERLAY_DEV) -> str:
    """In a node's namespace: containers reach the control plane on the underlay with the
    node's address (flannel's ip-masq), so the control plane needs no overlay routes."""
    return (
        f"table ip {MASQUERADE_TABLE} {{}}\n"
        f"delete table ip {MASQUERADE_TABLE}\n"
        f"table ip {MASQUERADE_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority 100; policy accept;\n"
        f'    oifname "{dev}" ip saddr {overlay_cidr} masquerade '
        'comment "containers to the underlay"\n'
        "  }\n"
        "}\n"
    )


def partition_ruleset(port: int = VXLAN_PORT) -> str:
    """In a node's namespace: drop the overlay's UDP both ways (what a partition looks like)."""
    rule = f'udp dport {port} drop comment "meshlet lab partition"'
    return (
        f"table inet {PARTITION_TABLE} {{}}\n"
        f"delete table inet {PARTITION_TABLE}\n"
        f"table inet {PARTITION_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    {rule}\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    {rule}\n"
        "  }\n"
        "}\n"
    )


def heal_ruleset() -> str:
    return f"table inet {PARTITION_TABLE} {{}}\ndelete table inet {PARTITION_TABLE}\n"


def service_body(spec: ServiceSpec) -> dict[str, Any]:
    """The PUT /v1/services/NS/NAME body."""
    return {"ports": [{"port": spec.port, "protocol": spec.protocol}], "policy": spec.policy}
