"""sidecar.h2_headers: reading request heads, rewriting header lists, the proxy's replies."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.h2_headers import (
    RequestHead,
    forwarded,
    grpc_message,
    grpc_status_of,
    is_grpc,
    local_reply,
    status_of,
    with_fields,
)

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/shop.Orders/Get?x=1"),
    (b":authority", b"orders:8080"),
    (b"content-type", b"application/grpc+proto"),
    (b"te", b"trailers"),
    (b"x-a", b"1"),
    (b"x-a", b"2"),
]


def test_a_request_head_gives_its_pseudo_headers_and_joins_repeated_fields() -> None:
    head = RequestHead.parse(GRPC_REQUEST)
    assert (head.method, head.path, head.authority) == (
        "POST",
        "/shop.Orders/Get?x=1",
        "orders:8080",
    )
    assert head.grpc
    assert head.lookup[b"x-a"] == b"1, 2" and head.lookup[b":scheme"] == b"http"
    plain = RequestHead.parse([(b":method", b"GET"), (b":path", b"/")])
    assert not plain.grpc and plain.authority is None


def test_grpc_content_types() -> None:
    for ct in (b"application/grpc", b"application/grpc+proto", b"application/grpc;charset=x"):
        assert is_grpc(ct)
    for ct in (None, b"application/json", b"text/grpc"):
        assert not is_grpc(ct)


def test_forwarded_drops_names_keeps_order_and_appends_after_everything() -> None:
    out = forwarded(GRPC_REQUEST, frozenset({b"x-a", b"te"}), [(b"traceparent", b"00-x")])
    assert out == [*GRPC_REQUEST[:5], (b"traceparent", b"00-x")]
    assert [n for n, _ in out[:4]] == [b":method", b":scheme", b":path", b":authority"]


def test_with_fields_replaces_fields_of_the_same_name() -> None:
    head = [(b":status", b"200"), (b"x-meshlet-attempts", b"9"), (b"x-b", b"1")]
    out = with_fields(head, [(b"x-meshlet-attempts", b"2")])
    assert out == [(b":status", b"200"), (b"x-b", b"1"), (b"x-meshlet-attempts", b"2")]


def test_status_and_grpc_status() -> None:
    assert status_of([(b":status", b"503")]) == 503
    assert status_of([(b"x", b"1")]) == 0 and status_of([(b":status", b"5x")]) == 0
    assert grpc_status_of([(b"grpc-status", b"14"), (b"grpc-message", b"m")]) == 14
    assert grpc_status_of([(b"grpc-status", b"x")]) is None
    assert grpc_status_of(None) is None and grpc_status_of([]) is None


def test_a_grpc_local_reply_is_trailers_only_with_the_mapped_status() -> None:
    for status, code in ((503, b"14"), (502, b"14"), (504, b"4"), (404, b"12"), (418, b"2")):
        head, body = local_reply(status, "why", grpc=True, fields=[(b"x-f", b"v")])
        assert body is None
        assert head[:2] == [(b":status", b"200"), (b"content-type", b"application/grpc")]
        assert dict(head)[b"grpc-status"] == code and dict(head)[b"grpc-message"] == b"why"
        assert head[-1] == (b"x-f", b"v")


def test_a_plain_local_reply_has_the_status_and_a_text_body() -> None:
    head, body = local_reply(503, "no healthy endpoint", grpc=False)
    assert body == b"no healthy endpoint\n"
    assert dict(head) == {
        b":status": b"503",
        b"content-type": b"text/plain; charset=utf-8",
        b"content-length": b"20",
    }
    assert local_reply(404, "no route", grpc=False, head_only=True)[1] is None


@settings(deadline=None)  # a shared, busy machine must not fail it
@given(st.text(max_size=300))
def test_grpc_message_is_printable_ascii_and_decodes_back(text: str) -> None:
    encoded = grpc_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert unquote_to_bytes(encoded.decode()) == text.encode("utf-8", "replace")[:1024]
