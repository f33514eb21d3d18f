"""Request smuggling and bad input against the downstream parser, as a backend sees it.

Each case is raw client bytes. They go through ``RequestParser`` the way the proxy uses
it (whole, and one byte at a time); what a backend would receive is the re-serialized
head plus body of every request that parsed *completely* before the end or an error.
For every case: the expected ``HttpError`` status (or none), nothing of a refused
message released, and a backend stream that a fresh strict parser *and* bare llhttp
both read as zero or exactly one well-formed request, so no second request can hide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http1 import (
    NEED_DATA,
    PAUSED,
    BodyKind,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HttpError,
    Request,
    RequestParser,
    Trailers,
    encode_chunk,
    encode_last_chunk,
    serialize_request,
)

H = b"Host: svc\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    status: int | None  # the HttpError expected; None: accepted (normalized)
    forwarded: int = 0  # complete requests the backend receives: 0 or 1
    stage: str = "head"  # where the refusal happens: "head", "body" or "eof" (cut short)
    check: dict[str, Any] = field(default_factory=dict)  # of the forwarded request


def post(*fields: bytes, body: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\n" + H + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked", body=body)


def get(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n"

CASES = [
    # -- CL.TE / TE.CL: two framings in one message --------------------------------
    Case("cl_te", post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\nG"), 400),
    Case("te_cl", post(b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"5c\r\nGPOST"), 400),
    Case("te_cl_zero", post(b"Transfer-Encoding: chunked", b"Content-Length: 0", body=b"0\r\n\r\n"), 400),
    Case("cl_te_hidden_get", post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED), 400),
    # -- TE.TE: an obfuscated Transfer-Encoding one hop may not recognise ----------
    Case("te_te_two_headers", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=b"0\r\n\r\n"), 400),
    Case("te_chunked_identity", post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"), 400),
    Case("te_xchunked", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), 400),
    Case("te_chunked_twice", post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), 400),
    Case("te_quoted", post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"), 400),
    Case("te_trailing_comma", post(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n"), 400),
    Case("te_space_before_colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), 400),
    Case("te_obs_fold", post(b"Transfer-Encoding:\r\n chunked", body=b"0\r\n\r\n"), 400),
    Case("te_vertical_tab", post(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"), 400),
    Case("te_nul", post(b"Transfer-Encoding: chunked\x00", body=b"0\r\n\r\n"), 400),
    Case("te_underscore_name", post(b"Transfer_Encoding: chunked", body=b"0\r\n\r\n"), 400),
    Case("te_gzip_chunked", post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
    Case("te_in_http10", get(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0") + b"0\r\n\r\n", 400),
    # -- Content-Length tricks ------------------------------------------------------
    Case("cl_duplicate_equal", post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    Case("cl_duplicate_different", post(b"Content-Length: 5", b"Content-Length: 40", body=b"hello"), 400),
    Case("cl_list", post(b"Content-Length: 5, 5", body=b"hello"), 400),
    Case("cl_plus_sign", post(b"Content-Length: +5", body=b"hello"), 400),
    Case("cl_negative", post(b"Content-Length: -1", body=b"hello"), 400),
    Case("cl_hex", post(b"Content-Length: 0x5", body=b"hello"), 400),
    Case("cl_inner_space", post(b"Content-Length: 1 0", body=b"hello"), 400),
    Case("cl_overflow", post(b"Content-Length: 18446744073709551621", body=b"hello"), 400),
    Case("cl_empty", post(b"Content-Length:", body=b"hello"), 400),
    Case("cl_underscore_name", post(b"Content_Length: 5", body=b"hello"), 400),
    Case("cl_body_cut_short", post(b"Content-Length: 50", body=b"hello"), 400, stage="eof"),
    # -- chunk-size tricks ----------------------------------------------------------
    Case("chunk_0x_prefix", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_underscore", chunked(b"0_5\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_overflow", chunked(b"1" + b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_trailing_garbage", chunked(b"5g\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_space_after_size", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_ext_bare_cr", chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_ext_bare_lf", chunked(b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_ext_no_name", chunked(b"5;=x\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_ext_too_long", chunked(b"5;a=" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_size_bare_lf", chunked(b"5\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_data_no_crlf", chunked(b"5\r\nhello0\r\n\r\n"), 400, stage="body"),
    Case("chunk_data_longer", chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_data_bare_lf", chunked(b"5\r\nhello\n0\r\n\r\n"), 400, stage="body"),
    Case("chunk_second_bad", chunked(b"5\r\nhello\r\nz\r\n" + SMUGGLED), 400, stage="body"),
    Case("chunk_request_in_trailers", chunked(b"0\r\n" + SMUGGLED), 400, stage="body"),
    Case("chunk_cl_in_trailers", chunked(b"0\r\nContent-Length: 40\r\n\r\n"), 400, stage="body"),
    # -- the shape of the head --------------------------------------------------------
    Case("obs_fold", get(H.strip(), b"X-A: 1", b" folded"), 400),
    Case("bare_lf_lines", b"GET / HTTP/1.1\nHost: svc\n\n" + SMUGGLED, 400),
    Case("bare_lf_one_line", b"GET / HTTP/1.1\r\nHost: svc\nX: 1\r\n\r\n", 400),
    Case("bare_cr_line_end", b"GET / HTTP/1.1\r\nHost: svc\rX: 1\r\n\r\n", 400),
    Case("bare_cr_in_value", get(H.strip(), b"X: a\rb"), 400),
    Case("nul_in_value", get(H.strip(), b"X: a\x00b"), 400),
    Case("nul_in_name", get(H.strip(), b"X\x00Y: 1"), 400),
    Case("del_in_value", get(H.strip(), b"X: a\x7fb"), 400),
    Case("space_before_colon", get(b"Host : svc"), 400),
    Case("tab_before_colon", get(H.strip(), b"X-A\t: 1"), 400),
    Case("invalid_name_char", get(H.strip(), b"X(A): 1"), 400),
    Case("first_field_indented", get(b" Host: svc"), 400),
    # -- Host -------------------------------------------------------------------------
    Case("host_duplicate", get(H.strip(), b"Host: admin"), 400),
    Case("host_missing_http11", get(b"X: 1"), 400),
    Case("host_comma", get(b"Host: svc,admin"), 400),
    Case("host_inner_space", get(b"Host: svc admin"), 400),
    Case("host_with_path", get(b"Host: svc/admin"), 400),
    Case("host_empty", get(b"Host:"), 400),
    Case("host_missing_absolute_form", get(line=b"GET http://svc/ HTTP/1.1"), 400),
    # -- the request line ---------------------------------------------------------------
    Case("line_double_space", get(H.strip(), line=b"GET  / HTTP/1.1"), 400),
    Case("line_trailing_space", get(H.strip(), line=b"GET / HTTP/1.1 "), 400),
    Case("line_tls_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", 400),
    Case("line_lowercase_method", get(H.strip(), line=b"get / HTTP/1.1"), 501),
    Case("line_http09", b"GET /\r\n\r\n", 505),
    Case("line_http09_bare_lf_headers", b"GET /x\nHost: svc\r\nContent-Length: 5\r\n\r\nhello", 505),
    Case("line_bare_lf_then_crlf_fields", b"GET /x HTTP/1.1\nHost: svc\r\n\r\n", 400),
    Case("line_http20", get(H.strip(), line=b"GET / HTTP/2.0"), 505),
    Case("line_http12", get(H.strip(), line=b"GET / HTTP/1.2"), 505),
    Case("line_h2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    Case("line_rtsp_version", get(H.strip(), line=b"GET / RTSP/1.0"), 400),
    Case("target_fragment", get(H.strip(), line=b"GET /a#b HTTP/1.1"), 400),
    Case("target_userinfo", get(H.strip(), line=b"GET http://u:p@svc/ HTTP/1.1"), 400),
    Case("target_relative", get(H.strip(), line=b"GET admin HTTP/1.1"), 400),
    Case("target_star_not_options", get(H.strip(), line=b"GET * HTTP/1.1"), 400),
    Case("target_other_scheme", get(H.strip(), line=b"GET ftp://svc/ HTTP/1.1"), 400),
    Case("connect_method", get(H.strip(), line=b"CONNECT svc:443 HTTP/1.1") + b"tunnel", 501),
    # -- Connection, Upgrade, Expect ----------------------------------------------------
    Case("connection_drops_host", get(H.strip(), b"Connection: host"), 400),
    Case("connection_drops_cl", post(b"Connection: content-length", b"Content-Length: 5", body=b"hello"), 400),
    Case("upgrade_with_cl_body", get(H.strip(), b"Connection: upgrade", b"Upgrade: websocket", b"Content-Length: 35") + SMUGGLED, 400),
    Case("upgrade_with_chunked_body", get(H.strip(), b"Connection: upgrade", b"Upgrade: websocket", b"Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    Case("upgrade_in_http10", get(H.strip(), b"Connection: upgrade", b"Upgrade: websocket", line=b"GET / HTTP/1.0"), 400),
    Case("expect_unknown", post(b"Expect: 200-ok", b"Content-Length: 0"), 417),
    # -- limits ---------------------------------------------------------------------------
    Case("headers_101", get(H.strip(), *[b"X-%d: 1" % i for i in range(100)]), 431),
    Case("head_over_60k", get(H.strip(), b"X: " + b"a" * 61440), 431),
    Case("trailers_101", chunked(b"0\r\n" + b"X: 1\r\n" * 101 + b"\r\n"), 431, stage="body"),
    Case("leading_crlf_flood", b"\r\n" * 30721 + get(H.strip()), 431),
    # -- one valid request first: exactly one reaches the backend -----------------------
    Case("pipelined_then_cl_te", get(H.strip()) + post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400, forwarded=1),
    Case("pipelined_then_bare_lf", get(H.strip()) + b"GET /admin HTTP/1.1\nHost: svc\n\n", 400, forwarded=1),
    Case("pipelined_then_bad_chunk", get(H.strip()) + chunked(b"5\r\nhello\r\n0x0\r\n\r\n"), 400, forwarded=1, stage="body"),
    Case("close_then_smuggled", get(H.strip(), b"Connection: close") + SMUGGLED, None, forwarded=1),
    # -- accepted, normalized so that both hops read one and the same request -----------
    Case("get_body_hides_request", get(H.strip(), b"Content-Length: %d" % len(SMUGGLED)) + SMUGGLED, None, forwarded=1, check={"target": "/", "body": SMUGGLED}),
    Case("absolute_form_other_host", get(b"Host: admin", line=b"GET http://svc/x HTTP/1.1"), None, forwarded=1, check={"target": "/x", "host": b"svc"}),
    Case("h2c_upgrade_dropped", get(H.strip(), b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"), None, forwarded=1, check={"upgrade": None}),
    Case("connection_named_field_dropped", get(H.strip(), b"Connection: X-Internal", b"X-Internal: admin"), None, forwarded=1, check={"headers": ((b"host", b"svc"),)}),
    Case("te_mixed_case", post(b"Transfer-Encoding: ChUnKeD", body=b"5\r\nhello\r\n0\r\n\r\n"), None, forwarded=1, check={"body": b"hello"}),
    Case("te_trailing_ows", post(b"Transfer-Encoding: chunked  ", body=b"5\r\nhello\r\n0\r\n\r\n"), None, forwarded=1, check={"body": b"hello"}),
    Case("cl_leading_zeros", post(b"Content-Length: 005", body=b"hello"), None, forwarded=1, check={"body": b"hello"}),
    Case("trailer_host_dropped", chunked(b"0\r\nHost: admin\r\nX-Sum: 1\r\n\r\n"), None, forwarded=1, check={"host": b"svc"}),
    Case("leading_crlf", b"\r\n" + get(H.strip()), None, forwarded=1),
]  # fmt: skip


def test_the_corpus_has_at_least_30_distinct_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.raw for c in CASES}) == len(CASES)


@dataclass
class Forwarded:
    backend: bytes = b""
    error: HttpError | None = None
    released: list[Any] = field(default_factory=list)  # events of the unfinished message


def forward(raw: bytes, *, one_byte: bool) -> Forwarded:
    """What the proxy would send to the backend: only complete, re-serialized requests."""
    parser, out = RequestParser(), Forwarded()
    message: list[bytes] = []
    request: Request | None = None
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    pieces = [raw[i : i + 1] for i in range(len(raw))] if one_byte else [raw]
    try:
        for piece in [*pieces, b""]:
            parser.receive_data(piece)
            while (event := parser.next_event()) is not NEED_DATA:
                if event is PAUSED:
                    parser.start_next()
                    continue
                if isinstance(event, ConnectionClosed):
                    return out
                out.released.append(event)
                if isinstance(event, Request):
                    request, message = event, [serialize_request(event)]
                elif isinstance(event, Data):
                    assert request is not None
                    chunked = request.body is BodyKind.CHUNKED
                    message.append(encode_chunk(event.data) if chunked else event.data)
                elif isinstance(event, Trailers):
                    trailers = event.headers
                elif isinstance(event, EndOfMessage):
                    assert request is not None
                    if request.body is BodyKind.CHUNKED:
                        message.append(encode_last_chunk(trailers))
                    out.backend += b"".join(message)
                    out.released, request, trailers = [], None, ()
    except HttpError as exc:
        out.error = exc
    return out


def backend_reads(stream: bytes) -> list[tuple[Request, bytes]]:
    """The backend's view, twice: our strict parser, and bare llhttp (no leniency)."""
    parsed: list[tuple[Request, bytes]] = []
    parser = RequestParser()
    parser.receive_data(stream)
    parser.receive_data(b"")
    head, body = None, b""
    while not isinstance(event := parser.next_event(), ConnectionClosed):
        if isinstance(event, Request):
            head = event
        elif isinstance(event, Data):
            body += event.data
        elif isinstance(event, EndOfMessage):
            assert head is not None
            parsed.append((head, body))
            head, body = None, b""
        elif event is PAUSED:
            parser.start_next()

    class Count:
        messages = 0

        def on_message_complete(self) -> None:
            self.messages += 1

    count = Count()
    httptools.HttpRequestParser(count).feed_data(stream)  # raises on anything malformed
    assert count.messages == len(parsed)
    return parsed


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "byte_by_byte"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_backend_sees_zero_or_exactly_one_well_formed_request(
    case: Case, one_byte: bool
) -> None:
    result = forward(case.raw, one_byte=one_byte)
    if case.status is None:
        assert result.error is None, result.error
    else:
        assert result.error is not None, "accepted a message that must be refused"
        assert result.error.status == case.status, result.error
        if case.stage == "head" or (case.stage == "body" and not one_byte):
            # Refused at its head: nothing of it was released. Refused in the body: in
            # one read nothing either; byte by byte, only data of a message never ended.
            allowed = () if case.stage == "head" else (Request,)
            assert all(isinstance(e, allowed) for e in result.released), result.released
        assert not any(isinstance(e, EndOfMessage) for e in result.released)

    requests = backend_reads(result.backend)
    assert len(requests) == case.forwarded
    if case.check:
        request, body = requests[0]
        seen = {
            "target": request.target,
            "host": request.host,
            "upgrade": request.upgrade,
            "headers": request.headers,
            "body": body,
        }
        assert {k: seen[k] for k in case.check} == case.check


