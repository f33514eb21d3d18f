"""The sidecar's Prometheus metrics (own registry; Linkerd's names and labels where they
exist). Byte counts of open connections are read from the relays' counters when
scraped, so the data path never touches a metric per chunk. Per-request (L7) metrics
go through ``http_request``/``http_response``, which keep the labelled children in a
dict so a request costs two dict lookups and three increments, not label resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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


# Request latency buckets in seconds: 1 ms .. 30 s (Linkerd's response_latency_ms, in seconds).
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip


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
        self.tls_resumed = Counter(
            "meshlet_tls_resumed",
            "mTLS connections between sidecars that resumed a TLS session (no full handshake).",
            ["direction"],
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

        # L7 (Linkerd's names, with the service and route instead of the authority).
        self.requests = Counter(
            "meshlet_request",
            "HTTP requests received.",
            ["direction", "service", "route"],
            registry=r,
        )
        self.responses = Counter(
            "meshlet_response",
            "HTTP responses sent, by status and classification (success: not a 5xx).",
            ["direction", "service", "route", "status_code", "classification"],
            registry=r,
        )
        self.response_latency = Histogram(
            "meshlet_response_latency_seconds",
            "Time from the request's head to the response's end.",
            ["direction", "service", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "meshlet_retries",
            "Requests sent again after a retryable failure.",
            ["service", "route"],
            registry=r,
        )
        self.retries_skipped = Counter(
            "meshlet_retries_skipped",
            "Retryable failures not retried because a limit said no (attempts, budget).",
            ["service", "reason"],
            registry=r,
        )
        self.timeouts = Counter(
            "meshlet_request_timeouts",
            "Requests answered 504 because their timeout passed.",
            ["direction", "service", "route"],
            registry=r,
        )
        self.pool_stale = Counter(
            "meshlet_http_pool_stale",
            "Pooled HTTP connections the peer had closed, found on reuse (sent again, free).",
            ["direction", "service"],
            registry=r,
        )
        self.http_errors = Counter(
            "meshlet_http_protocol_errors",
            "Malformed HTTP refused (downstream) or received (upstream), by status answered.",
            ["direction", "side", "status_code"],
            registry=r,
        )
        self._rq: dict[tuple[str, str, str], Any] = {}
        self._rs: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}

        # HTTP/2 and gRPC (the request metrics above count HTTP/2 requests too).
        self.h2_pool_connections = Gauge(
            "meshlet_http2_pool_connections",
            "Pooled HTTP/2 client connections open now (outbound: to peer sidecars, "
            "inbound: to the app).",
            ["direction", "service"],
            registry=r,
        )
        self.h2_pool_opened = Counter(
            "meshlet_http2_pool_connections_opened",
            "Pooled HTTP/2 client connections opened.",
            ["direction", "service"],
            registry=r,
        )
        self.h2_connection_errors = Counter(
            "meshlet_http2_connection_errors",
            "HTTP/2 connections this sidecar ended with an error GOAWAY, by reason "
            "(rapid_reset, settings_flood, ping_flood, hpack_bomb, continuation_flood, ...).",
            ["direction", "reason"],
            registry=r,
        )
        self.grpc_responses = Counter(
            "meshlet_grpc_response",
            "gRPC calls answered, by grpc-status (0: OK).",
            ["direction", "service", "route", "grpc_status"],
            registry=r,
        )
        self._grpc: dict[tuple[str, str, str, int], Any] = {}

    def http_request(self, direction: str, service: str, route: str) -> None:
        key = (direction, service, route)
        child = self._rq.get(key)
        if child is None:
            child = self._rq[key] = self.requests.labels(direction, service, route)
        child.inc()

    def http_response(
        self, direction: str, service: str, route: str, status: int, latency_s: float
    ) -> None:
        key = (direction, service, route, status)
        children = self._rs.get(key)
        if children is None:
            ok = "success" if 0 < status < 500 else "failure"
            children = self._rs[key] = (
                self.responses.labels(direction, service, route, str(status), ok),
                self.response_latency.labels(direction, service, route),
            )
        children[0].inc()
        children[1].observe(latency_s)

    def connection_closed(self, direction: str, service: str, sent: int, received: int) -> None:
        row = self.closed_bytes.setdefault((direction, service), [0, 0])
        row[0] += sent
        row[1] += received

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def grpc_response(self, direction: str, service: str, route: str, grpc_status: int) -> None:
        key = (direction, service, route, grpc_status)
        child = self._grpc.get(key)
        if child is None:
            child = self._grpc[key] = self.grpc_responses.labels(
                direction, service, route, str(grpc_status)
            )
        child.inc()


# ---- protocol detection (outbound: ports not declared, and h2c on ports declared http) ----

# Peeks end in well under a millisecond for clients that speak first; the detect timeout
# (200 ms by default) is where server-speaks-first connections land.
DETECTION_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


class DetectionMetrics:
    """How outbound connections were classified by peeking, and how long it took.
    Registered on the sidecar's registry by its ``Outbound`` (one per process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.detections = Counter(
            "meshlet_sidecar_protocol_detections",
            "Outbound connections classified by their first bytes, by outcome (http1, h2, "
            "tcp: proved neither; timeout: nothing decisive in time, so relayed as TCP, or "
            "on a port declared http served as HTTP/1.1).",
            ["service", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "meshlet_sidecar_protocol_detection_seconds",
            "Time from accepting an outbound connection to knowing its protocol.",
            buckets=DETECTION_BUCKETS,
            registry=registry,
        )

    def detected(self, service: str, outcome: str, seconds: float) -> None:
        self.detections.labels(service, outcome).inc()
        self.seconds.observe(seconds)
