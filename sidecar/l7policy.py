"""Retry and timeout decisions for one L7 request: may this failure be retried, after
how long, and how much time is left.

The contract with the proxy, per request:

1. ``deadline = Deadline.start(clock, route_timeout_s=route.timeout_s,
   request_timeout_s=policy.timeouts.request_s, grpc_timeout=headers.get(b"grpc-timeout"))``.
   When it expires, answer 504 (gRPC: ``grpc-status: 4`` DEADLINE_EXCEEDED), log ``UT``
   and reset the upstream stream (HTTP/1.1: close that connection) so it is freed.
   For gRPC, send ``grpc-timeout: deadline.grpc_timeout(clock)`` upstream on each try.
2. ``state = RetryState(policy.retries, budget, clock, rng, method=..., body_size=...,
   grpc=..., deadline=deadline)`` as the first try goes out. Creating it counts the
   request into the upstream service's ``RetryBudget`` (one budget per service, shared
   by all its requests, so it is a parameter).
3. Each try: pick an endpoint excluding ``state.tried`` (fall back to all when every
   endpoint was tried), add its id to ``state.tried``, time it out after
   ``state.try_timeout_s()``.
4. On a failure seen before any response byte went downstream, ``state.may_retry(
   outcome)``. A ``retry=True`` decision is a commitment: the budget is spent and
   ``state.attempts`` already counts the next try; wait ``backoff_s`` and go again.
   Otherwise answer with the failure; ``decision.limit_reached`` means log ``URX``.
5. Send ``x-meshlet-attempts: state.attempts`` on the response.

Rules, in the order they are checked (the first that refuses names the reason):

- The outcome must be one the policy retries: ``ConnectFailure`` (``on_connect_failure``),
  ``ResetBeforeResponse`` (``on_reset``), ``Status`` in ``on_statuses`` (502/503/504),
  ``GrpcStatus`` in ``on_grpc`` (UNAVAILABLE), a per-try ``Timeout`` when 504 is in
  ``on_statuses`` (it is the gateway timeout of that try). The request's own deadline
  (``Timeout(per_try=False)``) is never retried.
- It must be safe to send again. Always so when the request never reached the app:
  ``ConnectFailure`` and ``ResetBeforeResponse(refused_stream=True)`` (HTTP/2
  REFUSED_STREAM, RFC 9113 8.7). Otherwise the method must be idempotent per RFC 9110
  9.2.2 (GET HEAD OPTIONS TRACE PUT DELETE — PUT and DELETE included, as the RFC allows
  automatic retries of them) or the policy must say ``non_idempotent`` (the Istio
  default we do not copy). gRPC calls are always POST; for them the ``on_grpc`` list is
  the service owner's statement that those codes are safe to retry (gRPC's retry design,
  gRFC A6), so a listed ``GrpcStatus`` is retried; their other failures follow the POST
  rule.
- The body must be replayable: a known size of at most ``max_body_bytes`` (64 KiB,
  Linkerd). ``body_size=None`` (streaming, unknown length) is never retried; pass 0 for
  a request without a body.
- Fewer than ``attempts`` tries so far (``ATTEMPTS_EXHAUSTED``, URX).
- The deadline leaves time beyond the backoff (``DEADLINE``).
- The retry budget allows one more retry (``BUDGET_EXHAUSTED``, URX).

Backoff is full-jitter exponential (``sidecar.backoff``) between ``backoff_base_s`` and
``backoff_max_s``.

Pure: never imports asyncio, socket or ssl; never sleeps, never reads ``time`` or
``random`` but the injected ``Clock`` and ``Random``; never logs (reasons are returned).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from enum import StrEnum

from meshlet.policy import GRPC_STATUS_NAMES, RetryPolicy
from meshlet.runtime import Clock
from sidecar import backoff
from sidecar.retry_budget import RetryBudget

ATTEMPTS_HEADER = b"x-meshlet-attempts"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

GRPC_DEADLINE_EXCEEDED = 4  # what a timed-out gRPC call answers (grpc-status)
GRPC_UNAVAILABLE = 14
_GRPC_NAMES = GRPC_STATUS_NAMES


def is_idempotent(method: str) -> bool:
    """RFC 9110 9.2.2; extension methods (and POST, PATCH, CONNECT) are not."""
    return method in IDEMPOTENT_METHODS


def grpc_status_name(code: int) -> str:
    """The policy's spelling of a numeric ``grpc-status`` (14 → ``unavailable``)."""
    return _GRPC_NAMES[code] if 0 <= code < len(_GRPC_NAMES) else "unknown"


