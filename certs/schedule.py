"""When to renew a certificate. Pure: ``now`` and the random source are handed in.

The convention (step CLI, Linkerd, Istio): renew once 2/3 of the lifetime has passed,
with jitter so a fleet issued together does not renew together.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from meshlet.durations import parse_duration
from meshlet.errors import InputError

RENEW_AT = 2 / 3
JITTER = 0.05  # ± this share of the lifetime around RENEW_AT


@dataclass(frozen=True, slots=True)
class Threshold:
    """Renew when what is left is at most ``fraction`` of the lifetime, or ``seconds``."""

    fraction: float | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Threshold:
        s = text.strip()
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise InputError(f"--expires-in {text!r} is not a percentage like 33%") from None
            if not 0 < pct <= 100:
                raise InputError(f"--expires-in {text!r} must be between 0% and 100%")
            return cls(fraction=pct / 100)
        return cls(seconds=parse_duration(s, what="--expires-in"))


DEFAULT_THRESHOLD = Threshold(fraction=1 - RENEW_AT)


def needs_renewal(
    not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, threshold: Threshold
) -> bool:
    left = (not_after - now).total_seconds()
    if threshold.seconds is not None:
        return left <= threshold.seconds
    lifetime = (not_after - not_before).total_seconds()
    assert threshold.fraction is not None
    return left <= lifetime * threshold.fraction


def renewal_time(
    not_before: dt.datetime, not_after: dt.datetime, rng: random.Random
) -> dt.datetime:
    """The moment to renew: 2/3 of the lifetime, ± 5% of it at random."""
    lifetime = not_after - not_before
    share = RENEW_AT + rng.uniform(-JITTER, JITTER)
    return not_before + lifetime * share


def retry_delay(attempt: int, rng: random.Random, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Full-jitter exponential backoff for a failed renewal (attempt counts from 1)."""
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 16)))
