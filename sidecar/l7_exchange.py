"""The request half of proxying HTTP/1.1, shared by the outbound and the inbound
handlers: the downstream connection loop, holding a request body for a replay, the
head sent upstream, streaming the rest of the body, and the proxy's own replies.
(``sidecar.l7_response`` is the response half.)

For: moving parsed events between two ``Channel``s that share one ``Waker``, with the
codec's framing (``sidecar.http1``): what goes out is re-serialized from what was
parsed. Bodies stream; only the first ``limit`` bytes of a request body are held, so
that a short request can be sent again. ``Expect: 100-continue`` is answered here,
when the body is wanted, and not passed on (Envoy's default).

Must never: decide policy (routes, retries, timeouts come from the caller), forward a
byte the parser did not release, or keep a connection whose request failed to parse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from sidecar.http1 import (
    CONTINUE,
    END_OF_MESSAGE,
    NEED_DATA,
    BodyKind,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Headers,
    HttpError,
    Request,
    RequestParser,
    Response,
    Trailers,
    encode_chunk,
    encode_last_chunk,
    error_response,
    serialize_request,
    serialize_response,
)
from sidecar.http1_model import ParsedHeaders
from sidecar.l7_io import Channel, drain, next_event

log = logging.getLogger(__name__)


class Gone(Exception):
    """The downstream went away (or stalled past its timeout) mid-exchange."""


@dataclass(slots=True)
class Body:
    """What was read of a request body: all of it (``complete``) or its first bytes."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    trailers: Headers = ()

    def encoded(self, kind: BodyKind) -> bytes:
        """The held bytes framed as ``kind`` (plus the last chunk once complete)."""
        if kind is BodyKind.CHUNKED:
            out = b"".join([encode_chunk(c) for c in self.chunks])
            return out + encode_last_chunk(self.trailers) if self.complete else out
        return b"".join(self.chunks)


NO_BODY = Body(complete=True)


def local_reply(
    status: int,
    text: str,
    *,
    keep_alive: bool,
    headers: Headers = (),
) -> bytes:
    """A complete plain-text response of the proxy's own."""
    body = text.encode("utf-8", "replace") + b"\n"
    resp = Response(
        status=status,
        reason=HTTPStatus(status).phrase.encode("ascii"),
        headers=((b"content-type", b"text/plain; charset=utf-8"), *headers),
        body=BodyKind.LENGTH,
        content_length=len(body),
    )
    return serialize_response(resp, keep_alive=keep_alive) + body


async def serve_downstream(
    down: Channel[RequestParser],
    handle: Callable[[Request], Awaitable[bool]],
    *,
    header_timeout_s: float,
    idle_timeout_s: float,
    refused: Callable[[HttpError], None],
    draining: Callable[[], bool] = lambda: False,
) -> str:
    """Read requests from ``down`` one at a time (pipelined ones wait in the parser)
    and ``handle`` each (it returns whether the connection may carry another). A
    malformed request is answered with its 4xx and the connection closed. Returns how
    the connection ended: "closed", "idle", "header_timeout", "refused", "gone"."""
    loop = asyncio.get_running_loop()
    waker = down.waker
    assert waker is not None
    parser = down.parser
    while True:
        head_started: float | None = None
        while True:
            try:
                event = parser.next_event()
            except HttpError as e:
                refused(e)
                down.write(error_response(e.status, e.reason))
                down.close()
                return "refused"
            if event is not NEED_DATA:
                break
            if down.lost:
                return "gone"
            now = loop.time()
            if parser.in_headers:
                head_started = head_started or now
                until = head_started + header_timeout_s
            elif draining():
                down.close()
                return "closed"
            else:
                until = now + idle_timeout_s
            down.want_data()
            if not await waker.wait(until):
                down.close()
                return "header_timeout" if parser.in_headers else "idle"
        if isinstance(event, ConnectionClosed):
            down.close()
            return "closed"
        if not isinstance(event, Request):  # the parser releases a Request first
            raise RuntimeError(f"unexpected {event!r} before a request head")
        try:
            keep = await handle(event)
        except Gone:
            down.abort()
            return "gone"
        if not keep or down.lost:
            down.close()
            return "closed"
        parser.start_next()


