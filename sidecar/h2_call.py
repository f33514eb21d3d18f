"""One HTTP/2 request through a sidecar: the downstream stream, the upstream try under
way, the copy of the request body kept for a replay, the response sent back, the
proxy's own replies, and the request's record. ``sidecar.h2_outbound`` and
``sidecar.h2_inbound`` subclass ``Call`` with their policy: where a try goes, and what
a response head or a failed try leads to.

For: frames cross as they come (a request body is never waited for, so streaming gRPC
works both ways) with flow control coupled in each direction, as ``h2_stream.splice``
does: request data is acknowledged to the client only once the current try's stream
has sent it, response data to the upstream only once the client's stream has. While
the request body so far fits in ``copy_limit`` bytes it is also kept, so a try that
fails before its response head can be replaced by one that starts again from the first
byte and then carries on with the stream; acknowledgements count bytes by their offset
in the body, so a replayed byte is never acknowledged twice. With no try open (a
connect or a backoff under way) received data is kept whatever its size: the stream's
flow-control window bounds it. Everything runs in the connections' callbacks and timers:
no task per request or per frame.

Must never: send anything downstream from a try other than the committed one, send a
second response head, acknowledge request data no try has sent (unless the request
will never be forwarded), or finish a record twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from h2.errors import ErrorCodes

from meshlet.model import Endpoint
from sidecar.accesslog import ResponseFlag
from sidecar.accesslog_sink import AccessLogSink
from sidecar.h2_headers import (
    GRPC_FOR_HTTP,
    GRPC_UNKNOWN,
    Headers,
    RequestHead,
    grpc_status_of,
    local_reply,
    status_of,
    with_fields,
)
from sidecar.h2_stream import H2Error, H2Stream, StreamHandler
from sidecar.h2conn import H2Connection
from sidecar.l7_record import Record, finish, text
from sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

PROTOCOL = "HTTP/2"


def new_record(rec: Record, head: RequestHead) -> Record:
    """``rec`` filled from an HTTP/2 request head."""
    rec.method, rec.path, rec.protocol = head.method, head.path, PROTOCOL
    rec.authority = head.authority
    rec.user_agent = text(head.lookup.get(b"user-agent"))
    return rec


class Try(StreamHandler):
    """One upstream attempt of a ``Call``: its stream (None while connecting), the
    request bytes it has sent, and what its owner reports about it. Events of a try that
    is no longer the call's current one are dropped (its stream was reset)."""

    __slots__ = ("call", "endpoint", "reported", "reused", "sent", "started", "up")

    def __init__(self, call: Call, started: float, endpoint: Endpoint | None = None) -> None:
        self.call = call
        self.started = started
        self.endpoint = endpoint
        self.up: H2Stream | None = None
        self.sent = 0
        self.reported = False  # told to the balancer and outlier detector
        self.reused = False  # opened on a connection that had carried streams before

    def on_sent(self, n: int) -> None:
        """``n`` more request bytes left on this try: acknowledge the new ones."""
        self.sent += n
        call = self.call
        if call.try_ is self and self.sent > call.acked:
            call.down.consumed(self.sent - call.acked)
            call.acked = self.sent

    def on_informational(self, stream: H2Stream, headers: Headers) -> None:
        if self.call.try_ is self and not self.call.committed:
            self.call.down.send_headers(headers)

    def on_headers(self, stream: H2Stream, headers: Headers) -> None:
        if self.call.try_ is self and not self.call.committed:
            self.call.on_response_head(self, headers)

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        call = self.call
        if call.try_ is self and call.committed and call.down.reset_code is None:
            call.rec.bytes_sent += len(data)
            call.down.send_data(data)  # acknowledged upstream as it leaves (down.on_sent)
        else:
            stream.consumed(len(data))

    def on_trailers(self, stream: H2Stream, trailers: Headers) -> None:
        call = self.call
        if call.try_ is self and call.committed and not call.resp_ended:
            call.resp_ended = True
            call.grpc_status = grpc_status_of(trailers)
            call.down.send_trailers(trailers)
            call._finish()

    def on_end(self, stream: H2Stream) -> None:
        call = self.call
        if call.try_ is self and call.committed and not call.resp_ended:
            call.resp_ended = True
            call.down.end()
            call._finish()

    def on_reset(self, stream: H2Stream, code: int) -> None:
        if self.call.try_ is self:
            self.call._upstream_reset(self, code, stream.reset_reason or "remote")


