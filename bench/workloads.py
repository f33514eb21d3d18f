"""What the comparison measures: the paths (one mesh service each), the workloads run
over them, and the goals from issue 8 ("What good looks like") they are judged against.

For: plain data shared by the HAProxy config generator, the runner and the report.
Must never: start processes or touch sockets; figures live in results, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("direct", "meshlet", "haproxy")
HOPS = 2  # client → outbound proxy → inbound proxy → server


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyPath:
    """One client → server path, proxied by both proxies the same way.

    ``mesh_protocol`` is the protocol the mesh service's port is declared with (what
    the sidecar does with it); ``haproxy_mode`` the HAProxy equivalent: ``tcp`` (L4),
    ``http`` (HTTP/1.1 per request) or ``h2`` (mode http, HTTP/2 end to end, gRPC)."""

    name: str
    app: str  # bulk | echo | nginx | grpc
    mesh_protocol: str  # tcp | http | grpc
    haproxy_mode: str  # tcp | http | h2
    mesh_port: int


PATHS = (
    ProxyPath(name="bulk", app="bulk", mesh_protocol="tcp", haproxy_mode="tcp", mesh_port=9000),
    ProxyPath(name="echo", app="echo", mesh_protocol="tcp", haproxy_mode="tcp", mesh_port=9001),
    ProxyPath(name="http", app="nginx", mesh_protocol="http", haproxy_mode="http", mesh_port=8080),
    ProxyPath(name="httpl4", app="nginx", mesh_protocol="tcp", haproxy_mode="tcp", mesh_port=8081),
    ProxyPath(name="grpc", app="grpc", mesh_protocol="grpc", haproxy_mode="h2", mesh_port=50051),
)
PATH_BY_NAME = {p.name: p for p in PATHS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    id: str
    title: str
    path: str  # a Path name
    kind: str  # bulk | pingpong | wrk | grpc | churn
    primary: str  # the headline figure in each run's results
    unit: str
    higher_is_better: bool
    connections: int = 1  # wrk connections, gRPC concurrency, churn concurrency
    latency: tuple[str, ...] = ()  # latency figures (for the latency chart), p50 first
    latency_unit: str = ""


WORKLOADS = (
    Workload(
        id="bulk",
        title="L4 bulk, each way",
        path="bulk",
        kind="bulk",
        primary="mb_per_s",
        unit="MB/s",
        higher_is_better=True,
    ),
    Workload(
        id="pingpong",
        title="L4 100-byte ping-pong, one connection",
        path="echo",
        kind="pingpong",
        primary="rtt_per_s",
        unit="round trips/s",
        higher_is_better=True,
        latency=("p50_us", "p99_us"),
        latency_unit="µs",
    ),
    Workload(
        id="http-c1",
        title="HTTP/1.1 keep-alive (wrk → nginx), L7, 1 connection",
        path="http",
        kind="wrk",
        primary="rps",
        unit="req/s",
        higher_is_better=True,
        connections=1,
        latency=("p50_ms", "p99_ms"),
        latency_unit="ms",
    ),
    Workload(
        id="http-c32",
        title="HTTP/1.1 keep-alive (wrk → nginx), L7, 32 connections",
        path="http",
        kind="wrk",
        primary="rps",
        unit="req/s",
        higher_is_better=True,
        connections=32,
        latency=("p50_ms", "p99_ms"),
        latency_unit="ms",
    ),
    Workload(
        id="http-l4-c32",
        title="HTTP/1.1 keep-alive (wrk → nginx) through L4, 32 connections",
        path="httpl4",
        kind="wrk",
        primary="rps",
        unit="req/s",
        higher_is_better=True,
        connections=32,
        latency=("p50_ms", "p99_ms"),
        latency_unit="ms",
    ),
    Workload(
        id="grpc-c1",
        title="gRPC unary (grpc.aio, 100 B), 1 concurrent",
        path="grpc",
        kind="grpc",
        primary="qps",
        unit="QPS",
        higher_is_better=True,
        connections=1,
        latency=("p50_ms", "p99_ms"),
        latency_unit="ms",
    ),
    Workload(
        id="grpc-c16",
        title="gRPC unary (grpc.aio, 100 B), 16 concurrent",
        path="grpc",
        kind="grpc",
        primary="qps",
        unit="QPS",
        higher_is_better=True,
        connections=16,
        latency=("p50_ms", "p99_ms"),
        latency_unit="ms",
    ),
    Workload(
        id="churn",
        title="Connection churn: a new TCP connection per 1-byte request, 16 at a time",
        path="echo",
        kind="churn",
        primary="conns_per_s",
        unit="conn/s",
        higher_is_better=True,
        connections=16,
    ),
)
WORKLOAD_BY_ID = {w.id: w for w in WORKLOADS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """How much each run does: the full run, or --quick."""

    bulk_mib: int
    pingpong_rounds: int
    seconds: float  # wrk, gRPC and churn run for this long
    runs: int
    idle_conns: tuple[int, ...]
    watchers: int
    registrations: int
    cp_endpoints: int
    profile_s: float
    settle_s: float  # memory: wait this long before reading RSS


FULL = Sizes(
    bulk_mib=1024,
    pingpong_rounds=20_000,
    seconds=3.0,
    runs=3,
    idle_conns=(1000, 5000),
    watchers=1000,
    registrations=20,
    cp_endpoints=10_000,
    profile_s=6.0,
    settle_s=1.0,
)
QUICK = Sizes(
    bulk_mib=64,
    pingpong_rounds=2_000,
    seconds=1.0,
    runs=3,
    idle_conns=(100, 500),
    watchers=200,
    registrations=5,
    cp_endpoints=500,
    profile_s=3.0,
    settle_s=0.5,
)
