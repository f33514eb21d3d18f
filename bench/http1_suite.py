"""The HTTP/1.1 codec on the L7 hot path: parse a request and re-serialize it the way
the sidecar forwards it. A typical 400-byte GET with 10 headers on a keep-alive
connection (requests/s), the same on a fresh connection each time, a 10 KiB chunked
POST (10 chunks of 1 KiB, de-chunked and re-chunked), a 1 KiB response, and bare llhttp
on the same GET as the floor the codec's own rules are measured against.

Run alone with ``python -m bench.http1_suite [--quick]``; ``bench/__main__.py`` lists
suites by name (``"http1": "bench.http1_suite"``)."""

from __future__ import annotations

import sys
from typing import Any

import httptools

from bench.stats import rate
from sidecar.http1 import (
    PAUSED,
    BodyKind,
    Data,
    EndOfMessage,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    serialize_request,
    serialize_response,
)

GET = (  # 400 bytes, 10 header fields
    b"GET /api/v1/orders/12345?expand=items HTTP/1.1\r\n"
    b"Host: orders.shop.svc:8080\r\n"
    b"User-Agent: python-requests/2.32.3\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Authorization: Bearer 0123456789a\r\n"
    b"Cookie: session=abc\r\n"
    b"X-Request-Id: 7f3c2a9e-1d4b-4c8a-9f00-12345\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
_CHUNK = bytes(range(256)) * 4  # 1 KiB
POST = (
    b"POST /api/v1/upload HTTP/1.1\r\nHost: files.svc:8080\r\n"
    b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"400\r\n" + _CHUNK + b"\r\n" for _ in range(10))
    + b"0\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: app\r\nContent-Length: 1024\r\n\r\n" + _CHUNK
)
_FORWARDED = ((b"x-forwarded-for", b"198.18.0.7"),)


def _forward_request(parser: RequestParser, raw: bytes) -> int:
    """What the proxy does per request: parse, re-serialize head and body."""
    parser.receive_data(raw)
    out: list[bytes] = []
    chunked = False
    while (event := parser.next_event()) is not PAUSED:
        if isinstance(event, Data):
            out.append(encode_chunk(event.data) if chunked else event.data)
        elif isinstance(event, Request):
            chunked = event.body is BodyKind.CHUNKED
            out.append(serialize_request(event, add=_FORWARDED))
        elif isinstance(event, EndOfMessage):
            if chunked:
                out.append(encode_last_chunk())
        else:
            raise AssertionError(event)
    parser.start_next()
    return sum(map(len, out))


def _forward_response(raw: bytes) -> int:
    parser = ResponseParser(request_method="GET")
    parser.receive_data(raw)
    out: list[bytes] = []
    while (event := parser.next_event()) is not PAUSED:
        if isinstance(event, Response):
            out.append(serialize_response(event))
        elif isinstance(event, Data):
            out.append(event.data)
    return sum(map(len, out))


class _Bare:
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_message_complete(self) -> None: ...


def run(quick: bool) -> list[dict[str, Any]]:
    seconds = 0.5 if quick else 2.0
    keep_alive, post_conn = RequestParser(), RequestParser()
    assert len(GET) == 400 and _forward_request(RequestParser(), GET) > 0
    assert _forward_request(RequestParser(), POST) > 10 * 1024
    bare = httptools.HttpRequestParser(_Bare())

    rows: list[dict[str, Any]] = []

    def row(name: str, fn: Any, size: int) -> None:
        figures = rate(fn, seconds=seconds)
        mb_s = figures["ops_per_s"] * size / 1e6
        rows.append({"suite": "http1", "name": name, **figures, "MB_per_s": mb_s})

    row("get_400B_keepalive", lambda: _forward_request(keep_alive, GET), len(GET))
    row("get_400B_new_conn", lambda: _forward_request(RequestParser(), GET), len(GET))
    row("post_10KiB_chunked", lambda: _forward_request(post_conn, POST), len(POST))
    row("response_1KiB", lambda: _forward_response(RESPONSE), len(RESPONSE))
    row("bare_llhttp_get_400B", lambda: bare.feed_data(GET), len(GET))
    return rows


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(
            f"{r['name']:<24} {r['ops_per_s']:>10.0f}/s  p50 {r['p50_us']:6.1f} us"
            f"  p99 {r['p99_us']:6.1f} us  {r['MB_per_s']:7.1f} MB/s"
        )
