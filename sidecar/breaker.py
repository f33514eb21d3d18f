"""Circuit breaking per upstream service, with Envoy's meaning: limits on things in flight.

There is no timed open/half-open state machine here (that is outlier detection's job,
see ``outlier``). A breaker is three counters with ceilings: connections to the service,
connects/requests waiting for a connection (pending), and requests in flight. When a
counter is at its ceiling the breaker for that kind is OPEN and a new ``try_acquire``
is rejected at once (the caller fails fast with an overflow, Envoy's ``UO`` flag),
counted per kind for the admin view and metrics.

Pure bookkeeping: never imports asyncio, socket or ssl, never blocks, never reads the
clock. Every successful ``try_acquire`` must be paired with exactly one ``release``;
the I/O shell does that in a ``finally``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from meshlet.policy import CircuitBreaker


class Kind(StrEnum):
    CONNECTIONS = "connections"  # upstream connections open (Envoy max_connections)
    PENDING = "pending"  # connects/requests waiting for a connection (max_pending_requests)
    REQUESTS = "requests"  # requests in flight (max_requests)


@dataclass(frozen=True, slots=True, kw_only=True)
class KindStats:
    kind: Kind
    in_use: int
    limit: int
    overflows: int  # try_acquire calls rejected since the breaker was made

    @property
    def open(self) -> bool:
        """OPEN (Envoy's ``cx_open``/``rq_open`` gauges): the next acquire is rejected."""
        return self.in_use >= self.limit


def _limits(limits: CircuitBreaker) -> dict[Kind, int]:
    return {
        Kind.CONNECTIONS: limits.max_connections,
        Kind.PENDING: limits.max_pending,
        Kind.REQUESTS: limits.max_requests,
    }


class Breaker:
    """In-flight limits of one upstream service (shared by every connection to it)."""

    __slots__ = ("_in_use", "_limit", "_overflows")

    def __init__(self, limits: CircuitBreaker) -> None:
        self._limit = _limits(limits)
        self._in_use = dict.fromkeys(Kind, 0)
        self._overflows = dict.fromkeys(Kind, 0)

    def try_acquire(self, kind: Kind) -> bool:
        """Take one unit of ``kind``; False (and an overflow counted) if it is at its limit."""
        used = self._in_use[kind]
        if used >= self._limit[kind]:
            self._overflows[kind] += 1
            return False
        self._in_use[kind] = used + 1
        return True

    def release(self, kind: Kind) -> None:
        """Give back a unit taken by a successful ``try_acquire``.

        Releasing more than was acquired is a bug in the caller and raises, rather
        than letting the gauge drift below zero and the limit silently grow.
        """
        used = self._in_use[kind]
        if used <= 0:
            raise RuntimeError(f"circuit breaker: release of {kind} without a matching acquire")
        self._in_use[kind] = used - 1

    def set_limits(self, limits: CircuitBreaker) -> None:
        """Apply a changed policy without losing what is in flight.

        Lowering a limit below current usage evicts nothing: new acquires are rejected
        until enough units are released.
        """
        self._limit = _limits(limits)

    def in_use(self, kind: Kind) -> int:
        return self._in_use[kind]

    def limit(self, kind: Kind) -> int:
        return self._limit[kind]

    def overflows(self, kind: Kind) -> int:
        return self._overflows[kind]

    def is_open(self, kind: Kind) -> bool:
        """True when ``kind`` is at its limit, so the next ``try_acquire`` is rejected."""
        return self._in_use[kind] >= self._limit[kind]

    def stats(self) -> tuple[KindStats, ...]:
        """Gauges and overflow counters of every kind, for /clusters and metrics."""
        return tuple(
            KindStats(
                kind=k, in_use=self._in_use[k], limit=self._limit[k], overflows=self._overflows[k]
            )
            for k in Kind
        )
