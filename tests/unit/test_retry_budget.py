"""The retry budget on a hand-moved clock: a failing upstream gets at most 20% more
requests plus 10 retries a second, quiet services may still retry, and the backoff
between attempts is full-jitter exponential."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.policy import RetryBudget as RetryBudgetPolicy
from meshlet.runtime import FakeClock
from sidecar.backoff import ceiling, delay
from sidecar.retry_budget import RetryBudget


def hammer(rate: int, seconds: int, attempts: int = 3) -> tuple[list[float], list[float]]:
    """A 100%-failing upstream called ``rate`` times a second, ``attempts`` tries each.
    Returns the times of the requests and of the retries the budget allowed."""
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(), clock)
    requests: list[float] = []
    retries: list[float] = []
    for _ in range(rate * seconds):
        now = clock.monotonic()
        budget.deposit()
        requests.append(now)
        for _ in range(attempts - 1):  # every try fails: retry while the budget allows
            if not budget.try_withdraw():
                break
            retries.append(now)
        clock.advance(1.0 / rate)
    return requests, retries


@pytest.mark.parametrize("rate", [100, 1000])
def test_a_failing_upstream_gets_at_most_20_percent_plus_10_per_s_of_retries(rate: int) -> None:
    requests, retries = hammer(rate, seconds=60)
    bound = (0.2 * rate + 10) * 60
    assert len(retries) <= bound
    assert len(retries) >= 0.85 * bound  # the budget is spent, not hoarded
    assert len(retries) < 0.3 * len(requests) + 1  # instead of 2 retries per request
    # and in every 10 s window, not just on average
    start = requests[0]
    for t in range(0, 51):
        lo, hi = start + t, start + t + 10
        in_window = sum(lo <= r < hi for r in retries)
        assert in_window <= 0.2 * rate * 10 + 10 * 10


def test_a_quiet_service_may_retry_every_request() -> None:
    requests, retries = hammer(rate=2, seconds=60)  # 4 retries/s, under the 10/s reserve
    assert len(retries) == 2 * len(requests)


def test_a_zero_budget_never_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(percent=0, min_per_s=0), clock)
    for _ in range(100):
        budget.deposit()
        assert not budget.try_withdraw()
    assert budget.stats().exhausted_total == 100


def test_an_exhausted_budget_refills_when_the_window_has_passed() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(), clock)  # reserve: 10/s * 10 s = 100
    spent = 0
    while budget.try_withdraw():
        spent += 1
    assert spent == 100
    assert budget.balance() < 1
    clock.advance(11.0)
    assert budget.balance() == pytest.approx(100)
    stats = budget.stats()
    assert (stats.requests_in_window, stats.retries_in_window, stats.exhausted_total) == (0, 0, 1)


def test_requests_earn_retries_at_the_configured_percent() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(percent=50, min_per_s=0), clock)
    for _ in range(10):
        budget.deposit()
    assert budget.balance() == pytest.approx(5)
    assert sum(budget.try_withdraw() for _ in range(8)) == 5


@settings(max_examples=200, deadline=None)
@given(
    percent=st.sampled_from([0.0, 20.0, 50.0, 100.0]),
    min_per_s=st.sampled_from([0.0, 1.0, 10.0]),
    ops=st.lists(
        st.tuples(st.integers(0, 40), st.booleans()),  # (gap in 1/8 s, deposit or retry)
        max_size=300,
    ),
)
def test_retries_in_any_window_stay_within_the_budget(
    percent: float, min_per_s: float, ops: list[tuple[int, bool]]
) -> None:
    window = 10.0
    policy = RetryBudgetPolicy(percent=percent, min_per_s=min_per_s, window_s=window)
    clock = FakeClock()
    budget = RetryBudget(policy, clock)
    deposits: deque[float] = deque()
    retries: deque[float] = deque()
    for gap, is_deposit in ops:
        clock.advance(gap / 8)  # eighths of a second: exact in binary floating point
        now = clock.monotonic()
        if is_deposit:
            budget.deposit()
            deposits.append(now)
        elif budget.try_withdraw():
            retries.append(now)
            recent_retries = sum(1 for t in retries if t > now - window)
            recent_requests = sum(1 for t in deposits if t > now - window)
            limit = percent / 100 * recent_requests + min_per_s * window
            assert recent_retries <= limit + 1e-9


def test_backoff_is_full_jitter_under_a_doubling_ceiling() -> None:
    assert [ceiling(n, 0.025, 0.25) for n in range(1, 6)] == [0.025, 0.05, 0.1, 0.2, 0.25]
    assert ceiling(10_000, 0.025, 0.25) == 0.25
    rng = random.Random(21)
    samples = [delay(3, 0.025, 0.25, rng) for _ in range(5000)]
    assert all(0 <= s <= 0.1 for s in samples)
    assert sum(samples) / len(samples) == pytest.approx(0.05, rel=0.05)  # uniform: mean = half
    assert min(samples) < 0.005 and max(samples) > 0.095  # spread over the whole range


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = [delay(n, 0.1, 5.0, random.Random(7)) for n in range(1, 8)]
    b = [delay(n, 0.1, 5.0, random.Random(7)) for n in range(1, 8)]
    assert a == b


@pytest.mark.parametrize(("attempt", "base", "cap"), [(0, 0.1, 1.0), (1, -1.0, 1.0), (1, 2, 1)])
def test_backoff_rejects_nonsense(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        delay(attempt, base, cap, random.Random(0))
