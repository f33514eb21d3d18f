"""Retry and timeout decisions on a hand-moved clock and a seeded RNG: what is retried,
what never is, how the budget caps retries of a failing service, and how deadlines
(route, policy, grpc-timeout) bound each try."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.policy import RetryBudget as RetryBudgetPolicy
from meshlet.policy import RetryPolicy
from meshlet.runtime import FakeClock
from sidecar.l7policy import (
    ATTEMPTS_HEADER,
    GRPC_UNAVAILABLE,
    ConnectFailure,
    Deadline,
    GrpcStatus,
    Outcome,
    ResetBeforeResponse,
    RetryReason,
    RetryState,
    Status,
    Timeout,
    encode_grpc_timeout,
    grpc_status_name,
    is_idempotent,
    parse_grpc_timeout,
)
from sidecar.retry_budget import RetryBudget


def state(
    policy: RetryPolicy | None = None,
    *,
    method: str = "GET",
    body_size: int | None = 0,
    grpc: bool = False,
    deadline: Deadline | None = None,
    clock: FakeClock | None = None,
    budget: RetryBudget | None = None,
    seed: int = 0,
) -> RetryState:
    policy = policy or RetryPolicy()
    clock = clock or FakeClock()
    return RetryState(
        policy,
        budget or RetryBudget(policy.budget, clock),
        clock,
        random.Random(seed),
        method=method,
        body_size=body_size,
        grpc=grpc,
        deadline=deadline or Deadline(None),
    )


# -- idempotency --------------------------------------------------------------------------


def test_idempotent_methods_are_rfc_9110s() -> None:
    for m in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"):
        assert is_idempotent(m)
    for m in ("POST", "PATCH", "CONNECT", "get", "PURGE"):
        assert not is_idempotent(m)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_requests_are_retried_on_503(method: str) -> None:
    d = state(method=method).may_retry(Status(503))
    assert d.retry and d.reason is RetryReason.RETRY


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_post_that_got_503_is_not_sent_twice_by_default(method: str) -> None:
    s = state(method=method)
    for outcome in (Status(503), ResetBeforeResponse(), Timeout(per_try=True)):
        d = s.may_retry(outcome)
        assert not d.retry and d.reason is RetryReason.NON_IDEMPOTENT
    assert s.attempts == 1


def test_the_policy_may_allow_retrying_non_idempotent_requests() -> None:
    assert state(RetryPolicy(non_idempotent=True), method="POST").may_retry(Status(503)).retry


def test_a_request_that_never_reached_the_app_is_retried_whatever_its_method() -> None:
    assert state(method="POST").may_retry(ConnectFailure()).retry
    assert state(method="POST").may_retry(ResetBeforeResponse(refused_stream=True)).retry


# -- which outcomes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "retry"),
    [
        (ConnectFailure(), True),
        (ResetBeforeResponse(), True),
        (Status(502), True),
        (Status(503), True),
        (Status(504), True),
        (Status(500), False),
        (Status(429), False),
        (Status(200), False),
        (Timeout(per_try=True), True),
    ],
)
def test_default_retry_conditions(outcome: Outcome, retry: bool) -> None:
    d = state().may_retry(outcome)
    assert d.retry is retry
    if not retry:
        assert d.reason is RetryReason.NOT_RETRYABLE


def test_statuses_and_conditions_are_configurable() -> None:
    policy = RetryPolicy(on_statuses=(500,), on_connect_failure=False, on_reset=False)
    assert state(policy).may_retry(Status(500)).retry
    for outcome in (Status(503), ConnectFailure(), ResetBeforeResponse(), Timeout(per_try=True)):
        assert not state(policy).may_retry(outcome).retry


def test_the_request_deadline_is_never_retried() -> None:
    d = state().may_retry(Timeout(per_try=False))
    assert not d.retry and d.reason is RetryReason.REQUEST_TIMEOUT


def test_grpc_unavailable_is_retried_by_default_though_grpc_is_post() -> None:
    for outcome in (
        GrpcStatus("UNAVAILABLE"),
        GrpcStatus("unavailable"),
        GrpcStatus.from_code(GRPC_UNAVAILABLE),
    ):
        assert state(method="POST", grpc=True).may_retry(outcome).retry
    s = state(method="POST", grpc=True)
    d = s.may_retry(GrpcStatus("INTERNAL"))
    assert not d.retry and d.reason is RetryReason.NOT_RETRYABLE
    # other failures of a gRPC call follow the POST rule
    assert s.may_retry(ResetBeforeResponse()).reason is RetryReason.NON_IDEMPOTENT


def test_grpc_codes_in_the_policy_spelling() -> None:
    policy = RetryPolicy(on_grpc=("deadline-exceeded", "resource-exhausted"))
    s = state(policy, method="POST", grpc=True)
    assert s.may_retry(GrpcStatus("DEADLINE_EXCEEDED")).retry
    assert s.may_retry(GrpcStatus.from_code(8)).retry  # RESOURCE_EXHAUSTED
    assert grpc_status_name(14) == "unavailable"
    assert grpc_status_name(99) == "unknown"


# -- bodies -------------------------------------------------------------------------------


def test_bodies_up_to_64_kib_are_retried_and_larger_ones_are_not() -> None:
    assert state(method="PUT", body_size=65536).may_retry(Status(503)).retry
    d = state(method="PUT", body_size=65537).may_retry(Status(503))
    assert not d.retry and d.reason is RetryReason.BODY_TOO_LARGE


def test_a_streaming_body_of_unknown_length_is_never_retried() -> None:
    d = state(method="PUT", body_size=None).may_retry(ConnectFailure())
    assert not d.retry and d.reason is RetryReason.BODY_UNKNOWN_LENGTH


def test_the_body_limit_is_the_policys() -> None:
    assert not state(RetryPolicy(max_body_bytes=10), body_size=11).may_retry(Status(503)).retry


# -- attempts, backoff, endpoints ---------------------------------------------------------


def test_three_attempts_means_two_retries_and_the_header_counts_them() -> None:
    s = state()
    assert s.attempts == 1
    assert s.may_retry(Status(503)).retry
    assert s.attempts == 2
    assert s.may_retry(Status(503)).retry
    assert s.attempts == 3
    d = s.may_retry(Status(503))
    assert not d.retry and d.reason is RetryReason.ATTEMPTS_EXHAUSTED and d.limit_reached
    assert s.attempts == 3
    assert ATTEMPTS_HEADER == b"x-meshlet-attempts"


def test_one_attempt_means_no_retry() -> None:
    d = state(RetryPolicy(attempts=1)).may_retry(ConnectFailure())
    assert d.reason is RetryReason.ATTEMPTS_EXHAUSTED


def test_backoff_is_full_jitter_and_grows_to_the_cap() -> None:
    policy = RetryPolicy(attempts=10, backoff_base_s=0.025, backoff_max_s=0.25)
    waits: list[list[float]] = [[] for _ in range(9)]
    for seed in range(300):
        s = state(policy, seed=seed)
        for n in range(9):
            d = s.may_retry(ConnectFailure())
            assert d.retry
            waits[n].append(d.backoff_s)
    for n, ws in enumerate(waits):
        cap = min(0.25, 0.025 * 2**n)
        assert all(0 <= w <= cap for w in ws)
        assert max(ws) > 0.9 * cap and min(ws) < 0.1 * cap  # spread over the whole range


def test_tried_endpoints_are_remembered_for_the_next_pick() -> None:
    s = state()
    s.tried.add("orders-1")
    assert s.may_retry(ConnectFailure()).retry
    s.tried.add("orders-2")
    assert s.tried == {"orders-1", "orders-2"}


# -- the retry budget ---------------------------------------------------------------------


def test_a_failing_service_gets_at_most_20_percent_more_requests_plus_10_per_s() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(), clock)
    requests = retries = exhausted = 0
    for _ in range(100 * 60):  # 100 requests/s for a minute, every try fails
        s = state(clock=clock, budget=budget)
        requests += 1
        while (d := s.may_retry(Status(503))).retry:
            retries += 1
        exhausted += d.reason is RetryReason.BUDGET_EXHAUSTED
        clock.advance(0.01)
    assert retries <= 0.2 * requests + 10 * 60
    assert retries < 0.35 * requests  # instead of 2 retries per request (3x the load)
    assert exhausted > requests / 2


def test_refused_retries_do_not_spend_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(percent=0, min_per_s=0.1), clock)
    before = budget.balance()
    assert state(method="POST", clock=clock, budget=budget).may_retry(Status(503)).retry is False
    assert budget.balance() == before  # deposits add 0% here; nothing withdrawn
    assert state(clock=clock, budget=budget).may_retry(Status(503)).retry
    d = state(clock=clock, budget=budget).may_retry(Status(503))
    assert d.reason is RetryReason.BUDGET_EXHAUSTED and d.limit_reached


def test_every_request_is_deposited_into_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(), clock)
    for _ in range(7):
        state(method="POST", clock=clock, budget=budget)
    assert budget.stats().requests_in_window == 7


# -- deadlines ----------------------------------------------------------------------------


def test_the_route_timeout_wins_over_the_policy_and_grpc_timeout_may_shorten_it() -> None:
    clock = FakeClock()
    assert Deadline.start(clock).at is None
    assert Deadline.start(clock, request_timeout_s=10).remaining(clock) == 10
    d = Deadline.start(clock, route_timeout_s=2, request_timeout_s=10)
    assert d.remaining(clock) == 2
    d = Deadline.start(clock, route_timeout_s=2, grpc_timeout=b"500m")
    assert d.remaining(clock) == pytest.approx(0.5)
    d = Deadline.start(clock, route_timeout_s=2, grpc_timeout=b"1M")  # cannot lengthen it
    assert d.remaining(clock) == 2
    d = Deadline.start(clock, grpc_timeout=b"3S")
    assert d.remaining(clock) == 3
    d = Deadline.start(clock, request_timeout_s=1, grpc_timeout=b"garbage")
    assert d.remaining(clock) == 1


def test_a_deadline_runs_down_and_expires() -> None:
    clock = FakeClock()
    d = Deadline.start(clock, request_timeout_s=1.0)
    clock.advance(0.4)
    assert d.remaining(clock) == pytest.approx(0.6)
    assert not d.expired(clock)
    assert d.grpc_timeout(clock) == "600000u"
    clock.advance(0.6)
    assert d.expired(clock)
    assert d.remaining(clock) == 0
    clock.advance(5)
    assert d.remaining(clock) == 0
    assert Deadline(None).grpc_timeout(clock) is None
    assert not Deadline(None).expired(clock)


def test_the_per_try_timeout_is_capped_by_the_time_left() -> None:
    clock = FakeClock()
    deadline = Deadline.start(clock, request_timeout_s=1.0)
    s = state(RetryPolicy(per_try_timeout_s=0.3), clock=clock, deadline=deadline)
    assert s.try_timeout_s() == pytest.approx(0.3)
    clock.advance(0.8)
    assert s.try_timeout_s() == pytest.approx(0.2)
    assert state(RetryPolicy(per_try_timeout_s=0.3)).try_timeout_s() == 0.3
    assert state(clock=clock, deadline=deadline).try_timeout_s() == pytest.approx(0.2)
    assert state().try_timeout_s() is None


def test_no_retry_when_the_deadline_leaves_no_time_for_it() -> None:
    clock = FakeClock()
    deadline = Deadline.start(clock, request_timeout_s=1.0)
    s = state(clock=clock, deadline=deadline)
    assert s.may_retry(ConnectFailure()).retry
    clock.advance(1.0)
    d = s.may_retry(ConnectFailure())
    assert not d.retry and d.reason is RetryReason.DEADLINE


# -- grpc-timeout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"7u", 7e-6),
        (b"99999999n", 0.099999999),
        (b"0S", 0.0),
        ("10S", 10.0),
        (b" 5S ", 5.0),
    ],
)
def test_grpc_timeout_parses(value: bytes | str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"1",
        b"123456789S",
        b"1s",
        b"1h",
        b"-1S",
        b"1.5S",
        b"1 S",
        "\uff11S",
        None,
    ],  # a full-width digit is not a digit here
)
def test_malformed_grpc_timeouts_are_ignored(value: bytes | str | None) -> None:
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "value"),
    [
        (0.0, "0n"),
        (-1.0, "0n"),
        (5e-9, "5n"),
        (0.05, "50000000n"),
        (0.3, "300000u"),
        (1.0, "1000000u"),
        (250.0, "250000m"),
        (1e6, "1000000S"),
        (1e9, "16666667M"),
        (1e12, "99999999H"),
        (float("inf"), "99999999H"),
    ],
)
def test_grpc_timeout_encodes_in_the_finest_unit_that_fits(seconds: float, value: str) -> None:
    assert encode_grpc_timeout(seconds) == value


@settings(max_examples=500)
@given(st.floats(min_value=1e-9, max_value=3.0e11, allow_nan=False))
def test_an_encoded_grpc_timeout_parses_back_never_shorter_and_barely_longer(
    seconds: float,
) -> None:
    encoded = encode_grpc_timeout(seconds)
    parsed = parse_grpc_timeout(encoded)
    assert parsed is not None
    assert parsed >= seconds * (1 - 1e-12) - 1e-12
    assert parsed - seconds <= max(1e-9, seconds * 1e-5)


@given(st.binary(max_size=12) | st.text(max_size=12))
def test_parsing_any_grpc_timeout_never_raises(value: bytes | str) -> None:
    result = parse_grpc_timeout(value)
    assert result is None or result >= 0
