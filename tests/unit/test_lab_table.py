"""`meshlet lab top`'s numbers from two scrapes of real sidecar metric registries: rates,
success, percentiles from merged histograms, who served, and a restarted sidecar."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from node import lab_table as lt
from sidecar.metrics import SidecarMetrics

ORDERS = lt.ServiceView(
    key="shop/orders",
    protocol="http",
    vip="198.19.128.2",
    port=8080,
    replicas=(
        lt.ReplicaView(name="orders-0", node="node1"),
        lt.ReplicaView(name="orders-1", node="node2", app_alive=False),
    ),
)
REDIS = lt.ServiceView(
    key="shop/redis",
    protocol="tcp",
    vip="198.19.128.4",
    port=6379,
    replicas=(lt.ReplicaView(name="redis-0", node="node2"),),
)


def scraped(m: SidecarMetrics) -> lt.Samples:
    return lt.parse(m.render().decode())


class Lab:
    """Real sidecar metric registries: web (the caller) and the replicas."""

    def __init__(self) -> None:
        self.sidecars = {n: SidecarMetrics(live=list) for n in ("web-0", "orders-0", "orders-1")}
        self.sidecars["redis-0"] = SidecarMetrics(live=list)

    def call_orders(self, replica: str, status: int, latency_s: float) -> None:
        self.sidecars["web-0"].http_response("outbound", "shop/orders", "", status, latency_s)
        self.sidecars[replica].http_response("inbound", "shop/orders", "", status, latency_s)

    def scrape(self, at: float) -> lt.Scrape:
        return lt.Scrape(at=at, by_sidecar={n: scraped(m) for n, m in self.sidecars.items()})


def test_http_rate_success_percentiles_and_who_served_over_the_window() -> None:
    lab = Lab()
    for _ in range(50):  # before the window: must not count
        lab.call_orders("orders-0", 200, 0.5)
    before = lab.scrape(100.0)
    for _ in range(90):
        lab.call_orders("orders-0", 200, 0.003)  # 1-2 ms ... 5 ms bucket
    for _ in range(10):
        lab.call_orders("orders-1", 503, 0.015)
    row = lt.row(ORDERS, before, lab.scrape(110.0))
    assert row.per_request and row.address == "198.19.128.2:8080"
    assert row.rate == pytest.approx(10.0)
    assert row.success == pytest.approx(0.9)
    assert row.p50_ms is not None and 2.0 < row.p50_ms <= 5.0
    assert row.p99_ms is not None and 10.0 < row.p99_ms <= 20.0
    served = {s.replica: s for s in row.served}
    assert served["orders-0"].rate == pytest.approx(9.0) and served["orders-0"].failed == 0
    assert served["orders-1"].rate == 0 and served["orders-1"].failed == pytest.approx(1.0)
    assert served["orders-1"].note == "app killed"


def test_tcp_counts_connections_and_the_ones_no_endpoint_took() -> None:
    lab = Lab()
    before = lab.scrape(0.0)
    web, redis = lab.sidecars["web-0"], lab.sidecars["redis-0"]
    for _ in range(8):
        web.opened.labels("outbound", "shop/redis").inc()
        redis.opened.labels("inbound", "shop/redis").inc()
    web.no_endpoint.labels("shop/redis").inc(2)
    row = lt.row(REDIS, before, lab.scrape(2.0))
    assert not row.per_request
    assert row.rate == pytest.approx(5.0)  # 10 connections tried in 2 s
    assert row.success == pytest.approx(0.8)
    assert (row.p50_ms, row.p99_ms) == (None, None)
    assert row.served[0].rate == pytest.approx(4.0)


def test_a_restarted_sidecar_counts_from_zero_and_a_silent_one_is_named() -> None:
    lab = Lab()
    for _ in range(100):
        lab.call_orders("orders-0", 200, 0.002)
    before = lab.scrape(0.0)
    lab.sidecars["web-0"] = SidecarMetrics(live=list)  # restarted: counters start over
    lab.sidecars["orders-0"] = SidecarMetrics(live=list)
    for _ in range(4):
        lab.call_orders("orders-0", 200, 0.002)
    after = lab.scrape(1.0)
    after.by_sidecar["orders-1"] = None  # did not answer the scrape
    row = lt.row(ORDERS, before, after)
    assert row.rate == pytest.approx(4.0) and row.success == 1.0
    assert {s.replica: s.note for s in row.served}["orders-1"] == "app killed"
    running = lt.ServiceView(
        key="shop/orders",
        protocol="http",
        vip="198.19.128.2",
        port=8080,
        replicas=(lt.ReplicaView(name="orders-1", node="node2"),),
    )
    assert lt.row(running, before, after).served[0].note == "sidecar not answering"


def test_no_traffic_is_no_success_rate_not_a_division_by_zero() -> None:
    lab = Lab()
    before = lab.scrape(0.0)
    row = lt.row(ORDERS, before, lab.scrape(5.0))
    assert (row.rate, row.success, row.p50_ms) == (0.0, None, None)


def test_quantile_interpolates_inside_buckets_like_prometheus() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.005, 100.0), (float("inf"), 100.0)]
    assert lt.quantile(0.5, buckets) == pytest.approx(0.002)
    assert lt.quantile(0.75, buckets) == pytest.approx(0.0035)
    assert lt.quantile(0.5, [(float("inf"), 10.0)]) == 0.0
    assert lt.quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert lt.quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == pytest.approx(0.1)


def test_the_table_shows_every_service_with_its_numbers() -> None:
    lab = Lab()
    before = lab.scrape(0.0)
    for _ in range(20):
        lab.call_orders("orders-0", 200, 0.004)
    rows = lt.rows([ORDERS, REDIS], before, lab.scrape(2.0))
    out = io.StringIO()
    Console(file=out, width=160).print(lt.table(rows, title="lab", caption="client: ok"))
    text = out.getvalue()
    for expected in (
        "shop/orders", "198.19.128.2:8080", "10.0 req/s", "100.0%", "orders-0@node1 10.0/s",
        "orders-1@node2 0.0/s (app killed)", "shop/redis", "0.0 conn/s", "client: ok",
    ):  # fmt: skip
        assert expected in text, (expected, text)
