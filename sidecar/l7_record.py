"""What one L7 request leaves behind: its access log line and its response metric.

For: ``Record`` is filled in as the request goes (route, status, flags, bytes, the
upstream host, identities, attempts, trace id) and ``finish`` turns it into one
``meshlet_response_total``/latency sample and one ``accesslog`` line. Also the small
header helpers both handlers use to read a request (``header_lookup``, ``text``).

Must never: do I/O itself (the sink owns the stream) or raise into the request path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sidecar.accesslog import AccessLogEntry, Direction, ResponseFlag
from sidecar.accesslog_sink import AccessLogSink
from sidecar.http1 import Headers, Request
from sidecar.metrics import SidecarMetrics


def header_lookup(headers: Headers) -> dict[bytes, bytes]:
    """Request headers by (lower-case) name; a repeated one joined with ", " (RFC 9110)."""
    out = dict(headers)
    if len(out) == len(headers):  # no name repeated: the usual case, built in C
        return out
    out = {}
    for name, value in headers:
        if name in out:
            out[name] = out[name] + b", " + value
        else:
            out[name] = value
    return out


def text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


@dataclass(slots=True)
class Record:
    """What the access log and the metrics learn about one request, filled as it goes."""

    direction: Direction
    service: str
    start: dt.datetime
    t0: float  # loop time of the request head
    method: str = "-"
    path: str = "-"
    protocol: str = "HTTP/1.1"
    route: str = "-"
    status: int = 0  # 0: no response was sent
    flags: list[ResponseFlag] = field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_ms: int | None = None
    x_forwarded_for: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    authority: str | None = None
    upstream_host: str | None = None
    source_identity: str | None = None
    destination_identity: str | None = None
    attempts: int = 0
    trace_id: str | None = None
    grpc_status: int | None = None

    def of_request(self, req: Request, lookup: dict[bytes, bytes]) -> None:
        self.method = req.method
        self.path = req.target
        self.protocol = f"HTTP/{req.version}"
        self.user_agent = text(lookup.get(b"user-agent"))
        self.authority = text(lookup.get(b"host"))


def finish(rec: Record, metrics: SidecarMetrics, sink: AccessLogSink, now: float) -> None:
    """The request is over: one response metric, one access log line."""
    latency = max(0.0, now - rec.t0)
    metrics.http_response(rec.direction.value, rec.service, rec.route, rec.status, latency)
    if not sink.enabled:
        return
    sink.write(
        AccessLogEntry(
            start_time=rec.start,
            method=rec.method,
            path=rec.path,
            protocol=rec.protocol,
            response_code=rec.status,
            response_flags=tuple(rec.flags),
            bytes_received=rec.bytes_received,
            bytes_sent=rec.bytes_sent,
            duration=int(latency * 1000),
            upstream_service_time=rec.upstream_ms,
            x_forwarded_for=rec.x_forwarded_for,
            user_agent=rec.user_agent,
            request_id=rec.request_id,
            authority=rec.authority,
            upstream_host=rec.upstream_host,
            direction=rec.direction,
            source_identity=rec.source_identity,
            destination_identity=rec.destination_identity,
            attempts=rec.attempts,
            trace_id=rec.trace_id,
            route=rec.route if rec.route != "-" else None,
            service=rec.service,
            grpc_status=rec.grpc_status,
        )
    )
