"""When to renew (certs/schedule.py): at 2/3 of the lifetime with jitter, never outside
[0.6167, 0.7167] of it; and the thresholds `needs-renewal --expires-in` takes."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from certs_helpers import NOW
from hypothesis import given
from hypothesis import strategies as st

from certs.schedule import DEFAULT_THRESHOLD, Threshold, needs_renewal, renewal_time, retry_delay
from meshlet.errors import InputError

# 2/3 ± 5% of the lifetime: [0.61667, 0.71667], i.e. [0.6167, 0.7167] to four places. The
# bounds below allow for the microsecond rounding of datetime arithmetic and nothing more.
LOW, HIGH = 0.61666, 0.71667

lifetimes = st.integers(min_value=1, max_value=10 * 365 * 86400).map(
    lambda s: dt.timedelta(seconds=s)
)


@given(lifetime=lifetimes, rng=st.randoms(use_true_random=False))
def test_renewal_time_is_always_within_its_window(lifetime: dt.timedelta, rng: random.Random):
    when = renewal_time(NOW, NOW + lifetime, rng)
    share = (when - NOW) / lifetime
    assert LOW <= share <= HIGH


def test_a_fleet_issued_together_does_not_renew_together():
    rng = random.Random(7)
    lifetime = dt.timedelta(hours=24)
    shares = [(renewal_time(NOW, NOW + lifetime, rng) - NOW) / lifetime for _ in range(500)]
    assert min(shares) < 0.63 and max(shares) > 0.70, "jitter spreads renewals over the window"
    assert abs(sum(shares) / len(shares) - 2 / 3) < 0.01, "centred on 2/3 of the lifetime"


def test_the_default_is_past_two_thirds_of_the_lifetime():
    not_after = NOW + dt.timedelta(hours=3)

    def needs(elapsed_minutes: int) -> bool:
        now = NOW + dt.timedelta(minutes=elapsed_minutes)
        return needs_renewal(NOW, not_after, now, DEFAULT_THRESHOLD)

    assert not needs(0)
    assert not needs(119)
    assert needs(120)
    assert needs(179)
    assert needs(200), "an expired certificate needs renewal too"


def test_a_share_of_the_lifetime_as_threshold():
    threshold = Threshold.parse("33%")
    assert threshold == Threshold(fraction=0.33)
    not_after = NOW + dt.timedelta(seconds=100)
    assert not needs_renewal(NOW, not_after, NOW + dt.timedelta(seconds=66), threshold)
    assert needs_renewal(NOW, not_after, NOW + dt.timedelta(seconds=67), threshold)


def test_a_duration_as_threshold():
    threshold = Threshold.parse("1h")
    assert threshold == Threshold(seconds=3600)
    not_after = NOW + dt.timedelta(hours=24)
    assert not needs_renewal(NOW, not_after, not_after - dt.timedelta(minutes=61), threshold)
    assert needs_renewal(NOW, not_after, not_after - dt.timedelta(minutes=60), threshold)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0%", "must be between 0% and 100%"),
        ("101%", "must be between 0% and 100%"),
        ("-5%", "must be between 0% and 100%"),
        ("abc%", "is not a percentage like 33%"),
        ("%", "is not a percentage like 33%"),
        ("5x", "--expires-in '5x' is not a duration"),
        ("0s", "must be longer than zero"),
        ("", "--expires-in is empty"),
    ],
)
def test_bad_thresholds_are_refused(text: str, message: str):
    with pytest.raises(InputError, match=message):
        Threshold.parse(text)


@given(attempt=st.integers(1, 100), rng=st.randoms(use_true_random=False))
def test_retry_delays_are_bounded_and_never_negative(attempt: int, rng: random.Random):
    delay = retry_delay(attempt, rng)
    assert 0 <= delay <= 60
    assert delay <= 2**attempt


def test_retry_delays_grow_with_failures():
    rng = random.Random(1)
    first = [retry_delay(1, rng) for _ in range(200)]
    fifth = [retry_delay(5, rng) for _ in range(200)]
    assert max(first) <= 2 < max(fifth)
