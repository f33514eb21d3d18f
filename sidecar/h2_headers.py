"""HTTP/2 header lists as the sidecar reads and rewrites them: pure.

For: the request head's pseudo-headers and lookups (``RequestHead``), the header list
sent on (some names dropped, the sidecar's fields appended after everything else, so
pseudo-headers stay first), a response head with the sidecar's own fields set, the
status and ``grpc-status`` of a head or trailers, and the proxy's own replies: plain
HTTP/2 (the status and a short text body) or, for a gRPC request (``content-type:
application/grpc*``), trailers-only (HTTP 200, ``grpc-status`` and a percent-encoded
``grpc-message`` in the one HEADERS frame) with the gRPC status the HTTP one maps to:
503 and 502 → UNAVAILABLE (14), 504 → DEADLINE_EXCEEDED (4), 404 → UNIMPLEMENTED (12);
the others as gRPC's own HTTP mapping (doc/http-grpc-status-mapping.md).

Must never: import asyncio, socket, ssl or h2, reorder the fields it keeps, or produce
a header value with a byte outside visible ASCII and space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

CONTENT_TYPE = b"content-type"
GRPC_STATUS = b"grpc-status"
GRPC_MESSAGE = b"grpc-message"
GRPC_TIMEOUT = b"grpc-timeout"

GRPC_OK = 0
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14

# The gRPC status of the sidecar's own HTTP answers (the brief's 504 → DEADLINE_EXCEEDED
# differs from gRPC's client-side mapping, which says UNAVAILABLE: here a 504 is always a
# timeout the sidecar enforced).
GRPC_FOR_HTTP = {
    400: 13,  # INTERNAL
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: GRPC_UNIMPLEMENTED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_DEADLINE_EXCEEDED,
}
_MAX_MESSAGE = 1024  # bytes of grpc-message before encoding; longer text is cut


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` and its variants (``+proto``, ``+json``, ``;charset``)."""
    return content_type is not None and content_type.startswith(b"application/grpc")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the proxy reads from a request head; ``lookup`` has every field by name (a
    repeated one joined with ``, ``), pseudo-headers included."""

    method: str
    path: str
    authority: str | None
    lookup: dict[bytes, bytes]
    grpc: bool

    @classmethod
    def parse(cls, headers: Sequence[tuple[bytes, bytes]]) -> RequestHead:
        lookup: dict[bytes, bytes] = {}
        for name, value in headers:
            old = lookup.get(name)
            lookup[name] = value if old is None else old + b", " + value
        authority = lookup.get(b":authority")
        return cls(
            method=lookup.get(b":method", b"GET").decode("latin-1"),
            path=lookup.get(b":path", b"/").decode("latin-1"),
            authority=authority.decode("latin-1") if authority is not None else None,
            lookup=lookup,
            grpc=is_grpc(lookup.get(CONTENT_TYPE)),
        )


def forwarded(
    headers: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    add: Iterable[tuple[bytes, bytes]] = (),
) -> Headers:
    """``headers`` without the names in ``drop``, then ``add``."""
    out = [h for h in headers if h[0] not in drop]
    out.extend(add)
    return out


def with_fields(
    headers: Sequence[tuple[bytes, bytes]], fields: Sequence[tuple[bytes, bytes]]
) -> Headers:
    """``headers`` with ``fields`` set: any field of the same name is replaced."""
    names = frozenset(name for name, _ in fields)
    return forwarded(headers, names, fields)


def status_of(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The ``:status`` of a response head (0 if it has none or it is not a number)."""
    for name, value in headers:
        if name == b":status":
            return int(value) if value.isdigit() else 0
    return 0


def grpc_status_of(headers: Sequence[tuple[bytes, bytes]] | None) -> int | None:
    """The ``grpc-status`` of trailers (or a trailers-only head); None if absent or not a
    number."""
    for name, value in headers or ():
        if name == GRPC_STATUS:
            return int(value) if value.isdigit() and len(value) <= 3 else None
    return None


def grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value: UTF-8, percent-encoded outside printable
    ASCII and for ``%`` itself (the gRPC over HTTP/2 spec)."""
    out = bytearray()
    for byte in text.encode("utf-8", "replace")[:_MAX_MESSAGE]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def grpc_trailers(code: int, message: str) -> Headers:
    return [(GRPC_STATUS, b"%d" % code), (GRPC_MESSAGE, grpc_message(message))]


def local_reply(
    status: int,
    message: str,
    *,
    grpc: bool,
    head_only: bool = False,
    fields: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[Headers, bytes | None]:
    """The proxy's own answer: ``(head, body)``. gRPC: trailers-only, no body (the head
    ends the stream). Otherwise the status with ``message`` as a text body (none for a
    HEAD request: ``head_only``)."""
    if grpc:
        code = GRPC_FOR_HTTP.get(status, GRPC_UNKNOWN)
        head = [(b":status", b"200"), (CONTENT_TYPE, b"application/grpc")]
        head += grpc_trailers(code, message)
        head.extend(fields)
        return head, None
    body = message.encode("utf-8", "replace") + b"\n"
    head = [
        (b":status", b"%d" % status),
        (CONTENT_TYPE, b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        *fields,
    ]
    return head, None if head_only else body
