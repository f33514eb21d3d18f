"""Finagle's retry budget: retries may add at most ``percent`` of the requests seen over
the last ``window_s`` seconds, plus ``min_per_s`` retries per second (a reserve of
``min_per_s * window_s`` retries per window so that quiet services can still retry).

This is what stops retry storms: when an upstream fails everything, a client with 3
attempts per request sends about 1.2x its request rate instead of 3x.

``deposit()`` once per original request, ``try_withdraw()`` before each retry (False:
do not retry, answer with the failure). Pure: time comes from the injected clock; never
imports asyncio, socket or ssl, never reads ``time`` or ``random``.

Like Finagle's ``WindowedAdder`` and tower's ``TpsBudget`` the window is kept in
``SLOTS`` buckets, so each call is O(1) and memory does not grow with the request rate.
Buckets make a window approximate; this one errs on the safe side: deposits count for
between ``window_s * (SLOTS-1)/SLOTS`` and ``window_s`` seconds and withdrawals for
between ``window_s`` and ``window_s * (SLOTS+1)/SLOTS``, so for every retry allowed at
time ``t``, the retries in ``(t - window_s, t]`` are never more than
``percent% * requests in (t - window_s, t] + min_per_s * window_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshlet.policy import RetryBudget as RetryBudgetPolicy
from meshlet.runtime import Clock

SLOTS = 10
_EPS = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStats:
    requests_in_window: int
    retries_in_window: int
    balance: float  # retries the budget would allow right now
    exhausted_total: int  # retries refused since the budget was made


class RetryBudget:
    """The retry budget of one upstream service."""

    __slots__ = (
        "_clock",
        "_dep",
        "_dep_sum",
        "_epoch",
        "_exhausted",
        "_ratio",
        "_reserve",
        "_slot_s",
        "_wd",
        "_wd_sum",
    )

    def __init__(self, policy: RetryBudgetPolicy, clock: Clock) -> None:
        self._clock = clock
        self._ratio = policy.percent / 100.0
        self._reserve = policy.min_per_s * policy.window_s
        self._slot_s = policy.window_s / SLOTS
        # One ring of SLOTS + 1 buckets; deposits count over the newest SLOTS of them,
        # withdrawals over all SLOTS + 1 (see the module docstring for why).
        self._dep = [0] * (SLOTS + 1)
        self._wd = [0] * (SLOTS + 1)
        self._dep_sum = 0
        self._wd_sum = 0
        self._epoch = self._slot_of(clock.monotonic())
        self._exhausted = 0

    def _slot_of(self, now: float) -> int:
        return math.floor(now / self._slot_s)

    def _advance(self) -> int:
        """Move the ring to the current time; return the index of the current bucket."""
        m = SLOTS + 1
        epoch = self._slot_of(self._clock.monotonic())
        steps = epoch - self._epoch
        if steps <= 0:  # same bucket (or a clock that did not move)
            return self._epoch % m
        if steps >= m:
            self._dep = [0] * m
            self._wd = [0] * m
            self._dep_sum = self._wd_sum = 0
        else:
            dep, wd = self._dep, self._wd
            for e in range(self._epoch + 1, epoch + 1):
                cur = e % m
                # The bucket being reused held the oldest withdrawals: they expire now.
                self._wd_sum -= wd[cur]
                wd[cur] = 0
                dep[cur] = 0  # its deposits had already left the deposit window
                # The bucket that is now the oldest leaves the deposit window.
                oldest = (e + 1) % m
                self._dep_sum -= dep[oldest]
        self._epoch = epoch
        return epoch % m

    def _balance(self) -> float:
        return self._ratio * self._dep_sum + self._reserve - self._wd_sum

    def deposit(self) -> None:
        """Count one original request (not a retry)."""
        cur = self._advance()
        self._dep[cur] += 1
        self._dep_sum += 1

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it; False means "do not retry"."""
        cur = self._advance()
        if self._balance() < 1.0 - _EPS:
            self._exhausted += 1
            return False
        self._wd[cur] += 1
        self._wd_sum += 1
        return True

    def balance(self) -> float:
        """How many retries the budget would allow now (may be fractional or negative)."""
        self._advance()
        return self._balance()

    def stats(self) -> BudgetStats:
        self._advance()
        return BudgetStats(
            requests_in_window=self._dep_sum,
            retries_in_window=self._wd_sum,
            balance=self._balance(),
            exhausted_total=self._exhausted,
        )
