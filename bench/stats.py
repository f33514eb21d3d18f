"""Small statistics shared by every suite and the comparison: percentiles, medians,
ratios, the proxy-CPU unit, wrk's report, and a timing loop.

For: pure arithmetic on figures already measured, so it is unit-tested without a loop.
Must never: start processes, open sockets or read the clock (``rate`` is the one timing
helper, kept here for the older suites).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    """a / b, or NaN when either is missing, not finite, or b is zero."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return float("nan")
    return a / b


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per figure, the median over the runs that have it (numbers only)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k, v in run.items() if isinstance(v, int | float) and k not in keys]
    return {k: median(run[k] for run in runs if k in run) for k in keys}


def vcpu_per_krps_per_hop(cpu_s: float, wall_s: float, requests: float, hops: int) -> float:
    """Istio's unit: the proxy CPU (in vCPUs, i.e. CPU seconds per second) spent per
    1000 requests/s, per proxy hop. NaN when nothing was measured."""
    if wall_s <= 0 or requests <= 0 or hops <= 0:
        return float("nan")
    vcpu = cpu_s / wall_s
    krps = requests / wall_s / 1000
    return vcpu / krps / hops


def interleave(variants: Sequence[str], runs: int) -> list[tuple[int, str]]:
    """The order runs happen in: A B C A B C … (run index, variant)."""
    return [(i, v) for i in range(runs) for v in variants]


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """wrk's durations: '812.00us', '1.23ms', '2.00s', '1.00m'."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """The figures of `wrk --latency`'s report: requests/s, p50/p90/p99 (ms), requests,
    socket errors and non-2xx/3xx answers."""
    out: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s*([0-9.]+)", output)
    if not m:
        raise ValueError("wrk printed no Requests/sec line:\n" + output[-2000:])
    out["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([0-9.]+\s*(?:us|ms|s|m|h))\s*$", output, re.M)
        if m:
            out[f"p{pct}_ms"] = parse_duration_s(m.group(1)) * 1e3
    m = re.search(r"(\d+) requests in ([0-9.]+\s*(?:us|ms|s|m|h))", output)
    if m:
        out["requests"] = float(m.group(1))
        out["wrk_seconds"] = parse_duration_s(m.group(2))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        errors = sum(int(g) for g in m.groups())
    out["socket_errors"] = float(errors)
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    out["non_2xx"] = float(m.group(1)) if m else 0.0
    return out


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