class Call(StreamHandler):
    """A downstream request stream and its tries (see the module docstring). Subclasses
    implement ``start`` (scheduled right after the stream arrived: a client's reset that
    came in the same read is seen before anything goes upstream) and ``on_try_failed``,
    and may override ``on_response_head``, ``on_abandoned`` and ``on_finished``."""

    __slots__ = (
        "acked",
        "body",
        "committed",
        "copy_limit",
        "discarding",
        "down",
        "finished",
        "grpc",
        "grpc_status",
        "head",
        "loop",
        "metrics",
        "rec",
        "received",
        "req_ended",
        "req_trailers",
        "resp_ended",
        "sink",
        "timer",
        "try_",
    )

    def __init__(
        self,
        down: H2Stream,
        rec: Record,
        head: RequestHead,
        *,
        copy_limit: int,
        metrics: SidecarMetrics,
        sink: AccessLogSink,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.down = down
        self.rec = rec
        self.head = head
        self.grpc = head.grpc
        self.grpc_status: int | None = None  # of the response (trailers, or trailers-only)
        self.copy_limit = copy_limit
        self.metrics = metrics
        self.sink = sink
        self.loop = loop
        self.try_: Try | None = None
        self.body: list[bytes] | None = []  # the request body so far, while it is kept
        self.received = 0  # request body bytes received
        self.acked = 0  # ... and acknowledged to the client
        self.req_ended = down.remote_ended
        self.req_trailers: Headers | None = None
        self.committed = False  # a response head went downstream (or a local reply)
        self.resp_ended = False
        self.discarding = False  # the request will not be forwarded: take and drop it
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None
        down.set_handler(self)

    # -- what subclasses provide ---------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def on_response_head(self, t: Try, headers: Headers) -> None:
        self.commit(t, headers)

    def on_try_failed(self, t: Try, code: int, reason: str) -> None:
        """``t``'s stream was reset before its response head (``reason`` as
        ``StreamResetError``'s); ``t`` is no longer current."""
        raise NotImplementedError

    def on_abandoned(self, t: Try) -> None:
        """The client left while ``t`` waited for its response head."""

    def on_finished(self) -> None:
        """The request is over (answered, failed or abandoned), just before its record."""

    # -- the downstream stream (this is its handler) ------------------------------------------

    def on_data(self, stream: H2Stream, data: bytes) -> None:
        n = len(data)
        self.received += n
        if self.discarding:
            self.acked += n
            stream.consumed(n)
            return
        t = self.try_
        up = t.up if t is not None else None
        if up is not None:
            up.send_data(data)
            if self.body is not None:
                if self.received <= self.copy_limit:
                    self.body.append(data)
                else:
                    self.body = None
        elif self.body is not None:
            self.body.append(data)  # no stream to send it on yet: keep it whole
        else:  # unreachable: without a copy no try is started again
            self.acked += n
            stream.consumed(n)

    def on_trailers(self, stream: H2Stream, trailers: Headers) -> None:
        self.req_ended = True
        self.req_trailers = trailers
        t = self.try_
        if t is not None and t.up is not None and not self.discarding:
            t.up.send_trailers(trailers)

    def on_end(self, stream: H2Stream) -> None:
        if self.req_trailers is not None:
            return  # the trailers ended it
        self.req_ended = True
        t = self.try_
        if t is not None and t.up is not None and not self.discarding:
            t.up.end()

    def on_reset(self, stream: H2Stream, code: int) -> None:
        """The client reset the stream, or its connection ended."""
        self.cancel_timer()
        t, self.try_ = self.try_, None
        self.discarding = True
        if t is not None:
            if t.up is not None:
                # The client's own code crosses (a gRPC CANCEL stays CANCEL).
                t.up.reset(code if stream.reset_reason == "remote" else ErrorCodes.CANCEL)
            if not self.committed:
                self.on_abandoned(t)
        if not self.finished:
            self.rec.flags.append(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            self._finish()

    # -- tries ---------------------------------------------------------------------------------

    def open_try(self, t: Try, conn: H2Connection, headers: Headers) -> bool:
        """Open ``t``'s stream on ``conn`` (which has room) and send the body held so far;
        False if the connection refused the stream."""
        body = self.body
        assert body is not None, "a try needs the whole body so far"
        end_now = self.req_ended and self.req_trailers is None and self.received == 0
        try:
            up = conn.open_stream(headers, end_stream=end_now)
        except H2Error as e:
            log.warning("cannot open an upstream HTTP/2 stream: %s", e)
            return False
        t.up = up
        t.reused = conn.stats.streams_opened > 1
        up.on_sent = t.on_sent
        for chunk in body:
            up.send_data(chunk)
        if self.req_ended and not end_now:
            if self.req_trailers is not None:
                up.send_trailers(self.req_trailers)
            else:
                up.end()
        if self.received > self.copy_limit:
            self.body = None
        up.set_handler(t)
        return True

    def commit(self, t: Try, headers: Headers, fields: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """``t``'s response head goes downstream (with ``fields`` set); from now on its
        stream is spliced to the client's."""
        up = t.up
        assert up is not None
        self.committed = True
        self.cancel_timer()
        self.down.on_sent = up.consumed
        ended = up.remote_ended
        self.rec.status = status_of(headers)
        if ended:
            self.resp_ended = True
            self.grpc_status = grpc_status_of(headers)
        self.down.send_headers(
            with_fields(headers, fields) if fields else headers, end_stream=ended
        )
        if ended:
            self._finish()

    def _upstream_reset(self, t: Try, code: int, reason: str) -> None:
        self.try_ = None
        if not self.committed:
            self.cancel_timer()
            self.on_try_failed(t, code, reason)
            return
        if self.resp_ended:
            # The upstream finished answering and stops reading the rest of the request:
            # tell the client to stop too, once the whole response has left.
            self.discard()
            down = self.down
            if down.local_ended and not down.remote_ended:
                down.reset(ErrorCodes.NO_ERROR)
            return
        self.rec.flags.append(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION)
        self.reset_downstream(code if reason == "remote" else ErrorCodes.CANCEL)

    # -- endings ---------------------------------------------------------------------------------

    def reply(
        self,
        status: int,
        message: str,
        flag: ResponseFlag | None = None,
        fields: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """The proxy's own answer (before any response head went downstream)."""
        if self.finished or self.committed:
            return
        self.committed = self.resp_ended = True
        self.cancel_timer()
        self.try_ = None
        if flag is not None:
            self.rec.flags.append(flag)
        self.rec.status = status
        head, body = local_reply(
            status, message, grpc=self.grpc, head_only=self.head.method == "HEAD", fields=fields
        )
        if self.grpc:
            self.grpc_status = GRPC_FOR_HTTP.get(status, GRPC_UNKNOWN)
        self.discard()
        self.down.send_headers(head, end_stream=body is None)
        if body is not None:
            self.down.send_data(body, end_stream=True)
        self._finish()

    def reset_downstream(self, code: int) -> None:
        """End the exchange with a reset of the client's stream (its record first)."""
        self.try_ = None
        self.discarding = True
        self._finish()
        self.down.reset(code)

    def discard(self) -> None:
        """The request will not be forwarded (any more): what came and what comes is
        acknowledged and dropped."""
        self.discarding = True
        self.body = None
        if self.received > self.acked:
            self.down.consumed(self.received - self.acked)
            self.acked = self.received

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.cancel_timer()
        try:
            self.on_finished()
        except Exception:
            log.exception("HTTP/2 request bookkeeping failed")
        rec = self.rec
        rec.bytes_received = self.received
        if self.grpc:
            rec.grpc_status = self.grpc_status
        finish(rec, self.metrics, self.sink, self.loop.time())
        if self.grpc and self.grpc_status is not None:
            self.metrics.grpc_response(
                rec.direction.value, rec.service, rec.route, self.grpc_status
            )


async def close_when_idle(conn: H2Connection, idle_s: float) -> None:
    """Until ``conn`` closes; it is closed (GOAWAY) after ``idle_s`` without a stream."""
    seen = -1
    while not conn.closed.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(conn.closed), idle_s)
            return
        opened = conn.stats.streams_opened
        if conn.active_streams == 0 and opened == seen:
            conn.close()
        seen = opened


def count_error(metrics: SidecarMetrics, direction: str, conn: H2Connection) -> None:
    """Count a connection we ended with an error GOAWAY (a flood, a protocol error)."""
    if conn.goaway_sent not in (None, ErrorCodes.NO_ERROR):
        metrics.h2_connection_errors.labels(direction, conn.close_reason or "unknown").inc()
