"""Protocol detection: what an app connection speaks, from its first bytes.

For: the outbound sidecar on ports not declared (``Protocol.AUTO``) and, on ports
declared ``http``, telling h2c (the HTTP/2 client preface) from HTTP/1.1. ``classify``
looks at the bytes read so far and answers ``H2`` (the whole 24-byte preface),
``HTTP1`` (a request line the L7 codec serves: a method it knows, SP, a target of
visible ASCII, SP, ``HTTP/1.<digit>``, CRLF), ``TCP`` (proved to be neither) or
``NEED_MORE``. It decides as soon as the bytes prove or disprove a shape, and never
changes its mind: the answer for a prefix is ``NEED_MORE`` or the answer for the whole.
Past ``MAX_PEEK`` bytes without a decision it answers ``TCP``.

``CONNECT`` is not taken as HTTP: the L7 proxy refuses it (it is not a forward proxy),
while a relayed connection reaches a proxy in the mesh as the app meant it. A request
line the strict codec would refuse (bare LF, a lowercase method, a byte outside visible
ASCII in the target) is relayed as bytes too, as it would be without the mesh.

Must never: read a socket or the clock, or look past ``MAX_PEEK`` bytes.
"""

from __future__ import annotations

import re
from enum import Enum

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
MAX_PEEK = 8 * 1024

# The methods llhttp (the L7 codec) parses, except CONNECT (see above) and PRI (h2).
METHODS = frozenset(
    (
        b"DELETE", b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"TRACE", b"COPY", b"LOCK",
        b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND",
        b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH",
        b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"PATCH", b"PURGE", b"MKCALENDAR", b"LINK",
        b"UNLINK", b"SOURCE", b"QUERY",
    )
)  # fmt: skip
_LONGEST_METHOD = max(len(m) for m in METHODS)
_METHOD_PREFIXES = frozenset(m[:i] for m in METHODS for i in range(1, len(m) + 1))
_TARGET = re.compile(rb"[\x21-\x7e]*")
_VERSION = b"HTTP/1.#\r\n"  # '#': one digit


class Detected(Enum):
    NEED_MORE = "need_more"
    H2 = "h2"
    HTTP1 = "http1"
    TCP = "tcp"


def classify(data: bytes) -> Detected:
    """What the connection whose first bytes are ``data`` speaks (see the module doc)."""
    data = data[:MAX_PEEK]
    found = _preface(data)
    if found is not Detected.TCP:
        return found
    found = _request_line(data)
    if found is Detected.NEED_MORE and len(data) >= MAX_PEEK:
        return Detected.TCP
    return found


def h2_or_http1(data: bytes) -> Detected:
    """On a port declared ``http``: ``H2`` for the preface, ``NEED_MORE`` while ``data``
    may still become it, else ``HTTP1`` (the HTTP/1.1 codec judges the rest)."""
    found = _preface(data)
    return Detected.HTTP1 if found is Detected.TCP else found


def _preface(data: bytes) -> Detected:
    if len(data) >= len(PREFACE):
        return Detected.H2 if data.startswith(PREFACE) else Detected.TCP
    return Detected.NEED_MORE if PREFACE.startswith(data) else Detected.TCP


def _request_line(data: bytes) -> Detected:
    sp = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if sp < 0:
        if len(data) > _LONGEST_METHOD or (data and data not in _METHOD_PREFIXES):
            return Detected.TCP
        return Detected.NEED_MORE
    if data[:sp] not in METHODS:
        return Detected.TCP
    target = _TARGET.match(data, sp + 1)
    target_end = target.end() if target is not None else sp + 1
    if target_end == len(data):
        return Detected.NEED_MORE
    if target_end == sp + 1 or data[target_end] != 0x20:  # empty, or a byte not allowed
        return Detected.TCP
    version = data[target_end + 1 : target_end + 1 + len(_VERSION)]
    for got, want in zip(version, _VERSION, strict=False):
        if got != want and not (want == 0x23 and 0x30 <= got <= 0x39):
            return Detected.TCP
    return Detected.HTTP1 if len(version) == len(_VERSION) else Detected.NEED_MORE
