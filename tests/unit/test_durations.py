"""Human durations (meshlet/durations.py), as every `--ttl` and `--expires-in` takes them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.durations import format_duration, parse_duration
from meshlet.errors import InputError


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("24h", 86400),
            ("90m", 5400),
            ("1h30m", 5400),
            ("10y", 3650 * 86400),
            ("1y", 365 * 86400),
            ("2w", 14 * 86400),
            ("3d", 3 * 86400),
            ("45s", 45),
            ("500ms", 0.5),
            ("1.5h", 5400),
            ("1d2h3m4s", 93784),
            ("  6s  ", 6),
        ],
    )
    def test_valid(self, text: str, seconds: float):
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("5x", "--ttl '5x' is not a duration: use a number with a unit"),
            ("-1h", "--ttl '-1h' is not a duration"),
            ("24", "--ttl '24' is not a duration"),
            ("h", "--ttl 'h' is not a duration"),
            ("24H", "--ttl '24H' is not a duration"),
            ("1h 30m", "is not a duration"),
            ("1h30", "is not a duration"),
            (".5h", "is not a duration"),
            ("0s", "--ttl '0s' must be longer than zero"),
            ("0h0m", "must be longer than zero"),
            ("", "--ttl is empty: use a value like 24h"),
            ("   ", "--ttl is empty"),
        ],
    )
    def test_invalid(self, text: str, message: str):
        with pytest.raises(InputError, match=message):
            parse_duration(text, what="--ttl")

    def test_the_error_names_a_default_subject(self):
        with pytest.raises(InputError, match=r"^duration 'soon' is not a duration"):
            parse_duration("soon")


class TestFormatDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (93784, "1d2h3m4s"),
            (86400, "1d"),
            (3600, "1h"),
            (5400, "1h30m"),
            (59.9, "59s"),
            (0, "0s"),
            (0.5, "500ms"),
            (-90, "-1m30s"),
            (-0.25, "-250ms"),
        ],
    )
    def test_values(self, seconds: float, text: str):
        assert format_duration(seconds) == text

    @given(st.integers(min_value=1, max_value=10**9))
    def test_whole_seconds_round_trip(self, seconds: int):
        assert parse_duration(format_duration(seconds)) == seconds
        assert format_duration(-seconds) == "-" + format_duration(seconds)
