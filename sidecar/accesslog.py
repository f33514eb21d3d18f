"""The L7 access log: one JSON object per request, on one line, with Envoy's field names.

The proxy fills an ``AccessLogEntry`` when a request ends (answered, failed or
abandoned) and writes ``render(entry)`` to its log stream; the shell owns the file.

Format:

- Envoy's default JSON fields first, in ``ENVOY_FIELDS`` order, then meshlet's
  (``MESHLET_FIELDS``): ``direction`` (``outbound``/``inbound``, Linkerd's label),
  ``source_identity`` and ``destination_identity`` (SPIFFE IDs), ``attempts`` (tries
  made, as ``x-meshlet-attempts``), ``trace_id`` (of the outgoing ``traceparent``),
  ``route`` (route name) and ``service`` (``ns/name``). The order never changes.
- ``start_time``: RFC 3339, UTC, milliseconds (``2030-01-01T00:00:00.123Z``), as Envoy.
- ``duration`` and ``upstream_service_time``: integer milliseconds (Envoy's units).
  ``bytes_received``/``bytes_sent``: body bytes. ``response_code``: 0 when no response
  was sent (Envoy's convention, e.g. the client went away first).
- A value that does not exist (no upstream was reached, no user-agent) is ``null``:
  Envoy's JSON format does the same, and it keeps every field's type (a number or null,
  never the string ``"-"``). The one exception is ``response_flags``, which is ``"-"``
  when there are none, as Envoy writes it.
- Header values are ``str``: decode header bytes with latin-1, which never fails.

Response flags we use (Envoy's short names and meanings; the others never appear):
``UH`` no healthy upstream (503), ``UF`` upstream connection failure (503), ``UO``
upstream overflow — circuit breaker open (503), ``NR`` no route (404), ``URX`` retry
limit or retry budget reached, ``UT`` upstream request timeout (504), ``LR`` reset by
this sidecar (drain, shutdown), ``UC`` upstream connection terminated, ``DC``
downstream connection terminated, ``DPE``/``UPE`` downstream/upstream protocol error.
Several flags are joined with ``,`` in ``ResponseFlag`` order (Envoy's style:
``UF,URX``). We have no rate limiter, so ``RL`` is not used.

Pure and cheap: building the line is one dict and one ``orjson.dumps``. Never does I/O,
never reads the clock (``start_time`` and durations are handed in), never logs.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

ENVOY_FIELDS = (
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
)
MESHLET_FIELDS = (
    "direction",
    "source_identity",
    "destination_identity",
    "attempts",
    "trace_id",
    "route",
    "service",
    "grpc_status",
)
FIELDS = ENVOY_FIELDS + MESHLET_FIELDS


class ResponseFlag(StrEnum):
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    LOCAL_RESET = "LR"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_PROTOCOL_ERROR = "UPE"


_FLAG_ORDER = {flag: i for i, flag in enumerate(ResponseFlag)}


class Direction(StrEnum):
    OUTBOUND = "outbound"  # from the local app to a service
    INBOUND = "inbound"  # from another sidecar to the local app


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogEntry:
    start_time: dt.datetime  # rendered in UTC (a naive value is taken as UTC)
    method: str
    path: str  # as received, query included (Envoy's default)
    protocol: str  # "HTTP/1.1", "HTTP/2"
    response_code: int  # 0: no response was sent
    response_flags: tuple[ResponseFlag, ...] = ()
    bytes_received: int = 0
    bytes_sent: int = 0
    duration: int = 0  # ms, first request byte to last response byte
    upstream_service_time: int | None = None  # ms the upstream took to its response headers
    x_forwarded_for: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    authority: str | None = None
    upstream_host: str | None = None  # "address:port" of the endpoint of the last try
    direction: Direction = Direction.OUTBOUND
    source_identity: str | None = None
    destination_identity: str | None = None
    attempts: int = 0  # 0: no try was made (no route, no endpoint, breaker open)
    trace_id: str | None = None
    route: str | None = None
    service: str | None = None
    grpc_status: int | None = None  # gRPC calls: the grpc-status of the answer (Envoy's name)


@functools.lru_cache(maxsize=8)
def _second(epoch_s: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a UTC second; memoised, as log lines share seconds."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_start_time(t: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds: ``2030-01-01T00:00:00.123Z``."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return f"{_second(math.floor(t.timestamp()))}.{t.microsecond // 1000:03d}Z"


def format_flags(flags: tuple[ResponseFlag, ...]) -> str:
    """Envoy's rendering: ``-`` for none, else the short names joined with ``,``."""
    if not flags:
        return "-"
    if len(flags) == 1:
        return str(flags[0].value)
    return ",".join(f.value for f in sorted(set(flags), key=_FLAG_ORDER.__getitem__))


_DUMPS = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _as_dict(e: AccessLogEntry) -> dict[str, Any]:
    return {
        "start_time": format_start_time(e.start_time),
        "method": e.method,
        "path": e.path,
        "protocol": e.protocol,
        "response_code": e.response_code,
        "response_flags": format_flags(e.response_flags),
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration": e.duration,
        "upstream_service_time": e.upstream_service_time,
        "x_forwarded_for": e.x_forwarded_for,
        "user_agent": e.user_agent,
        "request_id": e.request_id,
        "authority": e.authority,
        "upstream_host": e.upstream_host,
        "direction": e.direction.value,
        "source_identity": e.source_identity,
        "destination_identity": e.destination_identity,
        "attempts": e.attempts,
        "trace_id": e.trace_id,
        "route": e.route,
        "service": e.service,
        "grpc_status": e.grpc_status,
    }


def _scrub(value: Any) -> Any:
    """A str that orjson refuses (lone surrogates) made encodable; others unchanged."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def render(entry: AccessLogEntry) -> bytes:
    """One line of JSON ending in ``\\n``, fields in ``FIELDS`` order."""
    return render_mapping(_as_dict(entry))


def render_mapping(record: dict[str, Any]) -> bytes:
    """``render`` for a caller that built the fields itself (formatted as ``render``
    formats an entry's, in ``FIELDS`` order): the per-request path skips the entry."""
    try:
        return _DUMPS(record, option=_NEWLINE)
    except orjson.JSONEncodeError:  # a str that is not valid Unicode; rare, so slow is fine
        return _DUMPS({k: _scrub(v) for k, v in record.items()}, option=_NEWLINE)
