"""The sidecar's Prometheus metrics (own registry; Linkerd's names and labels where they
exist). Byte counts of open connections are read from the relays' counters when
scraped, so the data path never touches a metric per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _Live(Collector):
    """Bytes and open connections, summed from live relays plus closed totals."""

    def __init__(
        self,
        source: Callable[[], Iterable[tuple[str, str, int, int]]],
        closed: dict[tuple[str, str], list[int]],
    ) -> None:
        self.source = source
        self.closed = closed

    def collect(self) -> Iterable[Any]:
        read = CounterMetricFamily(
            "meshlet_tcp_read_bytes",
            "Bytes read from the connection's client side.",
            labels=["direction", "service"],
        )
        write = CounterMetricFamily(
            "meshlet_tcp_write_bytes",
            "Bytes written back to the connection's client side.",
            labels=["direction", "service"],
        )
        open_ = GaugeMetricFamily(
            "meshlet_tcp_open_connections", "Connections open now.", labels=["direction", "service"]
        )
        totals: dict[tuple[str, str], list[int]] = {
            k: [v[0], v[1], 0] for k, v in self.closed.items()
        }
        for direction, service, sent, received in self.source():
            row = totals.setdefault((direction, service), [0, 0, 0])
            row[0] += sent
            row[1] += received
            row[2] += 1
        for (direction, service), (sent, received, count) in sorted(totals.items()):
            read.add_metric([direction, service], sent)
            write.add_metric([direction, service], received)
            open_.add_metric([direction, service], count)
        yield read
        yield write
        yield open_


class SidecarMetrics:
    def __init__(self, live: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.closed_bytes: dict[tuple[str, str], list[int]] = {}
        r.register(_Live(live, self.closed_bytes))
        self.opened = Counter(
            "meshlet_tcp_open",
            "Connections accepted and relayed.",
            ["direction", "service"],
            registry=r,
        )
        self.connect_errors = Counter(
            "meshlet_tcp_connect_errors",
            "Failed upstream connects or handshakes by reason.",
            ["service", "reason"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "meshlet_tls_handshake_failures",
            "Refused mTLS handshakes by reason.",
            ["direction", "reason"],
            registry=r,
        )
        self.overflows = Counter(
            "meshlet_breaker_overflow",
            "Connections refused by the circuit breaker.",
            ["service", "kind"],
            registry=r,
        )
        self.ejections = Counter(
            "meshlet_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            ["service"],
            registry=r,
        )
        self.ejected = Gauge(
            "meshlet_outlier_ejected_endpoints", "Endpoints ejected now.", ["service"], registry=r
        )
        self.panic = Counter(
            "meshlet_lb_panic",
            "Picks made in panic mode (too few endpoints available: all used).",
            ["service"],
            registry=r,
        )
        self.no_endpoint = Counter(
            "meshlet_no_healthy_endpoint",
            "Connections reset because no endpoint could be reached.",
            ["service"],
            registry=r,
        )
        self.unknown_destination = Counter(
            "meshlet_unknown_destination",
            "Outbound connections to addresses that are not mesh VIPs.",
            ["action"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "meshlet_cert_expiry_seconds",
            "Seconds until the workload certificate expires.",
            registry=r,
        )
        self.discovery_connected = Gauge(
            "meshlet_discovery_connected", "1 while the discovery stream is up.", registry=r
        )
        self.discovery_revision = Gauge(
            "meshlet_discovery_revision", "Revision of the mesh map in use.", registry=r
        )

    def connection_closed(self, direction: str, service: str, sent: int, received: int) -> None:
        row = self.closed_bytes.setdefault((direction, service), [0, 0])
        row[0] += sent
        row[1] += received

    def render(self) -> bytes:
        return generate_latest(self.registry)
