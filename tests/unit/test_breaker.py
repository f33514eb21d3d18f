"""Circuit breaking as Envoy means it: in-flight limits that reject at once when full,
count what they rejected, and never drift below zero or above the limit."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshlet.policy import CircuitBreaker
from sidecar.breaker import Breaker, Kind, KindStats


def test_envoy_defaults_allow_1024_of_each_kind() -> None:
    b = Breaker(CircuitBreaker())
    assert [b.limit(k) for k in Kind] == [1024, 1024, 1024]
    assert all(b.try_acquire(Kind.REQUESTS) for _ in range(1024))
    assert b.is_open(Kind.REQUESTS)
    assert not b.try_acquire(Kind.REQUESTS)


def test_a_full_breaker_rejects_at_once_counts_it_and_recovers_on_release() -> None:
    b = Breaker(CircuitBreaker(max_connections=2, max_pending=1, max_requests=3))
    assert b.try_acquire(Kind.CONNECTIONS) and b.try_acquire(Kind.CONNECTIONS)
    assert not b.try_acquire(Kind.CONNECTIONS)
    assert not b.try_acquire(Kind.CONNECTIONS)
    assert b.overflows(Kind.CONNECTIONS) == 2
    assert b.in_use(Kind.CONNECTIONS) == 2
    b.release(Kind.CONNECTIONS)
    assert not b.is_open(Kind.CONNECTIONS)
    assert b.try_acquire(Kind.CONNECTIONS)


def test_kinds_are_limited_independently() -> None:
    b = Breaker(CircuitBreaker(max_connections=1, max_pending=1, max_requests=1))
    assert b.try_acquire(Kind.CONNECTIONS)
    assert b.try_acquire(Kind.PENDING)
    assert b.try_acquire(Kind.REQUESTS)
    assert not b.try_acquire(Kind.PENDING)
    assert b.overflows(Kind.PENDING) == 1
    assert b.overflows(Kind.CONNECTIONS) == b.overflows(Kind.REQUESTS) == 0


def test_stats_show_gauges_limits_overflows_and_open_state() -> None:
    b = Breaker(CircuitBreaker(max_connections=1, max_pending=5, max_requests=5))
    b.try_acquire(Kind.CONNECTIONS)
    b.try_acquire(Kind.CONNECTIONS)
    b.try_acquire(Kind.REQUESTS)
    stats = b.stats()
    assert stats == (
        KindStats(kind=Kind.CONNECTIONS, in_use=1, limit=1, overflows=1),
        KindStats(kind=Kind.PENDING, in_use=0, limit=5, overflows=0),
        KindStats(kind=Kind.REQUESTS, in_use=1, limit=5, overflows=0),
    )
    assert [s.open for s in stats] == [True, False, False]


def test_releasing_more_than_was_acquired_is_a_bug_and_says_so() -> None:
    b = Breaker(CircuitBreaker())
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        b.release(Kind.PENDING)
    assert b.in_use(Kind.PENDING) == 0


def test_a_policy_change_keeps_what_is_in_flight() -> None:
    b = Breaker(CircuitBreaker(max_requests=4))
    for _ in range(4):
        b.try_acquire(Kind.REQUESTS)
    b.set_limits(CircuitBreaker(max_requests=2))
    assert b.in_use(Kind.REQUESTS) == 4  # nothing is evicted…
    assert not b.try_acquire(Kind.REQUESTS)  # …but nothing new gets in
    for _ in range(3):
        b.release(Kind.REQUESTS)
    assert b.try_acquire(Kind.REQUESTS)
    assert not b.try_acquire(Kind.REQUESTS)


class BreakerMachine(RuleBasedStateMachine):
    """Any interleaving of acquires and releases over the three kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = {Kind.CONNECTIONS: 3, Kind.PENDING: 1, Kind.REQUESTS: 5}
        self.breaker = Breaker(CircuitBreaker(max_connections=3, max_pending=1, max_requests=5))
        self.held = dict.fromkeys(Kind, 0)
        self.rejected = dict.fromkeys(Kind, 0)

    @rule(kind=st.sampled_from(Kind))
    def acquire(self, kind: Kind) -> None:
        ok = self.breaker.try_acquire(kind)
        assert ok == (self.held[kind] < self.limits[kind])
        if ok:
            self.held[kind] += 1
        else:
            self.rejected[kind] += 1

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from([k for k in Kind if self.held[k]]))
        self.breaker.release(kind)
        self.held[kind] -= 1

    @invariant()
    def usage_stays_between_zero_and_the_limit(self) -> None:
        for kind in Kind:
            assert 0 <= self.breaker.in_use(kind) <= self.breaker.limit(kind)
            assert self.breaker.in_use(kind) == self.held[kind]
            assert self.breaker.overflows(kind) == self.rejected[kind]
            assert self.breaker.is_open(kind) == (self.held[kind] == self.limits[kind])


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50)
TestBreakerInterleavings = BreakerMachine.TestCase
