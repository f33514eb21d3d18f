"""Full-jitter exponential backoff: how long to wait before the next attempt.

Used between retries of a request and between reconnects to the control plane. Pure:
it is handed its ``random.Random`` and never sleeps, reads the clock or imports asyncio.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the delay before
attempt ``n`` is uniform in ``[0, min(max_s, base_s * 2**(n-1))]``, which spreads
clients that failed together instead of making them retry in lock-step.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 62  # 2**62 * any sane base is past any cap; keeps the float finite


def ceiling(attempt: int, base_s: float, max_s: float) -> float:
    """The largest delay ``delay`` can return for this attempt."""
    if attempt < 1:
        raise ValueError(f"backoff attempt counts from 1 (the first retry), not {attempt}")
    if base_s < 0 or max_s < base_s:
        raise ValueError(f"backoff needs 0 <= base_s <= max_s, not base {base_s}, max {max_s}")
    return min(max_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))


def delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt`` (1 = the first retry or reconnect)."""
    return ceiling(attempt, base_s, max_s) * rng.random()