# -- outcomes of one try ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """No connection (refused, unreachable, TLS handshake failed): nothing was sent."""


@dataclass(frozen=True, slots=True)
class ResetBeforeResponse:
    """The upstream reset or closed before the first response byte."""

    refused_stream: bool = False  # HTTP/2 REFUSED_STREAM: guaranteed unprocessed


@dataclass(frozen=True, slots=True)
class Status:
    """A complete response status, before anything went downstream."""

    code: int


@dataclass(frozen=True, slots=True)
class GrpcStatus:
    """A gRPC status, by name in any spelling: ``unavailable``, ``UNAVAILABLE``."""

    name: str

    @classmethod
    def from_code(cls, code: int) -> GrpcStatus:
        return cls(grpc_status_name(code))


@dataclass(frozen=True, slots=True)
class Timeout:
    """A timeout: of the try (``per_try_timeout_s``) or of the whole request."""

    per_try: bool


Outcome = ConnectFailure | ResetBeforeResponse | Status | GrpcStatus | Timeout


class RetryReason(StrEnum):
    RETRY = "retry"
    NOT_RETRYABLE = "not-retryable"  # the policy does not retry this outcome
    REQUEST_TIMEOUT = "request-timeout"  # the request's deadline, never retried
    NON_IDEMPOTENT = "non-idempotent"
    BODY_TOO_LARGE = "body-too-large"
    BODY_UNKNOWN_LENGTH = "body-unknown-length"
    ATTEMPTS_EXHAUSTED = "attempts-exhausted"
    DEADLINE = "deadline"  # no time left for another try
    BUDGET_EXHAUSTED = "budget-exhausted"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    reason: RetryReason
    backoff_s: float = 0.0  # wait this long before the next try (when retry)

    @property
    def limit_reached(self) -> bool:
        """A retry was wanted but a limit refused it: Envoy's ``URX`` flag."""
        return self.reason in (RetryReason.ATTEMPTS_EXHAUSTED, RetryReason.BUDGET_EXHAUSTED)


# -- deadlines ----------------------------------------------------------------------------

_GRPC_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_S = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_ENCODE_UNITS = (("n", 1), ("u", 10**3), ("m", 10**6), ("S", 10**9), ("M", 60 * 10**9))
_MAX_VALUE = 99_999_999


def parse_grpc_timeout(value: bytes | str | None) -> float | None:
    """Seconds from a ``grpc-timeout`` header (1-8 digits and a unit H M S m u n).

    None for a missing or malformed value: the request then runs without the caller's
    deadline, as Envoy does.
    """
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    m = _GRPC_TIMEOUT.fullmatch(raw.strip(b" \t"))
    if m is None:
        return None
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def encode_grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value for ``seconds`` (negative counts as 0): the finest unit
    that fits in 8 digits, rounded up to it (never shorter than asked, by < 1e-5)."""
    if not seconds > 0:  # also NaN
        return "0n"
    if seconds >= _MAX_VALUE * 3600.0:
        return f"{_MAX_VALUE}H"
    ns = math.ceil(seconds * 1e9 - 1e-3)  # the 1e-3 ns absorbs float noise (0.3 s → 300000u)
    for unit, size in _ENCODE_UNITS:
        value = -(-ns // size)
        if value <= _MAX_VALUE:
            return f"{value}{unit}"
    return f"{-(-ns // (3600 * 10**9))}H"


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered, on the clock's monotonic seconds (None: never)."""

    at: float | None

    @classmethod
    def start(
        cls,
        clock: Clock,
        *,
        route_timeout_s: float | None = None,
        request_timeout_s: float | None = None,
        grpc_timeout: bytes | str | None = None,
    ) -> Deadline:
        """The route's timeout, else the policy's request timeout; an incoming valid
        ``grpc-timeout`` may shorten it (the caller stops waiting then anyway)."""
        limit = route_timeout_s if route_timeout_s is not None else request_timeout_s
        caller = parse_grpc_timeout(grpc_timeout)
        if caller is not None:
            limit = caller if limit is None else min(limit, caller)
        return cls(None if limit is None else clock.monotonic() + limit)

    def remaining(self, clock: Clock) -> float | None:
        """Seconds left (0 when passed); None when there is no deadline."""
        return None if self.at is None else max(0.0, self.at - clock.monotonic())

    def expired(self, clock: Clock) -> bool:
        return self.at is not None and clock.monotonic() >= self.at

    def try_timeout(self, clock: Clock, per_try_s: float | None) -> float | None:
        """How long one try may take: the per-try timeout, capped by the time left."""
        left = self.remaining(clock)
        if left is None:
            return per_try_s
        return left if per_try_s is None else min(per_try_s, left)

    def grpc_timeout(self, clock: Clock) -> str | None:
        """The ``grpc-timeout`` to send upstream (the time left), or None to send none."""
        left = self.remaining(clock)
        return None if left is None else encode_grpc_timeout(left)


