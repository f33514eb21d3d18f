"""Re-emitting HTTP/1.1 messages in one canonical shape: what the proxy sends is built
from what it parsed, never copied from the raw bytes.

For: the request line or status line, the end-to-end headers in their order, then the
framing written from the message's fields (``content-length: N`` or
``transfer-encoding: chunked``, never both) and the connection options (``close``,
``keep-alive``, ``upgrade``); chunk and last-chunk encoding; the error responses the
proxy answers with. Headers a parser produced (``ParsedHeaders``) are written as they
are; every other field, and the start line, is checked on the way out (token names, no
CR/LF/control bytes in values), so a header built from user data cannot inject a line
or a second message.

Must never: emit a hop-by-hop or framing header taken from ``headers``, an empty chunk
(it would end the body), or a head the strict parser would refuse.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from http import HTTPStatus

from sidecar import http1_rules as rules
from sidecar.http1_model import (
    NOT_IN_HEADERS,
    NOT_IN_TRAILERS,
    BodyKind,
    Headers,
    Informational,
    ParsedHeaders,
    Request,
    Response,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_CONTENT_LENGTH = frozenset(range(100, 200)) | {204}
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
_TARGET_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))


def _check_field(name: bytes, value: bytes, what: str) -> None:
    if not rules.is_token(name):
        raise ValueError(f"cannot serialize {what}: header name {name[:40]!r} is not a token")
    if value.translate(None, _VALUE_BYTES):
        raise ValueError(f"cannot serialize {what}: {name!r} has CR, LF or a control byte")


def _fields(
    parts: list[bytes],
    headers: Iterable[tuple[bytes, bytes]],
    add: Iterable[tuple[bytes, bytes]],
    drop: Collection[bytes],
    banned: Collection[bytes],
    what: str,
) -> list[bytes]:
    """Append one line per field to ``parts``; return the (lower-case) names written.
    Headers a parser produced are trusted; any other field is checked."""
    names: list[bytes] = []
    if type(headers) is ParsedHeaders:
        kept: Iterable[tuple[bytes, bytes]] = headers
        if drop or banned is not NOT_IN_HEADERS:
            kept = [h for h in headers if h[0] not in drop and h[0] not in banned]
        parts += [b"%s: %s\r\n" % h for h in kept]
        names = [name for name, _ in kept]
        headers = ()
    for group in (headers, add):
        for name, value in group:
            lower = name.lower()
            if lower in banned or lower in drop:
                continue
            _check_field(name, value, what)
            parts.append(b"%s: %s\r\n" % (name, value))
            names.append(lower)
    return names


def _connection(parts: list[bytes], version: str, keep_alive: bool, upgrade: bytes | None) -> None:
    options = []
    if upgrade:
        _check_field(b"upgrade", upgrade, "upgrade")
        options.append(b"upgrade")
        parts.append(b"upgrade: %s\r\n" % upgrade)
    if version == "1.1" and not keep_alive:
        options.append(b"close")
    elif version == "1.0" and keep_alive:
        options.append(b"keep-alive")
    if options:
        parts.append(b"connection: %s\r\n" % b", ".join(options))


def _check_framing(version: str, body: BodyKind, length: int | None, what: str) -> None:
    if version not in ("1.0", "1.1"):
        raise ValueError(f"cannot serialize {what}: HTTP/{version}")
    if body is BodyKind.CHUNKED and version != "1.1":
        raise ValueError(f"cannot serialize {what}: chunked needs HTTP/1.1")
    if length is None and body is BodyKind.LENGTH:
        raise ValueError(f"cannot serialize {what}: body LENGTH without content_length")
    if length is not None and (length < 0 or body in (BodyKind.CHUNKED, BodyKind.UNTIL_CLOSE)):
        raise ValueError(f"cannot serialize {what}: body {body} with content_length {length}")


def serialize_request(
    req: Request,
    *,
    add: Iterable[tuple[bytes, bytes]] = (),
    drop: Collection[bytes] = (),
    keep_alive: bool | None = None,
    headers: Headers | None = None,
) -> bytes:
    """The request head to send upstream: ``req.headers`` minus ``drop`` (lower-case
    names) plus ``add``, then framing and connection options from the fields.
    ``keep_alive`` overrides ``req.keep_alive`` (the upstream leg is the proxy's own);
    ``headers`` replaces ``req.headers`` (trusted only if a ``ParsedHeaders``, as
    always), which spares a caller that filtered them a copy of the request.
    Raises ValueError for a head the strict parser would refuse."""
    method, target = req.method.encode("ascii"), req.target.encode("latin-1")
    if not rules.is_token(method):
        raise ValueError(f"cannot serialize request: method {req.method!r}")
    if target.translate(None, _TARGET_BYTES) or not (target[:1] == b"/" or target == b"*"):
        raise ValueError(f"cannot serialize request: target {req.target[:40]!r}")
    if req.body is BodyKind.UNTIL_CLOSE or (
        req.body is BodyKind.NONE and req.content_length is not None
    ):
        raise ValueError(f"cannot serialize request: body {req.body}")
    _check_framing(req.version, req.body, req.content_length, "request")
    if req.upgrade and req.version != "1.1":
        raise ValueError("cannot serialize request: Upgrade needs HTTP/1.1")
    parts = [b"%s %s HTTP/%s\r\n" % (method, target, req.version.encode())]
    fields = req.headers if headers is None else headers
    names = _fields(parts, fields, add, drop, NOT_IN_HEADERS, "request")
    if names.count(b"host") > 1 or (req.version == "1.1" and b"host" not in names):
        raise ValueError("cannot serialize request: it needs one host header (HTTP/1.1)")
    if req.body is BodyKind.LENGTH:
        parts.append(b"content-length: %d\r\n" % (req.content_length or 0))
    elif req.body is BodyKind.CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    keep = req.keep_alive if keep_alive is None else keep_alive
    _connection(parts, req.version, keep, req.upgrade)
    parts.append(b"\r\n")
    return b"".join(parts)


def serialize_response(
    resp: Response | Informational,
    *,
    add: Iterable[tuple[bytes, bytes]] = (),
    drop: Collection[bytes] = (),
    keep_alive: bool | None = None,
) -> bytes:
    """The response head to send downstream, built like ``serialize_request``. A
    Response delimited by close is sent with ``connection: close``; a bodyless one
    (HEAD, 304) keeps its ``content_length``, except 1xx and 204 which never carry one."""
    if not 100 <= resp.status <= 599:
        raise ValueError(f"cannot serialize response: status {resp.status}")
    if resp.reason.translate(None, _VALUE_BYTES):
        raise ValueError(f"cannot serialize response: reason {resp.reason[:40]!r}")
    if isinstance(resp, Informational):
        if not 100 <= resp.status < 200 or resp.status == 101:
            raise ValueError(f"cannot serialize an Informational {resp.status}")
        parts = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason)]
        _fields(parts, resp.headers, add, drop, NOT_IN_HEADERS, "1xx response")
        parts.append(b"\r\n")
        return b"".join(parts)
    _check_framing(resp.version, resp.body, resp.content_length, "response")
    if (resp.status < 200 or resp.status in (204, 304)) and resp.body is not BodyKind.NONE:
        raise ValueError(f"cannot serialize response: a {resp.status} has no body")
    if (resp.status == 101) != bool(resp.upgrade):
        raise ValueError("cannot serialize response: upgrade goes with 101, and only there")
    parts = [b"HTTP/%s %d %s\r\n" % (resp.version.encode(), resp.status, resp.reason)]
    _fields(parts, resp.headers, add, drop, NOT_IN_HEADERS, "response")
    keep = resp.keep_alive if keep_alive is None else keep_alive
    if resp.body is BodyKind.CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif resp.body is BodyKind.UNTIL_CLOSE:
        keep = False
    elif resp.content_length is not None and resp.status not in _NO_CONTENT_LENGTH:
        parts.append(b"content-length: %d\r\n" % resp.content_length)
    _connection(parts, resp.version, keep, resp.upgrade)
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; b"" for no data (an empty chunk would end it)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def encode_last_chunk(trailers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """The end of a chunked body, with the trailers a trailer section may carry
    (framing and control fields are dropped)."""
    parts = [b"0\r\n"]
    _fields(parts, trailers, (), (), NOT_IN_TRAILERS, "trailers")
    parts.append(b"\r\n")
    return b"".join(parts)


def error_response(status: int, reason: str) -> bytes:
    """A complete plain-text error response that closes the connection (for
    ``HttpError``: ``error_response(err.status, err.reason)``)."""
    phrase = HTTPStatus(status).phrase.encode("ascii")
    body = reason.encode("utf-8", "replace") + b"\n"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, phrase, len(body), body)
    )
