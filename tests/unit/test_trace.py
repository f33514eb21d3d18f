"""Request identity headers: x-request-id kept or made, W3C traceparent continued with a
new span per hop (or started), tracestate carried, x-forwarded-for appended."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.trace import (
    REQUEST_ID,
    SAMPLED,
    Traceparent,
    ensure_request_id,
    next_hop,
    tracestate_to_forward,
    x_forwarded_for,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"

hex_ids = st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: f"{n:032x}")
span_ids = st.integers(min_value=1, max_value=2**64 - 1).map(lambda n: f"{n:016x}")


# -- x-request-id -------------------------------------------------------------------------


def test_an_incoming_request_id_is_kept() -> None:
    value, added = ensure_request_id({REQUEST_ID: b"abc-123"}, random.Random(0))
    assert (value, added) == (b"abc-123", False)


def test_a_missing_request_id_is_a_uuid4_from_the_injected_rng() -> None:
    a, added = ensure_request_id({}, random.Random(5))
    b, _ = ensure_request_id({}, random.Random(5))
    c, _ = ensure_request_id({}, random.Random(6))
    assert added and a == b != c
    parsed = uuid.UUID(a.decode())
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert str(parsed) == a.decode()


@pytest.mark.parametrize("bad", [b"", b"has space", b"x" * 201, b"tab\there", "é".encode()])
def test_an_unusable_request_id_is_replaced(bad: bytes) -> None:
    value, added = ensure_request_id({REQUEST_ID: bad}, random.Random(0))
    assert added and value != bad and uuid.UUID(value.decode()).version == 4


# -- traceparent --------------------------------------------------------------------------


def test_parse_the_spec_example() -> None:
    tp = Traceparent.parse(VALID)
    assert tp == Traceparent(TRACE, SPAN, 1)
    assert tp.sampled
    assert Traceparent.parse(VALID.encode()) == tp
    assert Traceparent.parse(f" {VALID}\t") == tp  # optional whitespace around it
    assert not Traceparent.parse(f"00-{TRACE}-{SPAN}-00").sampled  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00",
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is invalid
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01",
        f"0-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0g",
        f"cc-{TRACE}-{SPAN}-01x",  # a future version: after 55 chars must come "-"
    ],
)
def test_invalid_traceparents_are_none(value: str | None) -> None:
    assert Traceparent.parse(value) is None


def test_a_future_version_is_read_by_the_version_00_rules() -> None:
    assert Traceparent.parse(f"cc-{TRACE}-{SPAN}-01") == Traceparent(TRACE, SPAN, 1)
    tp = Traceparent.parse(f"cc-{TRACE}-{SPAN}-09-what-the-future-holds")
    assert tp == Traceparent(TRACE, SPAN, 1)  # only the sampled bit of unknown flags
    assert Traceparent.parse(f"cc-{TRACE}-{SPAN}-08") == Traceparent(TRACE, SPAN, 0)


def test_format_is_version_00_with_only_the_sampled_flag() -> None:
    assert Traceparent(TRACE, SPAN, 1).format() == VALID.encode()
    assert Traceparent(TRACE, SPAN, 0xFF).format() == VALID.encode()
    assert Traceparent(TRACE, SPAN, 0).format() == f"00-{TRACE}-{SPAN}-00".encode()
    assert str(Traceparent(TRACE, SPAN)) == VALID


def test_a_traceparent_cannot_be_built_invalid() -> None:
    for args in [("0" * 32, SPAN, 1), (TRACE, "0" * 16, 1), (TRACE.upper(), SPAN, 1)]:
        with pytest.raises(ValueError, match="trace context"):
            Traceparent(*args)
    with pytest.raises(ValueError):
        Traceparent(TRACE, SPAN, 256)


@given(hex_ids, span_ids, st.integers(min_value=0, max_value=255))
def test_parse_reads_back_what_format_writes(trace: str, span: str, flags: int) -> None:
    tp = Traceparent(trace, span, flags)
    assert Traceparent.parse(tp.format()) == Traceparent(trace, span, flags & SAMPLED)
    assert Traceparent.parse(f"00-{trace}-{span}-{flags:02x}") == tp


@given(st.binary(max_size=80) | st.text(max_size=80))
def test_parsing_anything_never_raises(value: bytes | str) -> None:
    tp = Traceparent.parse(value)
    if tp is not None:
        assert Traceparent.parse(tp.format()) is not None


@given(hex_ids, span_ids, st.sampled_from("0123456789abcdef"), st.text(max_size=20))
def test_any_valid_looking_future_version_with_a_suffix_is_continued(
    trace: str, span: str, digit: str, suffix: str
) -> None:
    version = f"1{digit}"
    tp = Traceparent.parse(f"{version}-{trace}-{span}-01-{suffix}")
    assert tp == Traceparent(trace, span, 1)


# -- the next hop -------------------------------------------------------------------------


def test_a_trace_is_continued_with_a_new_span_id_for_this_hop() -> None:
    incoming = Traceparent(TRACE, SPAN, 1)
    rng = random.Random(1)
    hops = [next_hop(incoming, rng) for _ in range(100)]
    assert {h.trace_id for h in hops} == {TRACE}
    assert len({h.parent_id for h in hops} | {SPAN}) == 101
    assert all(h.sampled for h in hops)


def test_an_unsampled_trace_stays_unsampled() -> None:
    hop = next_hop(Traceparent(TRACE, SPAN, 0), random.Random(2))
    assert not hop.sampled and hop.format().endswith(b"-00")


def test_without_a_valid_traceparent_a_new_sampled_trace_starts() -> None:
    a = next_hop(Traceparent.parse("garbage"), random.Random(3))
    b = next_hop(None, random.Random(3))
    c = next_hop(None, random.Random(4))
    assert a == b and a.trace_id != c.trace_id
    assert a.sampled
    assert Traceparent.parse(a.format()) == a


def test_tracestate_is_carried_only_while_its_trace_continues() -> None:
    state = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert tracestate_to_forward(Traceparent(TRACE, SPAN), state) is state
    assert tracestate_to_forward(None, state) is None
    assert tracestate_to_forward(Traceparent(TRACE, SPAN), None) is None


# -- x-forwarded-for ----------------------------------------------------------------------


def test_x_forwarded_for_appends_the_client() -> None:
    assert x_forwarded_for(None, "127.0.0.1") == b"127.0.0.1"
    assert x_forwarded_for(b"", "127.0.0.1") == b"127.0.0.1"
    assert x_forwarded_for(b"198.18.0.1", "127.0.0.1") == b"198.18.0.1, 127.0.0.1"
    assert x_forwarded_for(b"198.18.0.1, 198.18.0.2 ", "::1") == b"198.18.0.1, 198.18.0.2, ::1"


def test_request_ids_and_trace_ids_are_what_uuid_and_the_validating_constructor_give() -> None:
    for seed in range(300):
        got, _ = ensure_request_id({}, random.Random(seed))
        want = uuid.UUID(int=random.Random(seed).getrandbits(128), version=4)
        assert got == str(want).encode()
        hop = next_hop(Traceparent(TRACE, SPAN, seed % 2), random.Random(seed))
        again = Traceparent(hop.trace_id, hop.parent_id, hop.flags)  # validates
        assert hop == again and hash(hop) == hash(again) and hop.format() == again.format()
