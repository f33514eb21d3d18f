"""Small statistics shared by every suite: percentiles and a timing loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rate(fn: Callable[[], object], *, seconds: float) -> dict[str, float]:
    """Call ``fn`` repeatedly for about ``seconds``; per-call latency percentiles and ops/s."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {
        "ops_per_s": len(samples) / sum(samples),
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
        "count": len(samples),
    }
