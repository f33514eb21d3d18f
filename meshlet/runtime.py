"""Time and randomness, injected (STYLE.md rule 5).

Pure cores take a ``Clock`` and a ``random.Random``; only process entry points build
the real ones. Tests pass ``FakeClock``.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(slots=True)
class FakeClock:
    """A clock tests move by hand."""

    wall: dt.datetime = field(default_factory=lambda: dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    mono: float = 1000.0

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    clock: Clock
    rng: random.Random

    @classmethod
    def system(cls) -> Runtime:
        return cls(clock=SystemClock(), rng=random.Random())
