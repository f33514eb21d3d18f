"""Protocol detection on the first bytes of a connection (sidecar/detect.py): what it
decides, that it decides as early as the bytes allow and never changes its mind, and
that what it calls HTTP/1 is what the L7 codec serves. The sidecar's use of it, with
real clients and servers, is in tests/integration/test_sidecar_detect*.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.detect import MAX_PEEK, METHODS, PREFACE, Detected, classify, h2_or_http1
from sidecar.http1 import Request, RequestParser

H2, HTTP1, TCP, NEED_MORE = Detected.H2, Detected.HTTP1, Detected.TCP, Detected.NEED_MORE


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", NEED_MORE),
        (b"G", NEED_MORE),
        (b"GET", NEED_MORE),  # a method alone proves nothing
        (b"GET ", NEED_MORE),
        (b"GET /orders?x=1", NEED_MORE),
        (b"GET /orders HTTP/1.", NEED_MORE),
        (b"GET /orders HTTP/1.1\r", NEED_MORE),
        (b"GET /orders HTTP/1.1\r\n", HTTP1),
        (b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n", HTTP1),
        (b"POST http://orders:8080/x HTTP/1.0\r\n", HTTP1),
        (b"OPTIONS * HTTP/1.1\r\n", HTTP1),
        (b"M-SEARCH * HTTP/1.1\r\n", HTTP1),
        (b"P", NEED_MORE),  # POST, PUT, PATCH ... or the HTTP/2 preface
        (b"PRI * HTTP/2.0\r\n", NEED_MORE),
        (PREFACE, H2),
        (PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", H2),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r!", TCP),
        (b"PRI * HTTP/1.1\r\n", TCP),  # PRI is no HTTP/1 method
        (b"GET / HTTP/2.0\r\n", TCP),
        (b"GET / HTTP/1.1\n", TCP),  # bare LF: the strict codec would refuse it
        (b"GET  / HTTP/1.1\r\n", TCP),
        (b"GET /\xc3\xa9 HTTP/1.1\r\n", TCP),
        (b"GET /a\tb HTTP/1.1\r\n", TCP),
        (b"get / HTTP/1.1\r\n", TCP),
        (b"GETS / HTTP/1.1\r\n", TCP),
        (b"CONNECT orders:443 HTTP/1.1\r\n", TCP),  # a tunnel: relayed, never refused
        (b"\r\nGET / HTTP/1.1\r\n", TCP),
        (b"*1\r\n$4\r\nPING\r\n", TCP),  # redis
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", TCP),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", TCP),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", TCP),  # postgres SSLRequest
        (b"HELLO", TCP),
    ],
)
def test_classify(data: bytes, want: Detected) -> None:
    assert classify(data) is want


def test_declared_http_ports_only_tell_h2c_from_http1() -> None:
    assert h2_or_http1(b"") is NEED_MORE
    assert h2_or_http1(b"PRI * HTTP/2") is NEED_MORE
    assert h2_or_http1(PREFACE) is H2
    assert h2_or_http1(b"GET") is HTTP1  # not the preface: the HTTP/1.1 codec judges it
    assert h2_or_http1(b"garbage") is HTTP1
    assert h2_or_http1(b"PRI * HTTP/1.1\r\n") is HTTP1


def test_detection_is_bounded() -> None:
    long_target = b"/" + b"a" * (MAX_PEEK - 30)
    assert classify(b"GET " + long_target + b" HTTP/1.1\r\n") is HTTP1
    assert classify(b"GET " + long_target) is NEED_MORE
    assert classify(b"GET /" + b"a" * MAX_PEEK) is TCP
    assert classify(b"GET /" + b"a" * (MAX_PEEK * 4) + b" HTTP/1.1\r\n") is TCP


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_detected_is_one_the_l7_codec_serves(method: bytes) -> None:
    head = method + b" /x HTTP/1.1\r\nHost: orders\r\n\r\n"
    assert classify(head) is HTTP1
    parser = RequestParser()
    parser.receive_data(head)
    request = parser.next_event()
    assert isinstance(request, Request) and request.method == method.decode()


# ---- properties ---------------------------------------------------------------------------------

targets = st.one_of(
    st.just(b"/"),
    st.just(b"*"),
    st.binary(min_size=1, max_size=40).map(lambda b: bytes(0x21 + x % 94 for x in b)),
)
request_lines = st.builds(
    lambda m, t, minor: m + b" " + t + b" HTTP/1." + minor + b"\r\n",
    st.sampled_from(sorted(METHODS)),
    targets,
    st.sampled_from([b"0", b"1", b"9"]),
)


@st.composite
def first_bytes(draw: st.DrawFn) -> bytes:
    """What a connection may start with: requests, the preface, other protocols, noise —
    and each of those with a byte changed, dropped or added."""
    base = draw(
        st.one_of(
            request_lines.map(lambda line: line + b"Host: x\r\n\r\n"),
            st.just(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
            st.just(b"*1\r\n$4\r\nPING\r\n"),
            st.binary(max_size=64),
        )
    )
    edit = draw(st.sampled_from(["none", "replace", "drop", "insert"]))
    if base and edit != "none":
        at = draw(st.integers(0, len(base) - 1))
        byte = bytes([draw(st.sampled_from([0x20, 0x0D, 0x0A, 0x31, 0x32, 0x47, 0xFF]))])
        if edit == "replace":
            base = base[:at] + byte + base[at + 1 :]
        elif edit == "drop":
            base = base[:at] + base[at + 1 :]
        else:
            base = base[:at] + byte + base[at:]
    return base


@settings(max_examples=500, deadline=None)
@given(first_bytes())
def test_a_prefix_never_contradicts_the_whole(data: bytes) -> None:
    for decide in (classify, h2_or_http1):
        whole = decide(data)
        for cut in range(len(data) + 1):
            assert decide(data[:cut]) in (NEED_MORE, whole), (decide.__name__, data[:cut])


@settings(max_examples=300, deadline=None)
@given(request_lines, st.binary(max_size=32))
def test_a_request_line_is_http1_exactly_from_its_crlf(line: bytes, rest: bytes) -> None:
    for cut in range(len(line)):
        assert classify(line[:cut]) is NEED_MORE, line[:cut]
    assert classify(line) is HTTP1
    assert classify(line + rest) is HTTP1


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_bytes_that_are_neither_are_tcp_at_the_latest_at_the_bound(data: bytes) -> None:
    found = classify(data + b"\x00" * MAX_PEEK)  # NUL is in no request line or preface
    assert found in (HTTP1, H2, TCP)
    if found is TCP:
        assert classify(data + b"\x00") is TCP  # decided at the NUL, not at the bound
