"""The HTTP/2 abuse accounting (sidecar.h2_limits) on a paused clock, driven by hypothesis,
and the h2 internals sidecar.h2conn leans on, pinned so that an h2 upgrade that moves them
fails here rather than silently disabling a limit. No sockets, no event loop."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.exceptions
import hpack
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.errors import InputError
from sidecar.h2_limits import (
    Flood,
    FloodGuard,
    H2Limits,
    SlidingCount,
    header_list_size,
    header_problem,
)
from sidecar.h2_wire import _GracefulStateMachine, _LocalSettings, new_h2

LIMITS = H2Limits()
# Event times in milliseconds (integers keep the model exact), sorted by the tests.
times_ms = st.lists(st.integers(min_value=0, max_value=5_000), max_size=300)


def exact(times: list[float], lo: float, hi: float, *, closed_lo: bool) -> int:
    return sum(1 for t in times if (lo <= t if closed_lo else lo < t) and t <= hi)


@settings(max_examples=300)
@given(times=times_ms, probe_ms=st.integers(min_value=0, max_value=6_000))
def test_sliding_count_covers_between_window_minus_a_slot_and_the_window(
    times: list[int], probe_ms: int
) -> None:
    window, slots = 1.0, 10
    counter = SlidingCount(window, slots=slots)
    seen: list[float] = []
    for t in sorted(times):
        counter.add(t / 1000)
        seen.append(t / 1000)
    now = max([probe_ms / 1000, *seen])
    got = counter.count(now)
    slot = window / slots
    assert exact(seen, now - window + slot, now, closed_lo=True) <= got
    assert got <= exact(seen, now - window, now, closed_lo=False)


@given(times=times_ms)
def test_add_returns_the_count_including_the_event(times: list[int]) -> None:
    counter = SlidingCount(1.0)
    for t in sorted(times):
        after = counter.add(t / 1000)
        assert after == counter.count(t / 1000) >= 1


def test_time_going_backwards_counts_as_the_latest_time() -> None:
    counter = SlidingCount(1.0)
    counter.add(10.0)
    assert counter.add(3.0) == 2  # not a bucket from the past overwriting a newer one
    assert counter.count(10.95) == 2
    assert counter.count(12.0) == 0


def test_memory_is_fixed_whatever_the_traffic() -> None:
    counter = SlidingCount(1.0, slots=10)
    for i in range(100_000):
        counter.add(i / 1000)
    assert len(counter._ids) == len(counter._counts) == 10


# -- rapid reset ---------------------------------------------------------------------------

schedule = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3_000), st.booleans()), max_size=1_200
)


def drive(guard: FloodGuard, events: list[tuple[int, bool]]) -> Flood | None:
    """Each event opens a stream at t ms; True: the peer also resets it."""
    for t, reset in sorted(events):
        if (flood := guard.stream_opened(t / 1000)) is not None:
            return flood
        if reset and (flood := guard.stream_reset(t / 1000)) is not None:
            return flood
    return None


@settings(max_examples=200)
@given(events=schedule)
def test_rapid_reset_never_trips_below_the_minimum_of_resets(
    events: list[tuple[int, bool]],
) -> None:
    small = H2Limits(rapid_reset_min_streams=100)
    resets = sum(1 for _, r in events if r)
    if resets < small.rapid_reset_ratio * small.rapid_reset_min_streams:
        assert drive(FloodGuard(small), events) is None


@settings(max_examples=100)
@given(
    n=st.integers(min_value=500, max_value=1_200),
    start_ms=st.integers(min_value=0, max_value=10_000),
    span_ms=st.integers(min_value=0, max_value=800),
)
def test_a_burst_of_reset_streams_trips(n: int, start_ms: int, span_ms: int) -> None:
    events = [(start_ms + span_ms * i // n, True) for i in range(n)]
    assert drive(FloodGuard(LIMITS), events) is Flood.RAPID_RESET


@settings(max_examples=10)
@given(ratio_pct=st.integers(min_value=0, max_value=45))
def test_streams_mostly_completed_never_trip(ratio_pct: int) -> None:
    # 2000 streams/s for 5 s, ratio_pct% of them reset by the client: busy, not an attack.
    events = [(i // 2, (i * 7919) % 100 < ratio_pct) for i in range(10_000)]
    assert drive(FloodGuard(LIMITS), events) is None


def test_resets_below_the_stream_rate_minimum_never_trip() -> None:
    # 400 streams/s, every one reset, for 10 s: under 500 streams in any second.
    events = [(i * 1000 // 400, True) for i in range(4_000)]
    assert drive(FloodGuard(LIMITS), events) is None


def test_the_threshold_is_half_of_five_hundred() -> None:
    guard = FloodGuard(LIMITS)
    for _ in range(499):
        assert guard.stream_opened(0.5) is None
    for _ in range(249):
        assert guard.stream_reset(0.5) is None
    assert guard.stream_opened(0.5) is None  # 500 opened, 249 reset
    assert guard.stream_reset(0.5) is Flood.RAPID_RESET  # 250 of 500


# -- frame-rate floods -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "limit", "flood"),
    [
        ("settings", LIMITS.max_settings_per_s, Flood.SETTINGS),
        ("ping", LIMITS.max_pings_per_s, Flood.PING),
        ("empty_frame", LIMITS.max_empty_frames_per_s, Flood.EMPTY_FRAMES),
    ],
)
def test_frame_rates_trip_just_above_the_limit(method: str, limit: int, flood: Flood) -> None:
    guard = FloodGuard(LIMITS)
    record = getattr(guard, method)
    for _ in range(limit):
        assert record(7.0) is None
    assert record(7.0) is flood


@given(per_s=st.integers(min_value=1, max_value=90), seconds=st.integers(min_value=1, max_value=5))
def test_a_steady_rate_under_the_limit_never_trips(per_s: int, seconds: int) -> None:
    guard = FloodGuard(LIMITS)
    for i in range(per_s * seconds):
        t = i / per_s
        assert guard.ping(t) is None
        assert guard.settings(t) is None


def test_backlog_and_header_block_caps() -> None:
    guard = FloodGuard(LIMITS)
    assert guard.backlog(LIMITS.max_outbound_backlog) is None
    assert guard.backlog(LIMITS.max_outbound_backlog + 1) is Flood.BACKLOG
    assert guard.header_block(LIMITS.max_continuation_frames, 1000) is None
    assert guard.header_block(LIMITS.max_continuation_frames + 1, 1000) is Flood.HEADER_BLOCK
    assert guard.header_block(1, LIMITS.max_header_block_bytes + 1) is Flood.HEADER_BLOCK


# -- header lists ----------------------------------------------------------------------------

header = st.tuples(st.binary(max_size=40), st.binary(max_size=200))


@given(headers=st.lists(header, max_size=150))
def test_header_problem_matches_count_and_rfc7541_size(headers: list[tuple[bytes, bytes]]) -> None:
    size = sum(len(n) + len(v) + 32 for n, v in headers)
    assert header_list_size(headers) == size
    problem = header_problem(headers, LIMITS)
    too_many = len(headers) > LIMITS.max_header_count
    too_big = size > LIMITS.max_header_list_size
    assert (problem is not None) == (too_many or too_big)
    if too_many:
        assert problem is not None and "header fields" in problem


def test_header_size_limit_boundary() -> None:
    name = b"x-big"
    exact_fit = [(name, b"v" * (LIMITS.max_header_list_size - 32 - len(name)))]
    assert header_problem(exact_fit, LIMITS) is None
    assert header_problem([(name, exact_fit[0][1] + b"v")], LIMITS) is not None
    assert header_problem([(b"h", b"")] * 100, LIMITS) is None
    assert header_problem([(b"h", b"")] * 101, LIMITS) is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"max_concurrent_streams": 0},
        {"max_concurrent_streams": 2000},  # above hard_max_concurrent_streams
        {"connection_window_size": 1000},
        {"max_frame_size": 1000},
        {"max_header_list_size": 200 * 1024},  # above max_decoded_header_bytes
        {"rapid_reset_ratio": 0.0},
        {"max_pings_per_s": 0},
        {"ping_interval_s": 0.0},
        {"closed_streams_remembered": 100},  # below 4 x max_concurrent_streams
    ],
)
def test_limits_refuse_values_that_cannot_work(bad: dict[str, object]) -> None:
    with pytest.raises(InputError, match="HTTP/2 limits"):
        H2Limits(**bad)  # type: ignore[arg-type]


# -- the h2 internals sidecar.h2conn relies on ---------------------------------------------


def test_h2_frame_buffer_keeps_an_unfinished_header_block_where_h2conn_looks() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
    first = HeadersFrame(1, data=block[:3]).serialize()  # no END_HEADERS
    more = ContinuationFrame(1, data=block[3:5]).serialize()
    conn.receive_data(preface + first + more + b"\x00\x00")  # and a partial frame header
    buf = conn.incoming_buffer
    assert [type(f) for f in buf._headers_buffer] == [HeadersFrame, ContinuationFrame]
    assert len(buf._data) == 2


def test_graceful_state_machine_lets_frames_flow_after_a_goaway() -> None:
    machine = _GracefulStateMachine()
    inputs = h2.connection.ConnectionInputs
    machine.process_input(inputs.RECV_HEADERS)
    machine.process_input(inputs.SEND_GOAWAY)
    for i in (inputs.SEND_DATA, inputs.RECV_DATA, inputs.SEND_HEADERS, inputs.RECV_RST_STREAM):
        machine.process_input(i)  # plain h2 raises ProtocolError here (python-hyper/h2#1181)
    # Why the subclass exists: plain h2 stops all traffic once a GOAWAY went out. If an h2
    # release fixes that, this fails and the workaround can go.
    plain = h2.connection.H2ConnectionStateMachine()
    plain.process_input(inputs.RECV_HEADERS)
    plain.process_input(inputs.SEND_GOAWAY)
    with pytest.raises(h2.exceptions.ProtocolError):
        plain.process_input(inputs.SEND_DATA)


def test_local_settings_advertise_the_limit_but_let_h2_tolerate_the_hard_cap() -> None:
    ls = _LocalSettings(client=False, values={SettingCodes.MAX_CONCURRENT_STREAMS: 100}, hard=1000)
    assert dict(ls.items())[SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert ls.max_concurrent_streams == 1000


def test_h2_remembers_a_bounded_number_of_closed_streams() -> None:
    h = new_h2(client=False, limits=LIMITS)
    closed: Any = h._closed_streams  # h2's SizeLimitDict
    assert closed._size_limit == LIMITS.closed_streams_remembered == 4096
    assert h.decoder.max_header_list_size == LIMITS.max_decoded_header_bytes
    assert h.max_inbound_frame_size == LIMITS.max_frame_size
