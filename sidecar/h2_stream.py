"""One stream of an ``sidecar.h2conn.H2Connection``: what a proxy or a test sends and
receives on it, and ``splice``, which forwards one stream to another frame by frame.

For: the per-stream half of the contract documented in ``sidecar.h2conn``. Receiving is
push style (a ``StreamHandler`` gets headers, data, trailers, end, reset) or pull style
(``response()``, ``read()``) when no handler is set; either way received data is
acknowledged to the peer (WINDOW_UPDATE) only when the consumer says it has taken it
(``consumed(n)``; ``read()`` does it itself), so a slow consumer slows the sender.
Sending buffers in the stream and the connection frames DATA as the peer's windows and
our transport allow; ``on_sent`` and ``drain()`` tell the producer when it has left.
Received data nobody consumes holds the connection's window: in pull style read the body
to its end or ``reset()`` the stream (a reset gives the window back).

Must never: touch h2 or a transport itself (the connection does), deliver an event after
the stream was reset, or let a handler's exception escape into a transport callback.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from h2.errors import ErrorCodes

from meshlet.errors import MeshError

if TYPE_CHECKING:
    from sidecar.h2_core import H2Core
    from sidecar.h2conn import H2Connection

Headers = list[tuple[bytes, bytes]]  # as received: names lower-case, pseudo-headers first
SendHeaders = Sequence[tuple[bytes, bytes]] | Sequence[tuple[str, str]]


class H2Error(MeshError):
    """An HTTP/2 operation was refused (no stream slot, bad headers, stream finished)."""


class StreamResetError(H2Error):
    """The stream was reset; ``reason`` says by whom: "remote" (the peer's RST_STREAM),
    "local" (``reset()``), "refused" (over a limit, or above a GOAWAY's last stream: never
    processed, safe to retry), "headers" (a header list over the limits), "connection"
    (the connection ended or failed)."""

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        super().__init__(f"HTTP/2 stream {stream_id} was reset ({reason}, {_code_name(code)})")
        self.code = code
        self.reason = reason


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


class StreamHandler:
    """Receives a stream's events, in order, inside transport callbacks: return quickly.

    ``on_headers``: the response head (client role), ``stream.remote_ended`` already True
    when it ended the stream (then ``on_end`` follows). ``on_data``: call
    ``stream.consumed(len(data))`` once the data is gone on (the default does it at once).
    ``on_reset`` ends the stream; nothing follows it.
    """

    def on_informational(self, stream: H2Stream, headers: Headers) -> None:
        pass

    def on_headers(self, stream: H2Stream, headers: Headers) -> None:
        pass

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        stream.consumed(len(data))

    def on_trailers(self, stream: H2Stream, trailers: Headers) -> None:
        pass

    def on_end(self, stream: H2Stream) -> None:
        pass

    def on_reset(self, stream: H2Stream, code: int) -> None:
        pass


class H2Stream:
    """A request/response exchange. ``headers``: the head received (the request in the
    server role, the response in the client role; None until it came); ``trailers``
    likewise; ``informational``: how many 1xx heads came. ``remote_ended``: the peer sent
    END_STREAM. ``local_ended``: our END_STREAM left. ``reset_code``/``reset_reason``: set
    when it was reset (reason "refused", or "remote" with REFUSED_STREAM: never processed,
    safe to retry)."""

    __slots__ = (
        "_closed",
        "_conn",
        "_drain_waiter",
        "_end_delivered",
        "_handler",
        "_queue",
        "_unacked",
        "_waiter",
        "end_pending",
        "headers",
        "id",
        "informational",
        "local_ended",
        "on_sent",
        "out",
        "out_size",
        "remote_ended",
        "reset_code",
        "reset_reason",
        "trailers",
        "trailers_pending",
    )

    def __init__(self, conn: H2Core, stream_id: int, *, headers: Headers | None) -> None:
        self._conn = conn
        self.id = stream_id
        self.headers = headers
        self.trailers: Headers | None = None
        self.informational = 0  # 1xx heads received (each goes to on_informational)
        self.remote_ended = False
        self.local_ended = False
        self.reset_code: int | None = None
        self.reset_reason: str | None = None
        # Called with a byte count each time that much of the send buffer left as DATA.
        self.on_sent: Callable[[int], object] | None = None
        self._handler: StreamHandler | None = None
        self._queue: deque[bytes] = deque()  # pull style: received, not yet read
        self._unacked = 0  # delivered to the consumer, not yet consumed()
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._end_delivered = False
        # The send buffer, framed by the connection (see H2Connection._pump).
        self.out: deque[memoryview] = deque()
        self.out_size = 0
        self.end_pending = False  # END_STREAM goes after the buffer (and trailers)
        self.trailers_pending: SendHeaders | None = None

    def __repr__(self) -> str:
        return f"<H2Stream {self.id} {self.reset_reason or ''}>"

    @property
    def connection(self) -> H2Connection:
        return cast("H2Connection", self._conn)

    @property
    def done(self) -> bool:
        """Both directions finished, or reset."""
        return self.reset_code is not None or (self.local_ended and self.remote_ended)

    # -- sending -------------------------------------------------------------------------

    def send_headers(self, headers: SendHeaders, *, end_stream: bool = False) -> None:
        """The response head (server role), or an informational (1xx) one."""
        self._conn._send_headers(self, headers, end_stream)

    def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data``; it leaves as the peer's flow-control windows allow. The buffer
        is not bounded here: a producer waits for ``drain()`` or ``on_sent``. On a reset
        stream the data is dropped."""
        if self.reset_code is not None:
            return
        if self.end_pending or self.local_ended:
            raise H2Error(f"HTTP/2 stream {self.id}: data after the end of the stream")
        if data:
            self.out.append(memoryview(data))
            self.out_size += len(data)
        if end_stream:
            self.end_pending = True
        self._conn._queue_send(self)

    def end(self) -> None:
        self.send_data(b"", end_stream=True)

    def send_trailers(self, trailers: SendHeaders) -> None:
        """Trailers (gRPC's status) after the buffered data; they end the stream."""
        if self.reset_code is not None:
            return
        if self.end_pending or self.local_ended:
            raise H2Error(f"HTTP/2 stream {self.id}: trailers after the end of the stream")
        self.trailers_pending = trailers
        self.end_pending = True
        self._conn._queue_send(self)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM; the buffers are dropped and the handler hears ``on_reset``."""
        self._conn._reset_stream(self, code, "local")

    async def drain(self) -> None:
        """Wait until the send buffer is at most the low-water mark; raises
        ``StreamResetError`` if the stream is reset."""
        low = self._conn.limits.send_buffer_low_water
        while self.out_size > low and self.reset_code is None:
            if self._drain_waiter is None:
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        self._raise_if_reset()

    # -- receiving -----------------------------------------------------------------------

    def set_handler(self, handler: StreamHandler) -> None:
        """Deliver events to ``handler`` from now on, starting with what already came."""
        if self._handler is not None:
            raise H2Error(f"HTTP/2 stream {self.id} already has a handler")
        self._handler = handler
        call = self._conn._call
        if self.headers is not None and self._conn.client:
            call(self, handler.on_headers, self, self.headers)
        while self._queue and self._handler is handler:
            call(self, handler.on_data, self, self._queue.popleft())
        if self.trailers is not None:
            call(self, handler.on_trailers, self, self.trailers)
        if self.remote_ended and not self._end_delivered:
            self._end_delivered = True
            call(self, handler.on_end, self)
        if self.reset_code is not None:
            call(self, handler.on_reset, self, self.reset_code)

    def consumed(self, n: int) -> None:
        """The consumer took ``n`` bytes of received data: the peer may send that much more."""
        n = min(n, self._unacked)
        if n > 0:
            self._unacked -= n
            self._conn._ack(self.id, n)

    async def response(self) -> Headers:
        """Client role, pull style: the response head."""
        while self.headers is None:
            self._raise_if_reset()
            await self._wait()
        return self.headers

    async def read(self) -> bytes | None:
        """Pull style: the next chunk of the body (acknowledged to the peer), or None at
        its end (``trailers`` are then set, if any came)."""
        if self._handler is not None:
            raise H2Error(f"HTTP/2 stream {self.id} has a handler: read() is not available")
        while True:
            if self._queue:
                chunk = self._queue.popleft()
                self.consumed(len(chunk))
                return chunk
            self._raise_if_reset()
            if self.remote_ended:
                return None
            await self._wait()

    async def read_all(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """Pull style: the whole body; ``H2Error`` past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.read()) is not None:
            size += len(chunk)
            if size > limit:
                raise H2Error(f"HTTP/2 stream {self.id}: body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def wait_closed(self) -> None:
        """Until the stream is done (both ends, or reset); never raises."""
        if self.done:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    # -- called by the connection --------------------------------------------------------

    def _deliver_informational(self, headers: Headers) -> None:
        self.informational += 1
        if self._handler is not None:
            self._conn._call(self, self._handler.on_informational, self, headers)

    def _deliver_headers(self, headers: Headers, ended: bool) -> None:
        self.headers = headers
        self.remote_ended = self.remote_ended or ended
        if self._handler is not None:
            self._conn._call(self, self._handler.on_headers, self, headers)
        else:
            self._wake()

    def _deliver_data(self, data: bytes) -> None:
        self._unacked += len(data)
        if self._handler is not None:
            self._conn._call(self, self._handler.on_data, self, data)
        else:
            self._queue.append(data)
            self._wake()

    def _deliver_trailers(self, trailers: Headers) -> None:
        self.trailers = trailers
        self.remote_ended = True
        if self._handler is not None:
            self._conn._call(self, self._handler.on_trailers, self, trailers)

    def _deliver_end(self) -> None:
        self.remote_ended = True
        if self._handler is not None:
            if self._end_delivered:
                return
            self._end_delivered = True
            self._conn._call(self, self._handler.on_end, self)
        else:
            self._wake()

    def _deliver_reset(self, code: int, reason: str) -> int:
        """Mark reset; returns the received bytes nobody consumed (to acknowledge)."""
        self.reset_code, self.reset_reason = int(code), reason
        self.out.clear()
        self.out_size = 0
        self.trailers_pending = None
        unacked, self._unacked = self._unacked, 0
        self._queue.clear()
        self._wake()
        self._sent(0)
        if self._handler is not None:
            self._conn._call(self, self._handler.on_reset, self, int(code))
        return unacked

    def _sent(self, n: int) -> None:
        """``n`` bytes of the send buffer left as DATA (0: only wake drain waiters)."""
        if n and self.on_sent is not None:
            self._conn._call(self, self.on_sent, n)
        w = self._drain_waiter
        if w is not None and (
            self.out_size <= self._conn.limits.send_buffer_low_water or self.reset_code is not None
        ):
            self._drain_waiter = None
            if not w.done():
                w.set_result(None)

    def _finished(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        if self.done:
            self._finished()

    async def _wait(self) -> None:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def _raise_if_reset(self) -> None:
        if self.reset_code is not None:
            raise StreamResetError(self.id, self.reset_code, self.reset_reason or "remote")


class _Forward(StreamHandler):
    """Forwards what ``src`` receives to ``dst``; ``dst.on_sent`` acknowledges ``src``."""

    __slots__ = ("dst", "ended")

    def __init__(self, dst: H2Stream) -> None:
        self.dst = dst
        self.ended = False

    def on_informational(self, stream: H2Stream, headers: Headers) -> None:
        self.dst.send_headers(headers)

    def on_headers(self, stream: H2Stream, headers: Headers) -> None:
        self.ended = stream.remote_ended
        self.dst.send_headers(headers, end_stream=self.ended)

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        if self.dst.reset_code is not None:
            stream.consumed(len(data))
            return
        self.dst.send_data(data)

    def on_trailers(self, stream: H2Stream, trailers: Headers) -> None:
        self.ended = True
        self.dst.send_trailers(trailers)

    def on_end(self, stream: H2Stream) -> None:
        if not self.ended:
            self.ended = True
            self.dst.end()

    def on_reset(self, stream: H2Stream, code: int) -> None:
        if self.dst.reset_code is None:
            # The peer's own code crosses (a gRPC client's CANCEL stays CANCEL); our own
            # reasons (a dead connection, a limit) become CANCEL for the other side.
            self.dst.reset(code if stream.reset_reason == "remote" else ErrorCodes.CANCEL)


def splice(down: H2Stream, up: H2Stream) -> None:
    """Forward ``down`` (a server-role stream: the request) to ``up`` (a client-role
    stream the caller opened with the request head and ``end_stream=down.remote_ended``)
    and the response back: headers, data, trailers, end and resets, frame by frame, with
    flow control coupled both ways (data is acknowledged to one peer only once the other
    leg framed it)."""
    request = _Forward(up)
    request.ended = down.remote_ended  # the head already carried END_STREAM
    up.on_sent = down.consumed
    down.on_sent = up.consumed
    up.set_handler(_Forward(down))
    down.set_handler(request)
