"""The sidecar's per-connection/per-request decisions: a balancer pick (each algorithm,
3 and 100 endpoints), outlier detection's ``available`` over 100 endpoints, a breaker
acquire/release and a retry-budget deposit/withdraw. These run once per connection at
L4 and once per request (and retry) at L7, so they must stay in the microseconds."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

from bench.stats import rate
from meshlet.policy import CircuitBreaker, OutlierDetection
from meshlet.policy import RetryBudget as RetryBudgetPolicy
from meshlet.runtime import FakeClock
from sidecar.balancer import Balancer, LeastRequest, P2CPeakEwma, RingHash, RoundRobin
from sidecar.breaker import Breaker, Kind
from sidecar.outlier import OutlierDetector
from sidecar.retry_budget import RetryBudget


def _balancers(clock: FakeClock, rng: random.Random) -> dict[str, Balancer]:
    return {
        "round_robin": RoundRobin(rng),
        "least_request": LeastRequest(rng),
        "p2c_ewma": P2CPeakEwma(clock, rng),
        "ring_hash": RingHash(rng),
    }


def _pick_fn(name: str, lb: Balancer, candidates: tuple[str, ...]) -> Callable[[], object]:
    if name == "ring_hash":
        keys = itertools.cycle([f"user-{i}".encode() for i in range(4096)])
        return lambda: lb.pick(candidates, hash_key=next(keys))
    return lambda: lb.pick(candidates)


def run(quick: bool) -> list[dict[str, Any]]:
    seconds = 0.3 if quick else 1.5
    clock = FakeClock()
    rng = random.Random(1)
    rows: list[dict[str, Any]] = []
    for n in (3, 100):
        candidates = tuple(f"ep-{i:03d}" for i in range(n))
        for name, lb in _balancers(clock, rng).items():
            for i, key in enumerate(candidates):  # some history: samples and load
                lb.on_start(key)
                lb.on_finish(key, 0.001 * (1 + i % 7), True)
                if i % 3 == 0:
                    lb.on_start(key)
            pick = _pick_fn(name, lb, candidates)
            pick()  # RingHash builds its ring once, outside the timing
            rows.append(
                {
                    "suite": "sidecar-cores",
                    "name": f"pick_{name}_{n}",
                    **rate(pick, seconds=seconds),
                }
            )

    keys = tuple(f"ep-{i:03d}" for i in range(100))
    detector = OutlierDetector(OutlierDetection(), clock)
    detector.available(keys)
    for key in keys[:2]:
        for _ in range(5):
            detector.record(key, ok=False)
    as_list = list(keys)
    rows += [
        {
            "suite": "sidecar-cores",
            "name": "outlier_available_100",
            **rate(lambda: detector.available(keys), seconds=seconds),
        },
        {
            "suite": "sidecar-cores",
            "name": "outlier_available_100_uncached",
            **rate(lambda: detector.available(as_list), seconds=seconds),
        },
        {
            "suite": "sidecar-cores",
            "name": "outlier_record_ok",
            **rate(lambda: detector.record("ep-050", ok=True), seconds=seconds),
        },
    ]

    breaker = Breaker(CircuitBreaker())

    def acquire_release() -> None:
        if breaker.try_acquire(Kind.REQUESTS):
            breaker.release(Kind.REQUESTS)

    budget = RetryBudget(RetryBudgetPolicy(), clock)

    def deposit_withdraw() -> None:
        budget.deposit()
        budget.try_withdraw()
        clock.advance(0.001)

    rows += [
        {
            "suite": "sidecar-cores",
            "name": "breaker_acquire_release",
            **rate(acquire_release, seconds=seconds),
        },
        {
            "suite": "sidecar-cores",
            "name": "retry_budget_deposit_withdraw",
            **rate(deposit_withdraw, seconds=seconds),
        },
    ]
    return rows
