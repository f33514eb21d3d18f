"""Sans-IO HTTP/1.1 for the L7 sidecar: strict parsers for both legs and serializers
that re-emit a normalized message. This module is the contract; import from here.

For: the proxy forwards what it *parsed*, re-serialized, never the raw bytes. Anything
two HTTP implementations could read differently is refused (or normalized to one
canonical form) before a byte of it reaches an app, which is what makes request
smuggling impossible through the sidecar. llhttp (httptools, no lenient flags) parses;
our own rules decide where each message ends and llhttp must agree.

Must never: import asyncio/socket/ssl, read the clock, parse past the message the shell
is working on, or release anything of a message that turns out to be bad.

The loop (both parsers)::

    parser.receive_data(chunk)                      # b"" = EOF
    while True:
        event = parser.next_event()                 # raises HttpError
        if event is NEED_DATA: break                # read more
        if event is PAUSED: ...                     # message done: parser.start_next()
        if event is SWITCHED: ...                   # 101: parser.switch_to_tunnel()
        handle(event)

``RequestParser(max_header_bytes=61440, max_headers=100, allowed_upgrades=(b"websocket",))``
  events: ``Request`` (once per message) → ``Data``* → [``Trailers``] → ``EndOfMessage``,
  then PAUSED until ``start_next()``; pipelined requests wait raw in the buffer, so they
  come out in order, one at a time. ``ConnectionClosed`` at EOF on a message boundary,
  and after a ``keep_alive=False`` request (nothing after it is processed).
  ``in_headers`` is True while a head is arriving: run the header timeout then.
  ``buffered``: unparsed bytes; stop reading from the client while it grows.
  Upgrade: a ``Request`` with ``upgrade`` set ends like any other. Forward it; if the
  upstream answers 101, ``switch_to_tunnel()`` returns the bytes the client sent after
  the head and both sides become a raw relay; otherwise call ``start_next()`` and the
  client's bytes are parsed as HTTP (strictly), never tunnelled.

``ResponseParser(request_method=..., upgrade_requested=False)`` (one per upstream
  connection; ``start_next(request_method=..., upgrade_requested=...)`` per request):
  ``Informational`` (1xx, 0+ times) → ``Response`` → ``Data``* → [``Trailers``] →
  ``EndOfMessage`` → PAUSED. HEAD, 204 and 304 responses have no body; a 101 (only if
  ``upgrade_requested``) is followed by SWITCHED and ``switch_to_tunnel()``.
  ``ConnectionClosed`` before a Response means the upstream closed without answering.
  ``start_next`` refuses (UpstreamHttpError) if the upstream sent unsolicited bytes.

Errors: ``HttpError(status, reason)`` (a ``meshlet.errors.MeshError``); the request side
  uses 400, 417, 431, 501, 505. Answer ``error_response(e.status, e.reason)`` and close.
  The response side raises ``UpstreamHttpError`` (status 502), and
  ``ResponseHeadersTooLarge`` for a head over the limits. An error in the middle of a
  body (a bad chunk) comes after some ``Data`` may have been released: abort the other
  leg then (reset), never finish that message with a last chunk.

What the proxy does with the events:
  ``serialize_request(req, add=..., drop=..., keep_alive=...)`` /
  ``serialize_response(resp, ...)`` write the head (framing and connection options come
  from the fields, hop-by-hop headers never pass); for each ``Data``: the bytes as they
  are for a LENGTH body, ``encode_chunk(data)`` for CHUNKED; at the end of a CHUNKED
  body ``encode_last_chunk(trailers)``. ``Connection: close`` is honoured both ways: a
  ``Request.keep_alive`` of False means close the client connection after the response;
  a ``Response.keep_alive`` of False means do not reuse the upstream connection. For
  ``expect_continue``, send ``CONTINUE`` (or forward the upstream's 100) before reading
  the body; answering with a final status instead means closing the connection.
  ``hop_by_hop(headers)`` names the headers not to forward from any other source.

Rules enforced in our code, beyond what llhttp enforces (each refused before the app):
  framing: Content-Length with Transfer-Encoding (400); two Content-Lengths, even equal
  (400); a Content-Length that is not plain digits or is ≥ 10**18 (400);
  Transfer-Encoding other than exactly ``chunked`` (any case, OWS allowed): not ending
  in one chunked 400, other codings before it (``gzip, chunked``) 501;
  Transfer-Encoding in HTTP/1.0 (400); chunk sizes other than 1-16 hex digits, chunk
  extensions that are not ``;token[=token|quoted]``, chunk-size lines over 4 KiB, chunk
  data not followed by CRLF (400). Shape: a head whose lines are not all CRLF-ended
  (bare CR/LF: llhttp < 9 accepted bare LF), obs-fold, control bytes (NUL...) (400); a
  request line not exactly ``METHOD SP target SP HTTP/1.x`` (double spaces); a header
  name spelling a framing/control field with ``_`` (``transfer_encoding``). Versions:
  only HTTP/1.0 and 1.1 (0.9, 2.0 and the h2 preface → 505). Routing: missing (1.1) or
  duplicate Host, a Host that is not host[:port] (400); targets other than origin-form,
  absolute-form http(s) (turned into origin-form, its authority replacing Host) or
  ``*`` for OPTIONS; fragments and userinfo in targets (400); CONNECT (501). Connection
  options naming Host/Content-Length/Transfer-Encoding/Expect (400); an Upgrade request
  with a body, or in HTTP/1.0 (400); Upgrade protocols not in ``allowed_upgrades`` are
  dropped (no h2c behind the proxy's back); Expect other than 100-continue (417);
  Content-Length/Transfer-Encoding in trailers (400), other control fields in trailers
  (Host, Authorization, Content-Type...) dropped. Limits: a head (request line,
  fields, blank line) over ``max_header_bytes`` or more than ``max_headers`` fields (431;
  the same for a trailer section). Responses: the same shape and framing rules, a 101
  nobody asked for, and bytes after a complete response (all 502).
"""

from __future__ import annotations

from sidecar.http1_conn import MAX_HEADER_BYTES, MAX_HEADERS
from sidecar.http1_model import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    HOP_BY_HOP,
    NEED_DATA,
    PAUSED,
    SWITCHED,
    BodyKind,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Headers,
    HttpError,
    Informational,
    Request,
    RequestEvent,
    Response,
    ResponseEvent,
    ResponseHeadersTooLarge,
    Trailers,
    UpstreamHttpError,
    Wait,
    hop_by_hop,
)
from sidecar.http1_parse import RequestParser, ResponseParser
from sidecar.http1_serialize import (
    CONTINUE,
    encode_chunk,
    encode_last_chunk,
    error_response,
    serialize_request,
    serialize_response,
)

__all__ = [
    "CONNECTION_CLOSED",
    "CONTINUE",
    "END_OF_MESSAGE",
    "HOP_BY_HOP",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "NEED_DATA",
    "PAUSED",
    "SWITCHED",
    "BodyKind",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Headers",
    "HttpError",
    "Informational",
    "Request",
    "RequestEvent",
    "RequestParser",
    "Response",
    "ResponseEvent",
    "ResponseHeadersTooLarge",
    "ResponseParser",
    "Trailers",
    "UpstreamHttpError",
    "Wait",
    "encode_chunk",
    "encode_last_chunk",
    "error_response",
    "hop_by_hop",
    "serialize_request",
    "serialize_response",
]
