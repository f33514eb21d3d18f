"""Outlier ejection on a hand-moved clock: who is balanced over after failures, for how
long, how many at once, and when the detector gives up and uses everyone (panic)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.policy import OutlierDetection
from meshlet.runtime import FakeClock
from sidecar.outlier import MAX_EJECTION_S, Ejection, OutlierDetector, Selection

ABC = ("a", "b", "c")
ALL_MAY_GO = OutlierDetection(max_ejection_percent=100)


def detector(policy: OutlierDetection | None = None) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    return OutlierDetector(policy or OutlierDetection(), clock), clock


def fail(d: OutlierDetector, key: str, times: int) -> list[Ejection | None]:
    return [d.record(key, ok=False) for _ in range(times)]


def eject(d: OutlierDetector, key: str) -> Ejection:
    for _ in range(100):
        ejection = d.record(key, ok=False)
        if ejection is not None:
            return ejection
    raise AssertionError(f"{key} was never ejected")


def test_five_consecutive_failures_eject_for_30_s_then_it_returns() -> None:
    d, clock = detector()
    d.available(ABC)
    now = clock.monotonic()
    *first, fifth = fail(d, "b", 5)
    assert first == [None] * 4
    assert fifth == Ejection(key="b", until=now + 30.0, count=1, duration_s=30.0)
    assert d.available(ABC) == Selection(keys=("a", "c"), panic=False, ejected=("b",))
    clock.advance(29.9)
    assert "b" not in d.available(ABC).keys
    clock.advance(0.1)
    assert d.available(ABC) == Selection(keys=ABC, panic=False, ejected=())


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    d, _ = detector()
    d.available(ABC)
    assert fail(d, "a", 4) == [None] * 4
    assert d.record("a", ok=True) is None
    assert fail(d, "a", 4) == [None] * 4
    assert d.available(ABC).keys == ABC
    state = d.state("a")
    assert state is not None and state.consecutive_failures == 4


def test_each_ejection_of_the_same_endpoint_lasts_twice_as_long_up_to_300_s() -> None:
    d, clock = detector()
    d.available(ABC)
    durations = []
    for _ in range(6):
        ejection = eject(d, "a")
        durations.append(ejection.duration_s)
        clock.advance(ejection.duration_s)  # back in rotation, and fails again at once
    assert durations == [30.0, 60.0, 120.0, 240.0, MAX_EJECTION_S, MAX_EJECTION_S]
    assert MAX_EJECTION_S == 300.0


def test_the_ejection_count_decays_while_the_endpoint_stays_healthy() -> None:
    d, clock = detector()
    d.available(ABC)
    assert eject(d, "a").count == 1
    clock.advance(30.0)
    assert eject(d, "a").count == 2  # failed again right after returning: 60 s
    clock.advance(60.0 + 30.0)  # back, then one base period (30 s) in rotation
    state = d.state("a")
    assert state is not None and state.ejection_count == 1
    assert eject(d, "a").duration_s == 60.0  # count 1 → this is the 2nd: 60 s
    clock.advance(60.0 + 120.0)  # back, then well over two base periods
    assert eject(d, "a").duration_s == 30.0  # forgiven: a first ejection again


def test_failures_of_requests_still_in_flight_do_not_extend_an_ejection() -> None:
    d, clock = detector()
    d.available(ABC)
    ejection = eject(d, "a")
    assert fail(d, "a", 20) == [None] * 20
    clock.advance(30.0)
    assert d.available(ABC).keys == ABC
    assert ejection.until == clock.monotonic()
    assert fail(d, "a", 4) == [None] * 4  # a clean count after returning


def test_with_three_endpoints_only_one_is_ejected_at_once_and_the_cap_is_recorded() -> None:
    d, clock = detector()  # max 10 %, but always at least one
    d.available(ABC)
    eject(d, "a")
    clock.advance(1.0)
    assert fail(d, "b", 10) == [None] * 10
    assert d.available(ABC) == Selection(keys=("b", "c"), panic=False, ejected=("a",))
    state = d.state("b")
    assert state is not None and state.cap_refusals == 6 and state.ejected_until is None
    assert d.stats().overflow_total == 6
    clock.advance(29.0)  # a returns, which frees the slot: b's next failure ejects it
    assert d.available(ABC).ejected == ()
    ejection = d.record("b", ok=False)
    assert ejection is not None and ejection.key == "b"
    assert d.available(ABC).ejected == ("b",)


def test_ten_percent_of_twenty_endpoints_may_be_ejected_at_once() -> None:
    d, _ = detector()
    keys = tuple(f"ep{i:02d}" for i in range(20))
    d.available(keys)
    for key in keys[:5]:
        fail(d, key, 5)
    assert d.available(keys).ejected == keys[:2]
    assert d.stats().ejected == 2


def test_a_lone_failing_endpoint_is_ejected_but_traffic_still_goes_to_it_in_panic() -> None:
    d, _ = detector()
    d.available(("a",))
    eject(d, "a")
    assert d.available(("a",)) == Selection(keys=("a",), panic=True, ejected=("a",))


def test_when_every_endpoint_fails_panic_balances_over_all_of_them() -> None:
    d, _ = detector(ALL_MAY_GO)
    d.available(ABC)
    for key in ABC:
        eject(d, key)
    assert d.available(ABC) == Selection(keys=ABC, panic=True, ejected=ABC)


def test_panic_starts_below_the_threshold_share_of_endpoints_left() -> None:
    d, _ = detector(ALL_MAY_GO)  # panic below 50 % left
    keys = ("a", "b", "c", "d")
    d.available(keys)
    eject(d, "a")
    eject(d, "b")
    assert d.available(keys) == Selection(keys=("c", "d"), panic=False, ejected=("a", "b"))
    eject(d, "c")
    assert d.available(keys) == Selection(keys=keys, panic=True, ejected=("a", "b", "c"))


def test_an_endpoint_that_left_and_came_back_starts_clean() -> None:
    d, _ = detector()
    d.available(ABC)
    eject(d, "a")
    fail(d, "b", 3)
    d.forget(["a", "b"])
    assert d.state("a") is None and d.state("b") is None
    assert d.available(ABC) == Selection(keys=ABC, panic=False, ejected=())
    assert fail(d, "b", 4) == [None] * 4
    ejection = eject(d, "a")  # the forgotten ejection no longer holds the only slot
    assert ejection.count == 1 and ejection.duration_s == 30.0


def test_state_reports_what_the_admin_view_shows() -> None:
    d, clock = detector()
    d.available(ABC)
    assert d.state("nobody") is None
    ejection = eject(d, "a")
    state = d.state("a")
    assert state is not None
    assert (state.ejected_until, state.consecutive_failures, state.ejection_count) == (
        ejection.until,
        0,
        1,
    )
    assert d.ejected() == ("a",)
    clock.advance(30.0)
    state = d.state("a")
    assert state is not None and state.ejected_until is None and state.ejection_count == 1
    stats = d.stats()
    assert (stats.endpoints, stats.ejected, stats.ejections_total) == (3, 0, 1)


def test_asking_again_with_the_same_endpoints_is_answered_from_cache() -> None:
    d, _ = detector()
    first = d.available(ABC)
    assert d.available(ABC) is first
    assert d.available(list(ABC)) == first
    eject(d, "a")
    assert d.available(ABC) is not first


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    policy=st.builds(
        OutlierDetection,
        consecutive_failures=st.integers(1, 4),
        base_ejection_s=st.sampled_from([1.0, 30.0]),
        max_ejection_percent=st.integers(0, 100),
        panic_threshold_percent=st.integers(0, 100),
    ),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("fail"), st.integers(0, 11)),
            st.tuples(st.just("ok"), st.integers(0, 11)),
            st.tuples(st.just("wait"), st.floats(0, 100)),
        ),
        max_size=80,
    ),
)
def test_ejections_never_exceed_the_cap_and_selections_are_consistent(
    n: int, policy: OutlierDetection, ops: list[tuple[str, float]]
) -> None:
    d, clock = detector(policy)
    keys = tuple(f"ep{i}" for i in range(n))
    cap = max(1, n * policy.max_ejection_percent // 100)
    for op, arg in ops:
        if op == "wait":
            clock.advance(arg)
        else:
            ejection = d.record(keys[int(arg) % n], ok=(op == "ok"))
            if ejection is not None:
                base = policy.base_ejection_s
                assert ejection.duration_s == min(
                    base * 2 ** (ejection.count - 1), max(base, MAX_EJECTION_S)
                )
        sel = d.available(keys)
        assert len(sel.ejected) <= cap
        assert set(sel.ejected) == set(d.ejected())
        left = [k for k in keys if k not in sel.ejected]
        if sel.panic:
            assert sel.keys == keys
            assert not left or len(left) * 100 < policy.panic_threshold_percent * n
        else:
            assert sel.keys == tuple(left)
            assert len(left) * 100 >= policy.panic_threshold_percent * n
