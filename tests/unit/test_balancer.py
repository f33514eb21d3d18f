"""Load balancers on a hand-moved clock and a seeded RNG: what share of traffic each
endpoint gets, and how that follows load, latency, failures and membership changes."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.policy import Balancing, LbAlgorithm
from meshlet.runtime import FakeClock
from sidecar.balancer import (
    DEFAULT_RTT_S,
    Balancer,
    LeastRequest,
    P2CPeakEwma,
    RingHash,
    RoundRobin,
    make_balancer,
)

ABC = ("a", "b", "c")


def simulate(
    lb: Balancer,
    clock: FakeClock,
    candidates: Sequence[str],
    latency: Mapping[str, float],
    *,
    picks: int,
    gap_s: float,
    fail: frozenset[str] = frozenset(),
) -> Counter[str]:
    """Open-loop traffic: a request every ``gap_s``; each takes its endpoint's latency.
    Answers come back in time order, so outstanding counts are what a proxy would see."""
    counts: Counter[str] = Counter()
    in_flight: list[tuple[float, int, str]] = []
    for n in range(picks):
        now = clock.monotonic()
        while in_flight and in_flight[0][0] <= now:
            _, _, done = heapq.heappop(in_flight)
            lb.on_finish(done, latency[done], done not in fail)
        key = lb.pick(candidates)
        assert key is not None
        counts[key] += 1
        lb.on_start(key)
        heapq.heappush(in_flight, (now + latency[key], n, key))
        clock.advance(gap_s)
    for _, _, done in in_flight:
        lb.on_finish(done, latency[done], done not in fail)
    return counts


# -- round robin --------------------------------------------------------------------------


def test_round_robin_gives_each_of_three_exactly_a_third() -> None:
    lb = RoundRobin(random.Random(1))
    counts = Counter(lb.pick(ABC) for _ in range(300))
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_round_robin_starts_at_a_random_endpoint_so_sidecars_do_not_herd() -> None:
    firsts = {RoundRobin(random.Random(seed)).pick(ABC) for seed in range(30)}
    assert firsts == set(ABC)


def test_round_robin_stays_fair_while_an_endpoint_comes_and_goes() -> None:
    lb = RoundRobin(random.Random(2))
    full, without_b = ("a", "b", "c", "d"), ("a", "c", "d")
    counts: Counter[str | None] = Counter()
    for n in range(1200):
        counts[lb.pick(without_b if (n // 7) % 2 else full)] += 1
    steady = [counts["a"], counts["c"], counts["d"]]
    assert max(steady) - min(steady) <= 2
    assert counts["b"] > 0


def test_round_robin_continues_after_the_endpoint_that_left() -> None:
    lb = RoundRobin(random.Random(3))
    while lb.pick(("a", "b", "c", "d")) != "b":
        pass
    assert lb.pick(("a", "c", "d")) == "c"  # b left; the rotation goes on where it was
    assert lb.pick(("d", "c", "a")) == "a"  # a new order: still "after c"


def test_round_robin_exclude_skips_the_failed_endpoint() -> None:
    lb = RoundRobin(random.Random(4))
    picks = [lb.pick(ABC, exclude={"b"}) for _ in range(100)]
    assert set(picks) == {"a", "c"}
    assert lb.pick(ABC, exclude=ABC) is None
    assert lb.pick(()) is None


# -- least request ------------------------------------------------------------------------


def test_least_request_avoids_a_busy_endpoint() -> None:
    lb = LeastRequest(random.Random(5))
    for _ in range(5):
        lb.on_start("b")
    counts: Counter[str | None] = Counter()
    for _ in range(1000):
        key = lb.pick(ABC)
        counts[key] += 1
        assert key is not None
        lb.on_start(key)
        lb.on_finish(key, 0.001, True)
    assert counts["b"] == 0
    assert abs(counts["a"] - counts["c"]) < 150
    for _ in range(5):
        lb.on_finish("b", 0.001, True)
    assert lb.outstanding("b") == 0
    assert "b" in {lb.pick(ABC) for _ in range(100)}


def test_least_request_with_two_endpoints_always_takes_the_less_loaded() -> None:
    lb = LeastRequest(random.Random(6))
    lb.on_start("a")
    assert {lb.pick(("a", "b")) for _ in range(200)} == {"b"}


def test_least_request_breaks_ties_at_random() -> None:
    lb = LeastRequest(random.Random(7))
    counts = Counter(lb.pick(ABC) for _ in range(3000))
    assert all(abs(counts[k] - 1000) < 120 for k in ABC)


def test_least_request_keeps_every_endpoint_busy_evenly_under_concurrency() -> None:
    clock = FakeClock()
    lb = LeastRequest(random.Random(8))
    latency = {"a": 0.01, "b": 0.01, "c": 0.1}  # c is slow: it holds its requests longer
    counts = simulate(lb, clock, ABC, latency, picks=3000, gap_s=0.002)
    assert counts["c"] < counts["a"] / 3


# -- P2C peak EWMA ----------------------------------------------------------------------


def test_p2c_sends_little_to_a_10x_slower_endpoint_and_recovers_when_it_is_fast() -> None:
    clock = FakeClock()
    lb = P2CPeakEwma(clock, random.Random(9))
    latency = {"a": 0.005, "b": 0.005, "c": 0.05}
    simulate(lb, clock, ABC, latency, picks=200, gap_s=0.002)  # learn the latencies
    slow = simulate(lb, clock, ABC, latency, picks=1000, gap_s=0.002)
    assert slow["c"] < 100
    latency["c"] = 0.005  # c is fast again; its high estimate decays (tau 10 s)
    simulate(lb, clock, ABC, latency, picks=3000, gap_s=0.01)  # 30 s
    recovered = simulate(lb, clock, ABC, latency, picks=1500, gap_s=0.01)
    assert all(400 < recovered[k] < 600 for k in ABC), recovered


def test_p2c_estimate_jumps_to_a_peak_and_decays_with_tau() -> None:
    clock = FakeClock()
    lb = P2CPeakEwma(clock, random.Random(10))
    assert lb.estimate("a") == DEFAULT_RTT_S
    lb.on_start("a")
    lb.on_finish("a", 0.002, True)
    assert lb.estimate("a") == pytest.approx(0.002)  # the first sample replaces the prior
    lb.on_start("a")
    lb.on_finish("a", 0.2, True)
    assert lb.estimate("a") == pytest.approx(0.2)  # a higher sample: at once
    clock.advance(10.0)
    assert lb.estimate("a") == pytest.approx(0.2 / math.e)  # one tau later
    lb.on_start("a")
    lb.on_finish("a", 0.001, True)  # a lower sample does not drop the estimate at once
    assert lb.estimate("a") == pytest.approx(0.2 / math.e)
    clock.advance(30.0)
    assert lb.estimate("a") < 0.2 * math.exp(-3.9)


def test_p2c_gives_a_new_endpoint_traffic_without_flooding_it() -> None:
    clock = FakeClock()
    lb = P2CPeakEwma(clock, random.Random(11))
    latency = {"a": 0.05, "b": 0.05, "c": 0.05, "d": 0.05}
    simulate(lb, clock, ABC, latency, picks=300, gap_s=0.005)
    first_answer_at = clock.monotonic() + latency["d"]
    early: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    in_flight: list[tuple[float, int, str]] = []
    for n in range(400):
        now = clock.monotonic()
        while in_flight and in_flight[0][0] <= now:
            _, _, done = heapq.heappop(in_flight)
            lb.on_finish(done, latency[done], True)
        key = lb.pick(("a", "b", "c", "d"))
        assert key is not None
        counts[key] += 1
        if now < first_answer_at:
            early[key] += 1
        lb.on_start(key)
        heapq.heappush(in_flight, (now + latency[key], n, key))
        clock.advance(0.001)
    assert counts["d"] > 50  # it gets traffic at once…
    # …but before its first answer at most about 2/N of the picks (two random choices)
    assert early["d"] <= 0.6 * early.total()
    assert all(abs(counts[k] - 100) < 35 for k in counts), counts


def test_p2c_does_not_favour_an_endpoint_that_fails_fast() -> None:
    clock = FakeClock()
    lb = P2CPeakEwma(clock, random.Random(12))
    latency = {"a": 0.02, "b": 0.02, "c": 0.0005}  # c answers at once — with errors
    counts = simulate(lb, clock, ABC, latency, picks=3000, gap_s=0.002, fail=frozenset({"c"}))
    assert counts["c"] < 1000


def test_p2c_forgets_endpoints_that_left() -> None:
    clock = FakeClock()
    lb = P2CPeakEwma(clock, random.Random(13))
    lb.on_start("a")
    lb.on_finish("a", 1.0, True)
    lb.on_start("a")
    lb.forget(["a"])
    lb.on_finish("a", 1.0, True)  # an answer after the forget is ignored
    assert lb.estimate("a") == DEFAULT_RTT_S
    assert lb.outstanding("a") == 0


# -- ring hash ------------------------------------------------------------------------------

KEYS = [f"user-{i}".encode() for i in range(10_000)]


def mapping(lb: RingHash, candidates: Sequence[str]) -> dict[bytes, str | None]:
    return {k: lb.pick(candidates, hash_key=k) for k in KEYS}


def test_ring_hash_spreads_keys_evenly() -> None:
    lb = RingHash(random.Random(14))
    for candidates in (ABC, ("a", "b", "c", "d"), ("orders-1", "orders-2", "orders-3")):
        counts = Counter(mapping(lb, candidates).values())
        even = len(KEYS) / len(candidates)
        assert all(abs(counts[k] - even) <= 0.15 * even for k in candidates), counts


def test_ring_hash_moves_few_keys_when_an_endpoint_joins_or_leaves() -> None:
    lb = RingHash(random.Random(15))
    three = mapping(lb, ABC)
    four = mapping(lb, ("a", "b", "c", "d"))
    stayed = sum(three[k] == four[k] for k in KEYS)
    assert stayed >= 0.70 * len(KEYS)
    assert all(four[k] in (three[k], "d") for k in KEYS)  # keys only move to the new one
    back = mapping(lb, ABC)
    assert back == three  # d leaves: its keys go back where they were, nothing else moves


def test_ring_hash_is_sticky_and_independent_of_candidate_order() -> None:
    a, b = RingHash(random.Random(16)), RingHash(random.Random(17))
    assert mapping(a, ABC) == mapping(b, ("c", "a", "b"))


def test_ring_hash_exclude_moves_the_key_to_another_endpoint_consistently() -> None:
    lb = RingHash(random.Random(18))
    key = b"session-42"
    home = lb.pick(ABC, hash_key=key)
    assert home is not None
    other = lb.pick(ABC, hash_key=key, exclude={home})
    assert other not in (None, home)
    assert lb.pick(ABC, hash_key=key, exclude={home}) == other
    assert lb.pick(ABC, hash_key=key, exclude=ABC) is None


def test_ring_hash_without_a_hash_key_picks_at_random() -> None:
    lb = RingHash(random.Random(19))
    counts = Counter(lb.pick(ABC) for _ in range(3000))
    assert all(abs(counts[k] - 1000) < 120 for k in ABC)


def test_ring_hash_rebuilds_only_when_the_candidate_set_changes() -> None:
    lb = RingHash(random.Random(20))
    lb.pick(ABC, hash_key=b"x")
    ring = lb._points
    lb.pick(("c", "b", "a"), hash_key=b"x")  # same set, another order
    lb.pick(list(ABC), hash_key=b"x")
    assert lb._points is ring
    lb.pick(("a", "b"), hash_key=b"x")
    assert lb._points is not ring


# -- the factory and the contract every balancer keeps ----------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "kind"),
    [
        (LbAlgorithm.ROUND_ROBIN, RoundRobin),
        (LbAlgorithm.LEAST_REQUEST, LeastRequest),
        (LbAlgorithm.P2C_EWMA, P2CPeakEwma),
        (LbAlgorithm.RING_HASH, RingHash),
    ],
)
def test_make_balancer_follows_the_policy(algorithm: LbAlgorithm, kind: type) -> None:
    policy = Balancing(
        algorithm=algorithm,
        hash_header="x-user" if algorithm is LbAlgorithm.RING_HASH else None,
    )
    assert isinstance(make_balancer(policy, FakeClock(), random.Random(0)), kind)


def test_the_default_policy_balances_by_p2c_peak_ewma() -> None:
    assert isinstance(make_balancer(Balancing(), FakeClock(), random.Random(0)), P2CPeakEwma)


def all_balancers(seed: int) -> list[Balancer]:
    clock = FakeClock()
    return [
        RoundRobin(random.Random(seed)),
        LeastRequest(random.Random(seed)),
        P2CPeakEwma(clock, random.Random(seed)),
        RingHash(random.Random(seed), points_per_endpoint=16),
    ]


endpoint_ids = st.lists(st.sampled_from([f"ep{i}" for i in range(12)]), unique=True, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(
        st.tuples(
            endpoint_ids,
            st.sets(st.sampled_from([f"ep{i}" for i in range(12)]), max_size=12),
            st.one_of(st.none(), st.binary(max_size=8)),
            st.sampled_from(["finish-ok", "finish-fail", "open", "forget-one"]),
        ),
        max_size=40,
    ),
)
def test_every_balancer_picks_an_allowed_candidate_or_none_when_none_is_left(
    seed: int, steps: list[tuple[list[str], set[str], bytes | None, str]]
) -> None:
    for lb in all_balancers(seed):
        open_: list[str] = []
        for candidates, exclude, hash_key, then in steps:
            picked = lb.pick(tuple(candidates), exclude=exclude, hash_key=hash_key)
            allowed = [c for c in candidates if c not in exclude]
            if allowed:
                assert picked in allowed
            else:
                assert picked is None
            if picked is not None:
                lb.on_start(picked)
                open_.append(picked)
            if then == "finish-ok" and open_:
                lb.on_finish(open_.pop(0), 0.01, True)
            elif then == "finish-fail" and open_:
                lb.on_finish(open_.pop(), None, False)
            elif then == "forget-one" and candidates:
                lb.forget(candidates[:1])
        if isinstance(lb, (LeastRequest, P2CPeakEwma)):
            for key in open_:
                lb.on_finish(key, 0.01, True)
            assert all(lb.outstanding(f"ep{i}") == 0 for i in range(12))