@pytest.mark.skipif(
    not hasattr(httptools.HttpRequestParser, "set_dangerous_leniencies"),
    reason="httptools < 0.6.2 cannot make llhttp lenient",
)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_our_own_rules_hold_even_with_every_llhttp_leniency_on(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llhttp 8 (httptools 0.6.0/0.6.1) was laxer than today's; a future one may be too.
    With every dangerous leniency switched on, the outcome must not change."""

    def lenient(self: RequestParser) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self._callbacks)
        parser.set_dangerous_leniencies(*[True] * 10)
        return parser

    monkeypatch.setattr(RequestParser, "_new_llhttp", lenient)
    result = forward(case.raw, one_byte=False)
    assert (result.error.status if result.error else None) == case.status, result.error
    monkeypatch.undo()  # the backend's view is read by the strict parsers
    assert len(backend_reads(result.backend)) == case.forwarded


SEEDS = [c.raw for c in CASES if c.status is None] + [
    get(H.strip(), b"Accept: */*") + post(b"Content-Length: 5", body=b"hello"),
    chunked(b"5;x=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n") + get(H.strip()),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bytes inserted, deleted or replaced by the characters
    that matter to framing."""
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        piece = draw(st.sampled_from([b"\r", b"\n", b" ", b"\t", b"\x00", b",", b":", b"0", b"-"]))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        if action == "insert":
            raw[at:at] = piece
        elif at < len(raw):
            raw[at : at + 1] = piece if action == "replace" else b""
    return bytes(raw)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_whatever_is_accepted_is_re_emitted_as_exactly_what_was_parsed(raw: bytes) -> None:
    """Differential: the backend reads the forwarded stream as the very requests the
    proxy parsed (same heads, same bodies), and nothing else, however the bytes were
    split; bad input is an HttpError, never another exception."""
    result = forward(raw, one_byte=False)  # raises anything but HttpError: a bug
    requests = backend_reads(result.backend)  # strict parser and bare llhttp agree
    assert len(requests) <= raw.count(b"HTTP/1.")  # never more requests than were sent
    again = forward(result.backend, one_byte=False)
    assert again.error is None and again.backend == result.backend  # a fixed point
    trickle = forward(raw, one_byte=True)  # how the bytes arrive changes nothing
    assert backend_reads(trickle.backend) == requests
    assert (trickle.error and trickle.error.status) == (result.error and result.error.status)
