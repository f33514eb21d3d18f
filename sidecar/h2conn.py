"""The HTTP/2 connection layer of the L7 proxy: h2 (sans-IO) driven from a relay ``Side``.

For: every HTTP/2 leg (h2c from the app, h2 over mTLS between sidecars, h2c to a gRPC
app). ``H2Connection`` is the ``relay.Peer`` of one ``Side`` (``PlainSide`` or a
``TlsLeg`` after its handshake), so it works over plain TCP and mTLS alike; h2 does all
framing and HPACK, this module decides, and writes what h2 produced.

Contract (for the proxy):

- ``conn = H2Connection(side, client=..., limits=H2Limits(), clock=SystemClock(),
  on_stream=cb)``, then ``conn.start()`` (sends our SETTINGS, starts reading).
  Server role: ``on_stream(stream)`` is called with each new request stream
  (``stream.headers`` holds the request head; ``stream.remote_ended`` whether it had no
  body); it must set a handler at once or read in pull style. Client role:
  ``stream = conn.open_stream(headers, end_stream=False, handler=None)``; ``H2Error``
  when ``can_open_stream()`` is False (peer's MAX_CONCURRENT_STREAMS reached, or a
  GOAWAY either way); ``await conn.stream_slot()`` waits for one.
- ``H2Stream`` (``sidecar.h2_stream``): ``send_headers``, ``send_data`` (buffered,
  framed as the peer's windows allow; ``on_sent(n)`` / ``await drain()`` report
  progress), ``send_trailers``, ``end``, ``reset(code)``; receiving via a
  ``StreamHandler`` (``on_informational``, ``on_headers``, ``on_data``, ``on_trailers``,
  ``on_end``, ``on_reset``) with ``consumed(n)`` acknowledging data, or pull style
  (``response()``, ``read()``, ``read_all()``). ``splice(down, up)`` forwards one stream
  to another with flow control coupled both ways.
- ``await conn.shutdown(grace_s)``: GOAWAY(NO_ERROR), open streams may finish until the
  deadline, then the rest are reset and the connection closes. A GOAWAY received: no new
  streams; our streams above its last stream id end with reason "refused" (retryable).
- ``conn.closed`` (a future, resolves with None when the transport is gone),
  ``conn.close_reason``, ``conn.goaway_sent``/``goaway_received`` (error codes),
  ``conn.stats`` (``H2Stats``), ``close()``, ``abort()``.
- Keepalive: a PING after ``ping_interval_s`` without a frame from the peer; no ACK within
  ``ping_timeout_s`` ends the connection ("ping_timeout").

Limits (``sidecar.h2_limits``; the accounting there is pure): a header list over 100
fields or 60 KiB resets its stream (PROTOCOL_ERROR: HTTP/2's 431); a peer stream beyond
MAX_CONCURRENT_STREAMS (100), or above our GOAWAY, gets REFUSED_STREAM; rapid reset,
SETTINGS/PING/empty-frame floods, a peer that makes us write without reading, and a header
block over 16 CONTINUATIONs or 128 KiB end the connection with GOAWAY ENHANCE_YOUR_CALM;
HPACK decoding stops past 120 KiB (HPACK bomb: GOAWAY ENHANCE_YOUR_CALM, from h2); a
frame longer than our MAX_FRAME_SIZE ends it with FRAME_SIZE_ERROR. After a GOAWAY for an
error we stop reading frames, send FIN and drain the peer for ``linger_s`` before closing,
so the peer can read the GOAWAY instead of a reset.

The parts: ``sidecar.h2_wire`` (h2's configuration, and the two h2 4.x behaviours
adjusted: GOAWAY, python-hyper/h2#1181, and the concurrent-stream check),
``sidecar.h2_core`` (shared state, stream bookkeeping, the send path),
``sidecar.h2_events`` (what the peer sent, judged by the limits), this module (lifecycle,
transport callbacks, endings, keepalive).

Must never: hand-write HTTP/2 framing or HPACK, raise out of a transport callback, buffer
received data beyond the flow-control windows we granted, or keep reading frames from a
peer after deciding to end the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import h2.events as ev
import h2.exceptions
from h2.errors import ErrorCodes

from meshlet.runtime import Clock
from sidecar.h2_core import log
from sidecar.h2_events import H2Events
from sidecar.h2_limits import H2Limits
from sidecar.h2_stream import (
    H2Error,
    H2Stream,
    SendHeaders,
    StreamHandler,
    StreamResetError,
    splice,
)
from sidecar.h2_wire import H2Stats, protocol_error_reason
from sidecar.relay import Side

__all__ = [
    "H2Connection",
    "H2Error",
    "H2Limits",
    "H2Stats",
    "H2Stream",
    "StreamHandler",
    "StreamResetError",
    "splice",
]
# Streams we open before the peer's SETTINGS told us its limit (RFC 9113 §6.5.2: it
# should not be below 100).
ASSUMED_PEER_MAX_STREAMS = 100
_PEER_CLOSE_GRACE_S = 5.0  # a graceful close that cannot flush is aborted after this


class H2Connection(H2Events):
    """One HTTP/2 connection over a ``Side``; see the module docstring."""

    def __init__(
        self,
        side: Side,
        *,
        client: bool,
        limits: H2Limits | None = None,
        clock: Clock | None = None,
        on_stream: Callable[[H2Stream], object] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not client and on_stream is None:
            raise ValueError("a server-role H2Connection needs on_stream")
        super().__init__(side, client=client, limits=limits, clock=clock, loop=loop)
        self._on_stream = on_stream
        self._dispatch = self._dispatch_table()
        self._started = False
        self._last_rx = self._loop.time()
        self._ka_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._ping_ids = itertools.count(1)
        self._close_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Send the preface and SETTINGS, open the connection window, start reading."""
        if self._started:
            raise RuntimeError("H2Connection already started")
        self._started = True
        h = self._h2
        h.initiate_connection()
        extra = self.limits.connection_window_size - h.inbound_flow_control_window
        if extra > 0:
            h.increment_flow_control_window(extra)
        self.side.write(h.data_to_send())
        self._in_callback = True
        try:
            self.side.attach(self)  # early data (a client's preface) is delivered here
        finally:
            self._in_callback = False
        self._flush()
        self.side.resume_reading()  # also when ending already: the peer is drained
        if self.limits.ping_interval_s is not None and not self._dead:
            self._ka_timer = self._loop.call_later(self.limits.ping_interval_s, self._keepalive)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """GOAWAY(NO_ERROR); wait up to ``grace_s`` for open streams, reset the rest, close."""
        grace = self.limits.shutdown_grace_s if grace_s is None else grace_s
        if not self._dead and self._goaway_last is None:
            self._send_goaway(ErrorCodes.NO_ERROR)
            self._flush()
        if not self._dead and self._streams:
            self._drained = self._drained or self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), grace)
        if not self._dead:
            self._end("shutdown", ErrorCodes.NO_ERROR, goaway=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), self.limits.linger_s + 1.0)
        if not self.closed.done():
            self.abort()

    def close(self) -> None:
        """Now: GOAWAY(NO_ERROR), open streams reset, the connection closed."""
        self._end("closed", ErrorCodes.NO_ERROR, goaway=self._goaway_last is None)

    def abort(self) -> None:
        """Now, without a GOAWAY: the transport is reset."""
        if not self._dead:
            self._die("aborted", ErrorCodes.CANCEL)
        self.side.abort()

    # -- state the proxy reads -------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def tracked_streams(self) -> int:
        """Streams held in memory, ours and h2's (bounded by the limits)."""
        return len(self._streams) + len(self._h2.streams)

    def can_open_stream(self) -> bool:
        if not self.client or self._dead:
            return False
        if self._goaway_last is not None or self._peer_goaway_last is not None:
            return False
        peer_max = self._h2.remote_settings.max_concurrent_streams
        if not self._remote_settings_seen:  # until the peer's SETTINGS: RFC 9113's floor
            peer_max = min(peer_max, ASSUMED_PEER_MAX_STREAMS)
        return self._active_out < peer_max

    async def stream_slot(self) -> None:
        """Wait until ``open_stream`` may be called; ``H2Error`` if it never can again."""
        while not self.can_open_stream():
            if self._dead or self._goaway_last is not None or self._peer_goaway_last is not None:
                raise H2Error(f"HTTP/2 connection is closing ({self.close_reason or 'goaway'})")
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            await fut

    def open_stream(
        self,
        headers: SendHeaders,
        *,
        end_stream: bool = False,
        handler: StreamHandler | None = None,
    ) -> H2Stream:
        """Client role: a new stream with the request head."""
        if not self.can_open_stream():
            why = "not a client" if not self.client else (self.close_reason or "no stream slot")
            raise H2Error(f"cannot open an HTTP/2 stream: {why}")
        h = self._h2
        sid = h.get_next_available_stream_id()
        stream = H2Stream(self, sid, headers=None)
        try:
            h.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise H2Error(f"cannot send these request headers over HTTP/2: {e}") from e
        self._streams[sid] = stream
        self._active_out += 1
        self._count_opened()
        stream.local_ended = end_stream
        if handler is not None:
            stream.set_handler(handler)
        self._write_soon()
        return stream

    # -- relay.Peer (inside transport callbacks) --------------------------------------------

    def on_data(self, side: Side, data: bytes) -> None:
        if self._dead:
            return  # lingering after a GOAWAY: read and drop
        self._last_rx = self._loop.time()
        self.stats.wire_bytes_received += len(data)
        self._in_callback = True
        try:
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                reason = protocol_error_reason(e)
                log.info("HTTP/2 peer %s: %s (%s)", self._peer(), reason, e)
                self.goaway_sent = int(e.error_code)  # h2 queued the GOAWAY
                self._end(reason, e.error_code, goaway=False)
                return
            self._handle(events)
            if not self._dead:
                self._check_buffers()
        except Exception:  # a bug must not escape into the transport
            log.exception("HTTP/2 connection with %s failed", self._peer())
            self._end("internal_error", ErrorCodes.INTERNAL_ERROR, goaway=True)
        finally:
            self._in_callback = False
            self._flush()
        if not self._dead and (flood := self._guard.backlog(self.side.get_write_buffer_size())):
            self._flood(flood)

    def on_eof(self, side: Side) -> None:
        if not self._dead:
            self._die("eof", ErrorCodes.CANCEL)
        self.side.close()
        self._arm_close_timer()

    def on_closed(self, side: Side, exc: BaseException | None) -> None:
        self._lost = True
        if not self._dead:
            self._die("reset" if exc is not None else "closed", ErrorCodes.CANCEL)
        for t in (self._ka_timer, self._ping_timer, self._close_timer):
            if t is not None:
                t.cancel()
        self._wake_slot_waiters()
        if not self.closed.done():
            self.closed.set_result(None)

    def on_pause_writing(self, side: Side) -> None:
        self._write_paused = True

    def on_resume_writing(self, side: Side) -> None:
        self._write_paused = False
        if self._sendq:
            self._write_soon()

    # -- endings ---------------------------------------------------------------------------

    def _send_goaway(self, code: int) -> None:
        last = self._h2.highest_inbound_stream_id
        if self._goaway_last is not None:
            last = min(last, self._goaway_last)
        self._goaway_last = last
        self.goaway_sent = int(code)
        self._h2.close_connection(error_code=code, last_stream_id=last)
        self._wake_slot_waiters()

    def _die(self, reason: str, code: int) -> None:
        """Stop processing frames; every open stream ends with reason "connection"."""
        self._dead = True
        self.close_reason = self.close_reason or reason
        self._sendq.clear()
        for stream in list(self._streams.values()):
            self._fail_stream(stream, code, "connection")
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._wake_slot_waiters()

    def _end(self, reason: str, code: int, *, goaway: bool) -> None:
        """End the connection: maybe a GOAWAY, then FIN; the peer is drained (read and
        dropped) for ``linger_s`` so that it can read our GOAWAY, then the socket closes."""
        if self._dead:
            return
        if goaway and not self._lost:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._send_goaway(code)
        self._die(reason, code)
        if self._lost:
            return
        if data := self._h2.data_to_send():
            self.side.write(data)
        self.side.write_eof()
        if self._ka_timer is not None:
            self._ka_timer.cancel()
        self._close_timer = self._loop.call_later(self.limits.linger_s, self._linger_over)

    def _linger_over(self) -> None:
        self._close_timer = None
        if self.side.get_write_buffer_size():
            self.side.abort()  # the peer did not even read what we sent
        else:
            self.side.close()
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._lost:
            self._close_timer = self._loop.call_later(_PEER_CLOSE_GRACE_S, self.side.abort)

    # -- keepalive -------------------------------------------------------------------------

    def _keepalive(self) -> None:
        interval = self.limits.ping_interval_s
        self._ka_timer = None
        if self._dead or interval is None:
            return
        idle = self._loop.time() - self._last_rx
        if self._ping_payload is not None:  # one PING at a time; _ping_lost decides
            idle = 0.0
        elif idle >= interval:
            self._ping_payload = next(self._ping_ids).to_bytes(8, "big")
            self._h2.ping(self._ping_payload)
            self.stats.pings_sent += 1
            self._write_soon()
            self._ping_timer = self._loop.call_later(self.limits.ping_timeout_s, self._ping_lost)
            idle = 0.0
        self._ka_timer = self._loop.call_later(max(interval - idle, 0.05), self._keepalive)

    def _ping_lost(self) -> None:
        self._ping_timer = None
        if not self._dead:
            log.info("HTTP/2 peer %s did not answer a PING: closing", self._peer())
            self._end("ping_timeout", ErrorCodes.NO_ERROR, goaway=True)

    def _on_ping_ack(self, e: ev.PingAckReceived) -> None:
        if self._ping_payload is not None and e.ping_data == self._ping_payload:
            self._ping_payload = None
            if self._ping_timer is not None:
                self._ping_timer.cancel()
                self._ping_timer = None