NO_DEADLINE = Deadline(None)


# -- retries ------------------------------------------------------------------------------


def _grpc_key(name: str) -> str:
    return name.lower().replace("_", "-")


class RetryState:
    """The retry bookkeeping of one request (see the module docstring for the rules)."""

    __slots__ = (
        "_body_ok",
        "_budget",
        "_clock",
        "_deadline",
        "_grpc",
        "_idempotent",
        "_on_grpc",
        "_policy",
        "_rng",
        "attempts",
        "tried",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget,
        clock: Clock,
        rng: random.Random,
        *,
        method: str,
        body_size: int | None,
        grpc: bool = False,
        deadline: Deadline = NO_DEADLINE,
    ) -> None:
        self._policy = policy
        self._budget = budget
        self._clock = clock
        self._rng = rng
        self._deadline = deadline
        self._grpc = grpc
        self._idempotent = policy.non_idempotent or is_idempotent(method)
        self._on_grpc = frozenset(_grpc_key(c) for c in policy.on_grpc)
        self._body_ok: RetryReason | None = (
            RetryReason.BODY_UNKNOWN_LENGTH
            if body_size is None
            else RetryReason.BODY_TOO_LARGE
            if body_size > policy.max_body_bytes
            else None
        )
        self.attempts = 1  # tries made or under way, the first included
        self.tried: set[str] = set()  # endpoint ids tried so far: exclude them next time
        budget.deposit()

    def try_timeout_s(self) -> float | None:
        """The timeout of the try about to start (None: none)."""
        return self._deadline.try_timeout(self._clock, self._policy.per_try_timeout_s)

    def _refuse(self, reason: RetryReason) -> RetryDecision:
        return RetryDecision(False, reason)

    def _wanted(self, outcome: Outcome) -> bool:
        p = self._policy
        if isinstance(outcome, ConnectFailure):
            return p.on_connect_failure
        if isinstance(outcome, ResetBeforeResponse):
            return p.on_reset
        if isinstance(outcome, Status):
            return outcome.code in p.on_statuses
        if isinstance(outcome, GrpcStatus):
            return _grpc_key(outcome.name) in self._on_grpc
        return outcome.per_try and 504 in p.on_statuses

    def _safe(self, outcome: Outcome) -> bool:
        if isinstance(outcome, ConnectFailure):
            return True
        if isinstance(outcome, ResetBeforeResponse) and outcome.refused_stream:
            return True
        if self._grpc and isinstance(outcome, GrpcStatus):
            return True  # listed in on_grpc (checked before): declared safe
        return self._idempotent

    def may_retry(self, outcome: Outcome) -> RetryDecision:
        """Whether to try again after ``outcome``; a True decision is committed."""
        if isinstance(outcome, Timeout) and not outcome.per_try:
            return self._refuse(RetryReason.REQUEST_TIMEOUT)
        if not self._wanted(outcome):
            return self._refuse(RetryReason.NOT_RETRYABLE)
        if not self._safe(outcome):
            return self._refuse(RetryReason.NON_IDEMPOTENT)
        if self._body_ok is not None:
            return self._refuse(self._body_ok)
        if self.attempts >= self._policy.attempts:
            return self._refuse(RetryReason.ATTEMPTS_EXHAUSTED)
        p = self._policy
        wait = backoff.delay(self.attempts, p.backoff_base_s, p.backoff_max_s, self._rng)
        left = self._deadline.remaining(self._clock)
        if left is not None and left <= wait:
            return self._refuse(RetryReason.DEADLINE)
        if not self._budget.try_withdraw():
            return self._refuse(RetryReason.BUDGET_EXHAUSTED)
        self.attempts += 1
        return RetryDecision(True, RetryReason.RETRY, wait)
