"""`meshlet lab top`'s numbers: two scrapes of every sidecar's /stats/prometheus → one row
per service (rate, success, p50/p99, which replicas served), and the rich table showing
them.

For: ``parse`` (Prometheus text → samples), ``rows`` (services + two scrapes → ``Row``s)
and ``table`` (rows → a ``rich.table.Table``). A service port proxied per request (HTTP,
gRPC once HTTP/2 is wired in) is measured from the callers' outbound sidecars:
``meshlet_response_total`` (success = not a 5xx) and the
``meshlet_response_latency_seconds`` histogram, merged over callers, with percentiles
interpolated inside buckets (Prometheus' histogram_quantile). A port relayed as bytes
(TCP) has no requests: its rate is connections per second (``meshlet_tcp_open_total``),
its failures the connections no endpoint took (``meshlet_no_healthy_endpoint_total``,
``meshlet_breaker_overflow_total``), and no latency. "Served by" counts what each
replica's own inbound sidecar handled in the window: answered (not a 5xx) or relayed,
and apart from that what failed there (a 5xx, or the app refusing the connection). A
counter that went down (a restarted sidecar) counts from zero.

Must never: do I/O or read the clock (the scrape times are handed in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table
from rich.text import Text

Labels = Mapping[str, str]
Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name → [(labels, value)]

RESPONSES = "meshlet_response_total"
LATENCY = "meshlet_response_latency_seconds_bucket"
TCP_OPEN = "meshlet_tcp_open_total"
NO_ENDPOINT = "meshlet_no_healthy_endpoint_total"
OVERFLOW = "meshlet_breaker_overflow_total"
CONNECT_ERRORS = "meshlet_tcp_connect_errors_total"


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(samples: Samples | None, name: str, match: Labels) -> float:
    if samples is None:
        return 0.0
    return sum(
        v
        for labels, v in samples.get(name, ())
        if all(labels.get(k) == w for k, w in match.items())
    )


def _delta(before: Samples | None, after: Samples | None, name: str, match: Labels) -> float:
    a, b = _sum(after, name, match), _sum(before, name, match)
    return a - b if a >= b else a  # reset: the sidecar restarted


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaView:
    name: str  # "orders-1", also the key of its sidecar's scrape
    node: str
    app_alive: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceView:
    key: str
    protocol: str
    vip: str
    port: int
    replicas: tuple[ReplicaView, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Scrape:
    at: float  # seconds, any monotonic origin
    by_sidecar: dict[str, Samples | None] = field(default_factory=dict)  # None: not reached


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    replica: str
    node: str
    rate: float  # answered (L7: not a 5xx) or relayed (L4) per second
    failed: float = 0.0  # per second: 5xx answered by it (L7), or the app refused (L4)
    note: str = ""  # "app killed", "sidecar not answering"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    service: str
    protocol: str
    address: str
    per_request: bool  # L7 (requests) or L4 (connections)
    rate: float
    success: float | None  # 0..1; None: nothing in the window
    p50_ms: float | None
    p99_ms: float | None
    served: tuple[Served, ...]
    failures: float = 0.0


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) pairs; None when empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _latency(before: Scrape, after: Scrape, key: str) -> tuple[float | None, float | None]:
    cumulative: dict[float, float] = {}
    for name, samples in after.by_sidecar.items():
        prev = before.by_sidecar.get(name)
        bounds = {
            labels.get("le", "+Inf")
            for labels, _ in (samples or {}).get(LATENCY, ())
            if labels.get("direction") == "outbound" and labels.get("service") == key
        }
        for le in bounds:  # each bound summed over routes, then over callers
            match = {"direction": "outbound", "service": key, "le": le}
            cumulative[float(le)] = cumulative.get(float(le), 0.0) + _delta(
                prev, samples, LATENCY, match
            )
    pairs = list(cumulative.items())
    p50, p99 = quantile(0.5, pairs), quantile(0.99, pairs)
    return (
        None if p50 is None else p50 * 1000,
        None if p99 is None else p99 * 1000,
    )


def _is_l7(scrape: Scrape, key: str) -> bool:
    return any(
        labels.get("direction") == "outbound" and labels.get("service") == key
        for samples in scrape.by_sidecar.values()
        for labels, _ in (samples or {}).get(RESPONSES, ())
    )


def row(service: ServiceView, before: Scrape, after: Scrape) -> Row:
    elapsed = max(after.at - before.at, 1e-9)
    key = service.key
    out = {"direction": "outbound", "service": key}
    per_request = _is_l7(after, key)
    total = failures = 0.0
    for name, samples in after.by_sidecar.items():
        prev = before.by_sidecar.get(name)
        if per_request:
            total += _delta(prev, samples, RESPONSES, out)
            failures += _delta(prev, samples, RESPONSES, {**out, "classification": "failure"})
        else:
            opened = _delta(prev, samples, TCP_OPEN, out)
            refused = _delta(prev, samples, NO_ENDPOINT, {"service": key}) + _delta(
                prev, samples, OVERFLOW, {"service": key}
            )
            total += opened + refused
            failures += refused
    p50, p99 = _latency(before, after, key) if per_request else (None, None)
    served = []
    inbound = {"direction": "inbound", "service": key}
    for r in service.replicas:
        samples, prev = after.by_sidecar.get(r.name), before.by_sidecar.get(r.name)
        if per_request:
            bad = _delta(prev, samples, RESPONSES, {**inbound, "classification": "failure"})
            good = _delta(prev, samples, RESPONSES, inbound) - bad
        else:
            good = _delta(prev, samples, TCP_OPEN, inbound)
            bad = _delta(
                prev, samples, CONNECT_ERRORS, {"service": key, "reason": "app_unreachable"}
            )
        note = "" if r.app_alive else "app killed"
        if samples is None:
            note = note or "sidecar not answering"
        served.append(
            Served(
                replica=r.name, node=r.node, rate=good / elapsed, failed=bad / elapsed, note=note
            )
        )
    return Row(
        service=key,
        protocol=service.protocol,
        address=f"{service.vip}:{service.port}",
        per_request=per_request,
        rate=total / elapsed,
        success=None if total <= 0 else (total - failures) / total,
        p50_ms=p50,
        p99_ms=p99,
        served=tuple(served),
        failures=failures,
    )


def rows(services: Iterable[ServiceView], before: Scrape, after: Scrape) -> list[Row]:
    return [row(s, before, after) for s in services]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _success(r: Row) -> Text:
    if r.success is None:
        return Text("-", style="dim")
    pct = r.success * 100
    style = "green" if pct >= 99.9 else "yellow" if pct >= 95 else "red"
    return Text(f"{pct:.1f}%", style=style)


def _served(r: Row) -> Text:
    text = Text()
    for i, s in enumerate(r.served):
        if i:
            text.append("\n")
        style = "red" if s.note else ("green" if s.rate > 0 else "dim")
        text.append(f"{s.replica}@{s.node} {s.rate:.1f}/s", style=style)
        if s.failed > 0:
            text.append(f" {s.failed:.1f} failed/s", style="red")
        if s.note:
            text.append(f" ({s.note})", style="red")
    return text


def table(all_rows: Iterable[Row], *, title: str, caption: str = "") -> Table:
    t = Table(title=title, caption=caption or None, title_justify="left", caption_justify="left")
    t.add_column("service", style="bold", no_wrap=True)
    t.add_column("VIP", no_wrap=True)
    t.add_column("proto", no_wrap=True)
    t.add_column("rate", justify="right", no_wrap=True)
    t.add_column("success", justify="right", no_wrap=True)
    t.add_column("p50", justify="right", no_wrap=True)
    t.add_column("p99", justify="right", no_wrap=True)
    t.add_column("served by (replica@node)", no_wrap=True)
    for r in all_rows:
        unit = "req/s" if r.per_request else "conn/s"
        t.add_row(
            r.service,
            r.address,
            r.protocol,
            f"{r.rate:.1f} {unit}",
            _success(r),
            _ms(r.p50_ms),
            _ms(r.p99_ms),
            _served(r),
        )
    return t
