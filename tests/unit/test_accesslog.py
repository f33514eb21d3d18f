"""The access log line: valid JSON on one line, Envoy's field names in a fixed order,
meshlet's identity/attempts/trace fields after them, nulls for what did not happen."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random

import orjson
import pytest

from sidecar.accesslog import (
    ENVOY_FIELDS,
    FIELDS,
    MESHLET_FIELDS,
    AccessLogEntry,
    Direction,
    ResponseFlag,
    format_flags,
    format_start_time,
    render,
)

START = dt.datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=dt.UTC)
ENVOY_DEFAULT_JSON_FIELDS = {  # REFERENCE.md, "Envoy access log fields"
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
}


def full_entry(**changes: object) -> AccessLogEntry:
    entry = AccessLogEntry(
        start_time=START,
        method="GET",
        path="/orders/7?expand=items",
        protocol="HTTP/1.1",
        response_code=200,
        bytes_received=0,
        bytes_sent=512,
        duration=12,
        upstream_service_time=9,
        x_forwarded_for="198.18.0.1",
        user_agent="curl/8.5.0",
        request_id="0b4e7c1e-7f4c-4b8e-9a59-3e1f6a2b9c10",
        authority="orders:8080",
        upstream_host="198.19.1.7:15006",
        direction=Direction.OUTBOUND,
        source_identity="spiffe://meshlet.local/ns/shop/sa/web",
        destination_identity="spiffe://meshlet.local/ns/shop/sa/orders",
        attempts=1,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        route="default",
        service="shop/orders",
    )
    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]


def test_one_line_of_valid_json_with_every_envoy_field_in_a_fixed_order() -> None:
    line = render(full_entry())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert set(record) >= ENVOY_DEFAULT_JSON_FIELDS
    assert tuple(record) == FIELDS == ENVOY_FIELDS + MESHLET_FIELDS
    assert record == {
        "start_time": "2030-01-02T03:04:05.678Z",
        "method": "GET",
        "path": "/orders/7?expand=items",
        "protocol": "HTTP/1.1",
        "response_code": 200,
        "response_flags": "-",
        "bytes_received": 0,
        "bytes_sent": 512,
        "duration": 12,
        "upstream_service_time": 9,
        "x_forwarded_for": "198.18.0.1",
        "user_agent": "curl/8.5.0",
        "request_id": "0b4e7c1e-7f4c-4b8e-9a59-3e1f6a2b9c10",
        "authority": "orders:8080",
        "upstream_host": "198.19.1.7:15006",
        "direction": "outbound",
        "source_identity": "spiffe://meshlet.local/ns/shop/sa/web",
        "destination_identity": "spiffe://meshlet.local/ns/shop/sa/orders",
        "attempts": 1,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "route": "default",
        "service": "shop/orders",
        "grpc_status": None,
    }


def test_the_entry_fields_are_the_rendered_fields_in_the_same_order() -> None:
    assert tuple(f.name for f in dataclasses.fields(AccessLogEntry)) == FIELDS


def test_what_did_not_happen_is_null_and_no_flags_is_a_dash() -> None:
    entry = AccessLogEntry(
        start_time=START,
        method="GET",
        path="/nowhere",
        protocol="HTTP/2",
        response_code=404,
        response_flags=(ResponseFlag.NO_ROUTE_FOUND,),
    )
    record = orjson.loads(render(entry))
    assert tuple(record) == FIELDS
    assert record["response_flags"] == "NR"
    assert record["attempts"] == 0
    for name in ("upstream_service_time", "upstream_host", "user_agent", "trace_id", "route"):
        assert record[name] is None
    assert orjson.loads(render(full_entry()))["response_flags"] == "-"


def test_several_flags_are_joined_in_envoys_style_and_a_stable_order() -> None:
    flags = (ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
    assert format_flags(flags) == "UF,URX"
    assert format_flags((*flags, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)) == "UF,URX"
    assert format_flags(()) == "-"
    assert {f.value for f in ResponseFlag} == {
        "UH", "UF", "UO", "NR", "URX", "UT", "LR", "UC", "DC", "DPE", "UPE"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (dt.datetime(2030, 1, 1, tzinfo=dt.UTC), "2030-01-01T00:00:00.000Z"),
        (dt.datetime(2030, 1, 1, 0, 0, 0, 999_999, tzinfo=dt.UTC), "2030-01-01T00:00:00.999Z"),
        (
            dt.datetime(2030, 1, 1, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2030-01-01T00:00:00.000Z",
        ),
        (dt.datetime(2030, 6, 30, 23, 59, 59, 1_000), "2030-06-30T23:59:59.001Z"),  # naive: UTC
    ],
)
def test_start_time_is_rfc3339_utc_with_milliseconds(when: dt.datetime, text: str) -> None:
    assert format_start_time(when) == text


def test_hostile_header_values_stay_inside_their_json_string() -> None:
    nasty = 'a"b\\c\nd\r\x00{"x":1}\u2028é'
    record = json.loads(render(full_entry(user_agent=nasty, path="/\n", authority="\x7f")))
    assert record["user_agent"] == nasty
    assert record["path"] == "/\n"


def test_a_string_that_is_not_valid_unicode_still_gives_a_line() -> None:
    broken = b"bad\xffbytes".decode("utf-8", "surrogateescape")
    line = render(full_entry(user_agent=broken))
    record = json.loads(line)
    assert record["user_agent"].startswith("bad") and record["method"] == "GET"


def test_render_is_cheap_enough_for_every_request() -> None:
    """Ten thousand varied lines: each valid and complete (a bench harness times this)."""
    rng = random.Random(0)
    flags = list(ResponseFlag)
    total = 0
    for n in range(10_000):
        entry = full_entry(
            response_code=rng.choice((200, 404, 503, 504)),
            response_flags=tuple(rng.sample(flags, rng.randint(0, 2))),
            duration=rng.randint(0, 5000),
            attempts=rng.randint(0, 3),
            request_id=f"req-{n}",
        )
        line = render(entry)
        total += len(line)
        if n % 1000 == 0:
            assert tuple(orjson.loads(line)) == FIELDS
    assert 400 * 10_000 < total < 1000 * 10_000  # a line is a few hundred bytes
