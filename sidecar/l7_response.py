"""The response half of proxying one HTTP/1.1 exchange: waiting for the head,
streaming the body back, and the 101 tunnel.

For: ``read_response_head`` (1xx passed on, a close or reset before any byte told
apart from a malformed head), ``stream_response`` (what is ready goes out in one
write; a body delimited by the upstream's close is re-framed as chunked for an
HTTP/1.1 client), ``respond`` (head, body and the upstream connection back to its
pool) and ``tunnel`` (after a 101 both connections become a ``Relay``).

Must never: finish a message whose upstream failed mid-body (the downstream is reset
instead, so the client sees a truncation, not a short body), or pool a connection
whose exchange did not end cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from sidecar.accesslog import ResponseFlag
from sidecar.http1 import (
    NEED_DATA,
    SWITCHED,
    BodyKind,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Headers,
    HttpError,
    Informational,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    Trailers,
    encode_chunk,
    encode_last_chunk,
    serialize_response,
)
from sidecar.http1_model import ParsedHeaders
from sidecar.l7_exchange import Gone
from sidecar.l7_io import Channel, drain, next_event
from sidecar.l7_pool import Pool, UpstreamConn
from sidecar.l7_record import Record
from sidecar.relay import Relay

FLUSH_BYTES = 64 * 1024  # response bytes gathered before one write downstream


class NoResponse(Exception):
    """The upstream closed or reset the connection before a response head."""

    def __init__(self, reason: str, *, any_bytes: bool) -> None:
        super().__init__(reason)
        self.any_bytes = any_bytes  # some response bytes had arrived


async def read_response_head(
    up: Channel[ResponseParser],
    down: Channel[RequestParser],
    until: float | None,
    *,
    forward_1xx: bool,
) -> Response | None:
    """The response head, or None when ``until`` passed or the client left (check
    ``down.lost``). 1xx responses other than 100 are passed on when ``forward_1xx``.
    Raises ``NoResponse`` and ``UpstreamHttpError``."""
    start = up.received
    while True:
        try:
            event = await next_event(up, until, watch=down)
        except HttpError as e:
            if up.lost and up.error is not None:
                raise NoResponse(f"reset: {up.error}", any_bytes=up.received > start) from None
            raise e
        if event is None or isinstance(event, Response):
            return event
        if isinstance(event, Informational):
            if forward_1xx and event.status != 100:
                down.write(serialize_response(event))
            continue
        if isinstance(event, ConnectionClosed):
            why = f"reset: {up.error}" if up.error is not None else "closed"
            raise NoResponse(why, any_bytes=up.received > start)
        raise RuntimeError(f"unexpected {event!r} before a response head")


@dataclass(slots=True)
class Streamed:
    complete: bool  # the whole response went downstream
    body_bytes: int
    error: str = ""  # why not: "upstream_reset", "upstream_protocol", "downstream_gone", "idle"


async def stream_response(
    up: Channel[ResponseParser],
    down: Channel[RequestParser],
    resp: Response,
    head: bytes,
    idle_timeout_s: float,
    *,
    chunk_out: bool,
) -> Streamed:
    """Write ``head`` and then the response body as it arrives, gathering what is ready
    into one write; ``chunk_out``: the head sent downstream says chunked (the upstream's
    body was chunked, or delimited by its close). On an upstream failure mid-body the
    caller must reset the downstream (nothing here finishes a broken message)."""
    loop = asyncio.get_running_loop()
    waker = up.waker
    assert waker is not None
    parser = up.parser
    chunked = chunk_out
    until_close = resp.body is BodyKind.UNTIL_CLOSE
    out = [head]
    pending = len(head)
    sent = 0
    trailers: Headers = ()
    while True:
        try:
            event = parser.next_event()
        except HttpError:
            if out:
                down.write(b"".join(out))
            return Streamed(False, sent, "upstream_reset" if up.lost else "upstream_protocol")
        if event is NEED_DATA:
            if out:
                down.write(b"".join(out))
                out.clear()
                pending = 0
            if down.lost:
                return Streamed(False, sent, "downstream_gone")
            if down.write_paused and not await drain(down, loop.time() + idle_timeout_s, watch=up):
                return Streamed(False, sent, "downstream_gone" if down.lost else "idle")
            up.want_data()
            if not await waker.wait(loop.time() + idle_timeout_s):
                return Streamed(False, sent, "idle")
            continue
        if isinstance(event, Data):
            data = event.data
            sent += len(data)
            if chunked:
                data = encode_chunk(data)
            out.append(data)
            pending += len(data)
            if pending >= FLUSH_BYTES:
                down.write(b"".join(out))
                out.clear()
                pending = 0
        elif isinstance(event, Trailers):
            trailers = event.headers
        elif isinstance(event, EndOfMessage):
            if until_close and up.error is not None:  # EOF without close_notify: truncated
                if out:
                    down.write(b"".join(out))
                return Streamed(False, sent, "upstream_reset")
            if chunked:
                out.append(encode_last_chunk(trailers))
            down.write(b"".join(out))
            return Streamed(True, sent)
        else:
            raise RuntimeError(f"unexpected {event!r} in a response body")


async def respond(
    pool: Pool,
    down: Channel[RequestParser],
    req: Request,
    rec: Record,
    conn: UpstreamConn,
    resp: Response,
    add: Headers,
    idle_timeout_s: float,
    *,
    close: bool = False,
) -> bool:
    """Send ``resp`` (its head was read from ``conn``) downstream with ``add``, stream
    its body, and give ``conn`` back to ``pool``. Returns whether the downstream
    connection may carry another request (not if ``close``: draining); raises ``Gone``
    when the client left."""
    rec.status = resp.status
    if resp.status == 101:
        return await tunnel(pool, down, conn, resp, add, idle_timeout_s)
    keep = req.keep_alive and not close
    out = resp
    chunk_out = resp.body is BodyKind.CHUNKED
    if resp.body is BodyKind.UNTIL_CLOSE:
        if req.version == "1.1":  # re-framed, so the client's connection stays reusable
            out = dataclasses.replace(resp, body=BodyKind.CHUNKED, version="1.1")
            chunk_out = True
        else:
            keep = False
    if add:
        names = {name for name, _ in add}
        if not names.isdisjoint([name for name, _ in out.headers]):  # ours replace theirs
            kept = ParsedHeaders([h for h in out.headers if h[0] not in names])
            out = dataclasses.replace(out, headers=kept)
    head = serialize_response(out, add=add, keep_alive=keep)
    streamed = await stream_response(
        conn.channel, down, resp, head, idle_timeout_s, chunk_out=chunk_out
    )
    rec.bytes_sent = streamed.body_bytes
    if streamed.complete:
        pool.release(conn, resp.keep_alive)
        return keep
    pool.discard(conn)
    if streamed.error == "downstream_gone":
        raise Gone("the client left during the response")
    rec.flags.append(
        ResponseFlag.UPSTREAM_PROTOCOL_ERROR
        if streamed.error == "upstream_protocol"
        else ResponseFlag.UPSTREAM_CONNECTION_TERMINATION
    )
    down.abort()  # the client sees the truncation as a reset, never as a short body
    return False


async def tunnel(
    pool: Pool,
    down: Channel[RequestParser],
    conn: UpstreamConn,
    resp: Response,
    add: Headers,
    idle_timeout_s: float,
) -> bool:
    """101 Switching Protocols (an Upgrade the client asked for): from now on the two
    connections are a byte relay, until either ends. The upstream connection is not
    pooled again."""
    up = conn.channel
    event = up.parser.next_event()
    if isinstance(event, EndOfMessage):  # a 101 ends at its head
        event = up.parser.next_event()
    if event is not SWITCHED:
        pool.discard(conn)
        down.abort()
        return False
    from_up = up.parser.switch_to_tunnel()
    from_down = down.parser.switch_to_tunnel()
    down.write(serialize_response(resp, add=add))
    if from_up:
        down.write(from_up)
    if from_down:
        up.write(from_down)
    relay = Relay(down.side, up.side, idle_timeout_s=idle_timeout_s)
    relay.start()
    await relay.done
    return False