def no_body(down: Channel[RequestParser]) -> Body:
    """The end of a request without a body (``req.body is BodyKind.NONE``), taken from
    the parser, where it is already queued: no wait, so no coroutine either."""
    event = down.parser.next_event()
    if event is not END_OF_MESSAGE and not isinstance(event, EndOfMessage):
        raise RuntimeError(f"expected the end of a bodiless request, not {event!r}")
    return Body(complete=True)


async def read_body(down: Channel[RequestParser], req: Request, limit: int, idle_s: float) -> Body:
    """Hold the request body if it is at most ``limit`` bytes (``complete``); else hold
    its first bytes and leave the rest in the parser (``send_request`` streams it).
    Answers ``100 Continue`` first when the client waits for it. Raises ``Gone`` (the
    client left or sent nothing for ``idle_s``) and ``HttpError`` (a malformed body)."""
    if req.body is BodyKind.NONE:
        return no_body(down)
    if req.expect_continue:
        down.write(CONTINUE)
    body = Body()
    if req.body is BodyKind.LENGTH and (req.content_length or 0) > limit:
        return body  # too large to hold: stream it all
    while body.size <= limit:
        event = await next_event(down, None, idle_s=idle_s)
        if event is None:
            raise Gone("the client stopped sending its request body")
        if isinstance(event, Data):
            body.chunks.append(event.data)
            body.size += len(event.data)
        elif isinstance(event, Trailers):
            body.trailers = event.headers
        elif isinstance(event, EndOfMessage):
            body.complete = True
            return body
    return body


async def send_rest(
    up: Channel[Any],
    down: Channel[RequestParser],
    req: Request,
    body: Body,
    until: float | None,
    idle_s: float,
) -> int:
    """After the head and ``body``'s held bytes went out: stream the rest of the request
    body from ``down`` to ``up`` (by the loop time ``until``, with no pause over
    ``idle_s``). Returns the body bytes sent; raises ``Gone`` when the client stalls or
    leaves, ``ConnectionError`` when the upstream does, ``TimeoutError`` at ``until``."""
    sent = body.size
    chunked = req.body is BodyKind.CHUNKED
    trailers: Headers = ()
    while True:
        event = await next_event(down, until, watch=up, idle_s=idle_s)
        if event is None:
            if up.lost:
                raise ConnectionError("the upstream closed while the request body was sent")
            if until is not None and asyncio.get_running_loop().time() >= until:
                raise TimeoutError("the try's time ran out while the body was sent")
            raise Gone("the client stopped sending its request body")
        if isinstance(event, Data):
            sent += len(event.data)
            up.write(encode_chunk(event.data) if chunked else event.data)
            if up.write_paused and not await drain(up, until, watch=down, idle_s=idle_s):
                if down.lost:
                    raise Gone("the client left while its body was sent")
                raise ConnectionError("the upstream stopped reading the request body")
        elif isinstance(event, Trailers):
            trailers = event.headers
        elif isinstance(event, EndOfMessage):
            if chunked:
                up.write(encode_last_chunk(trailers))
            body.complete = True
            return sent


def request_head(
    req: Request, add: Iterable[tuple[bytes, bytes]], replace: frozenset[bytes]
) -> bytes:
    """The head to send upstream (always keep-alive: that leg is the proxy's own):
    the request's headers without the names in ``replace``, then ``add``."""
    kept = req.headers
    if not replace.isdisjoint([name for name, _ in kept]):
        # A subset of what the parser produced is still what it produced: trusted as is.
        kept = ParsedHeaders([h for h in kept if h[0] not in replace])
    return serialize_request(req, add=add, keep_alive=True, headers=kept)
