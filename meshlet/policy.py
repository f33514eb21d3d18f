"""A service's traffic policy: balancing, timeouts, retries, circuit breaking, outlier
detection, routes and the callers it allows.

Plain frozen data with Envoy/Linkerd defaults (REFERENCE.md); validated in
``__post_init__`` so that every way in (API, YAML, gRPC) gets the same checks and
messages. Imports nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

_FORBID = {"extra": "forbid"}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# gRPC status names, indexed by their code (0 = ok ... 16 = unauthenticated).
GRPC_STATUS_NAMES = (
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
)
_GRPC_CODES = frozenset(GRPC_STATUS_NAMES[1:])


class LbAlgorithm(StrEnum):
    P2C_EWMA = "p2c_ewma"  # power of two choices over (peak) EWMA latency — the default
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"  # fewest outstanding requests (L7) / connections (L4)
    RING_HASH = "ring_hash"  # sticky on a request header (hash_header)


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be greater than 0, not {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Balancing:
    __pydantic_config__ = _FORBID
    algorithm: LbAlgorithm = LbAlgorithm.P2C_EWMA
    hash_header: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm is LbAlgorithm.RING_HASH and not self.hash_header:
            raise ValueError("ring_hash balancing needs hash_header (the header to hash on)")
        if self.hash_header and not _HEADER_NAME.fullmatch(self.hash_header):
            raise ValueError(f"hash_header {self.hash_header!r} is not a valid header name")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    __pydantic_config__ = _FORBID
    connect_s: float = 5.0  # Envoy's default
    request_s: float | None = None  # off by default, as in Envoy; set it at the edge
    idle_s: float = 300.0  # stream/connection idle, Envoy's 5 min

    def __post_init__(self) -> None:
        for name in ("connect_s", "request_s", "idle_s"):
            _positive(f"timeouts.{name}", getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    __pydantic_config__ = _FORBID
    percent: float = 20.0  # retries may add this share of requests…
    min_per_s: float = 10.0  # …plus this many per second (Finagle/Linkerd)
    window_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100:
            raise ValueError(f"retries.budget.percent must be 0-100, not {self.percent}")
        if self.min_per_s < 0:
            raise ValueError("retries.budget.min_per_s must not be negative")
        _positive("retries.budget.window_s", self.window_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    __pydantic_config__ = _FORBID
    attempts: int = 3  # total tries, the first included
    on_statuses: tuple[int, ...] = (502, 503, 504)
    on_grpc: tuple[str, ...] = ("unavailable",)
    on_connect_failure: bool = True
    on_reset: bool = True  # reset before any response byte
    non_idempotent: bool = False  # retry POST/PATCH too (Istio does; we do not by default)
    per_try_timeout_s: float | None = None
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    max_body_bytes: int = 65536  # larger bodies are not buffered for a retry (Linkerd)
    budget: RetryBudget = field(default_factory=RetryBudget)

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 10:
            raise ValueError(f"retries.attempts must be 1-10, not {self.attempts}")
        for status in self.on_statuses:
            if not 100 <= status <= 599:
                raise ValueError(f"retries.on_statuses: {status} is not an HTTP status")
        for code in self.on_grpc:
            if code not in _GRPC_CODES:
                raise ValueError(
                    f"retries.on_grpc: {code!r} is not a gRPC status name like 'unavailable'"
                )
        _positive("retries.per_try_timeout_s", self.per_try_timeout_s)
        _positive("retries.backoff_base_s", self.backoff_base_s)
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("retries.backoff_max_s must be at least backoff_base_s")
        if self.max_body_bytes < 0:
            raise ValueError("retries.max_body_bytes must not be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreaker:
    __pydantic_config__ = _FORBID
    max_connections: int = 1024  # Envoy's defaults
    max_pending: int = 1024
    max_requests: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending", "max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"circuit_breaker.{name} must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    __pydantic_config__ = _FORBID
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0  # grows with each ejection of the same endpoint
    max_ejection_percent: int = 10  # at least one endpoint may always be ejected
    panic_threshold_percent: int = 50  # below this share available, balance over all

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("outlier_detection.consecutive_failures must be at least 1")
        _positive("outlier_detection.base_ejection_s", self.base_ejection_s)
        for name in ("max_ejection_percent", "panic_threshold_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"outlier_detection.{name} must be 0-100")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    __pydantic_config__ = _FORBID
    name: str
    exact: str | None = None
    prefix: str | None = None
    present: bool | None = None

    def __post_init__(self) -> None:
        if not _HEADER_NAME.fullmatch(self.name):
            raise ValueError(f"header match name {self.name!r} is not a valid header name")
        if sum(x is not None for x in (self.exact, self.prefix, self.present)) != 1:
            raise ValueError(
                f"header match {self.name!r} needs exactly one of exact, prefix, present"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    __pydantic_config__ = _FORBID
    path_prefix: str | None = None
    path_exact: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    def __post_init__(self) -> None:
        if self.path_prefix is not None and self.path_exact is not None:
            raise ValueError("a route matches path_prefix or path_exact, not both")
        for p in (self.path_prefix, self.path_exact):
            if p is not None and not p.startswith("/"):
                raise ValueError(f"route path {p!r} must start with '/'")
        for m in self.methods:
            if not m.isalpha() or not m.isupper():
                raise ValueError(f"route method {m!r} must be an upper-case HTTP method like GET")


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightedBackend:
    __pydantic_config__ = _FORBID
    labels: dict[str, str] = field(default_factory=dict)  # endpoints carrying these labels
    weight: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 10000:
            raise ValueError(f"backend weight must be 0-10000, not {self.weight}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    __pydantic_config__ = _FORBID
    name: str
    match: RouteMatch = field(default_factory=RouteMatch)
    backends: tuple[WeightedBackend, ...] = ()  # empty: every endpoint of the service
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a route needs a name")
        if self.backends and sum(b.weight for b in self.backends) == 0:
            raise ValueError(f"route {self.name!r}: the backend weights add up to 0")
        _positive(f"route {self.name!r} timeout_s", self.timeout_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    __pydantic_config__ = _FORBID
    balancing: Balancing = field(default_factory=Balancing)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    routes: tuple[Route, ...] = ()
    # Who may call: SPIFFE IDs, "NS/NAME" or "NS/*". None: any identity of the trust domain.
    allowed_callers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("route names must be unique within a service")
        for caller in self.allowed_callers or ():
            if not (
                caller.startswith("spiffe://")
                or re.fullmatch(r"[a-z0-9-]+/([a-z0-9-]+|\*)", caller)
            ):
                raise ValueError(
                    f"allowed_callers entry {caller!r} must be a SPIFFE ID, 'NS/NAME' or 'NS/*'"
                )
