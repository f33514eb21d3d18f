"""The state an ``H2Connection`` shares among its parts, stream bookkeeping, and the send
path: HEADERS out, DATA framed from each stream's buffer as the peer's windows and our
transport allow, received data acknowledged, and everything h2 produced written out.

For: ``sidecar.h2conn.H2Connection`` (which adds the lifecycle and the transport callbacks)
and ``sidecar.h2_events.H2Events`` (what the peer sent). Writes are coalesced: inside a
transport callback everything goes out once at its end, otherwise once per loop turn.

Must never: frame DATA while the transport asks us to stop or beyond a flow-control
window, write after the connection is gone, or let a user callback's exception escape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes

from meshlet.runtime import Clock, SystemClock
from sidecar.h2_limits import FloodGuard, H2Limits
from sidecar.h2_stream import H2Error, H2Stream, SendHeaders
from sidecar.h2_wire import H2Stats, new_h2
from sidecar.relay import Side

log = logging.getLogger("sidecar.h2conn")


class H2Core:
    """Shared state and the send path (see the module docstring)."""

    def __init__(
        self,
        side: Side,
        *,
        client: bool,
        limits: H2Limits | None,
        clock: Clock | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._clock = clock or SystemClock()
        self.side = side
        self.client = client
        self.limits = limits or H2Limits()
        self.stats = H2Stats()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.close_reason: str | None = None
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        self._h2 = new_h2(client=client, limits=self.limits)
        self._guard = FloodGuard(self.limits)
        self._streams: dict[int, H2Stream] = {}
        self._sendq: dict[int, H2Stream] = {}  # streams with something to frame
        self._active_in = 0  # streams the peer opened, still in _streams
        self._active_out = 0
        self._goaway_last: int | None = None  # last stream id in the GOAWAY we sent
        self._peer_goaway_last: int | None = None
        self._dead = False  # no more frames are processed (closing or closed)
        self._lost = False  # the transport is gone
        self._write_paused = False
        self._in_callback = False
        self._flush_scheduled = False
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._drained: asyncio.Future[None] | None = None
        self._remote_settings_seen = False

    def _end(self, reason: str, code: int, *, goaway: bool) -> None:
        raise NotImplementedError  # H2Connection

    # -- stream bookkeeping ------------------------------------------------------------

    def _peer_initiated(self, sid: int) -> bool:
        return (sid % 2 == 1) != self.client

    def _count_opened(self) -> None:
        self.stats.streams_opened += 1
        if len(self._streams) > self.stats.max_active_streams:
            self.stats.max_active_streams = len(self._streams)

    # -- sending ---------------------------------------------------------------------------

    def _send_headers(self, stream: H2Stream, headers: SendHeaders, end_stream: bool) -> None:
        if stream.reset_code is not None or self._dead:
            return
        try:
            self._h2.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise H2Error(f"cannot send these headers on HTTP/2 stream {stream.id}: {e}") from e
        if end_stream:
            stream.local_ended = True
            self._maybe_done(stream)
        self._write_soon()

    def _queue_send(self, stream: H2Stream) -> None:
        if self._dead or stream.reset_code is not None:
            return
        self._sendq[stream.id] = stream
        self._write_soon()

    def _pump(self) -> None:
        """Frame buffered DATA round-robin, one frame per stream per pass, while the
        connection window lasts and the transport is not asking us to stop."""
        h = self._h2
        while self._sendq and not self._write_paused and not self._dead:
            progressed = False
            frame = h.max_outbound_frame_size
            for stream in list(self._sendq.values()):
                if self._dead:
                    return
                if stream.reset_code is not None:
                    self._sendq.pop(stream.id, None)
                    continue
                try:
                    n = self._frame_one(stream, frame)
                except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                    self._fail_stream(stream, ErrorCodes.STREAM_CLOSED, "remote")
                    continue
                except h2.exceptions.ProtocolError as e:  # e.g. trailers h2 refuses to send
                    log.warning("HTTP/2 stream %d: cannot send: %s; resetting it", stream.id, e)
                    self._reset_stream(stream, ErrorCodes.INTERNAL_ERROR, "local")
                    continue
                progressed = progressed or n > 0
            if data := h.data_to_send():
                self.side.write(data)
            if not progressed or h.outbound_flow_control_window <= 0:
                return

    def _frame_one(self, stream: H2Stream, frame: int) -> int:
        h, sid = self._h2, stream.id
        n = 0
        if stream.out_size:
            n = min(h.local_flow_control_window(sid), frame, stream.out_size)
            if n <= 0:
                return 0
            first = stream.out[0]
            if len(first) <= n:
                n = len(first)
                chunk = stream.out.popleft()
            else:
                chunk, stream.out[0] = first[:n], first[n:]
            stream.out_size -= n
            last = stream.out_size == 0 and stream.end_pending and stream.trailers_pending is None
            h.send_data(sid, chunk, end_stream=last)
            self.stats.bytes_sent += n
            if last:
                stream.local_ended = True
        if stream.out_size == 0:
            self._sendq.pop(sid, None)
            if stream.end_pending and not stream.local_ended:
                if stream.trailers_pending is not None:
                    h.send_headers(sid, stream.trailers_pending, end_stream=True)
                    stream.trailers_pending = None
                else:
                    h.end_stream(sid)
                stream.local_ended = True
        stream._sent(n)
        if stream.local_ended:
            self._maybe_done(stream)
        return n or 1  # ending a stream is progress too

    def _ack(self, sid: int, n: int) -> None:
        if n <= 0 or self._dead:
            return
        with contextlib.suppress(h2.exceptions.NoSuchStreamError):
            self._h2.acknowledge_received_data(n, sid)
        self._write_soon()

    def _write_soon(self) -> None:
        if self._in_callback or self._flush_scheduled or self._dead:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lost:
            return
        if self._sendq and not self._write_paused and not self._dead:
            self._pump()
        if data := self._h2.data_to_send():
            self.side.write(data)

    # -- stream endings ---------------------------------------------------------------------

    def _reset_stream(self, stream: H2Stream, code: int, reason: str) -> None:
        if stream.reset_code is not None:
            return
        if not self._dead:
            with contextlib.suppress(
                h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError
            ):
                self._h2.reset_stream(stream.id, code)
                self.stats.resets_sent += 1
            self._write_soon()
        self._fail_stream(stream, code, reason)

    def _fail_stream(self, stream: H2Stream, code: int, reason: str) -> None:
        self._sendq.pop(stream.id, None)
        if stream.reset_code is None:
            unacked = stream._deliver_reset(code, reason)
            self._ack(stream.id, unacked)
        self._forget(stream)

    def _maybe_done(self, stream: H2Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: H2Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        if self._peer_initiated(stream.id):
            self._active_in -= 1
        else:
            self._active_out -= 1
            self._wake_slot_waiters()
        stream._finished()
        self._check_drained()

    def _check_drained(self) -> None:
        if self._streams or self._dead:
            return
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        elif self._peer_goaway_last is not None and self._drained is None:
            self._end("goaway_received", ErrorCodes.NO_ERROR, goaway=self._goaway_last is None)

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- helpers -----------------------------------------------------------------------------

    def _call(self, stream: H2Stream, fn: Callable[..., object], *args: Any) -> None:
        """Run a user callback; an exception resets its stream instead of escaping."""
        try:
            fn(*args)
        except Exception:
            log.exception("HTTP/2 stream %d handler failed; resetting it", stream.id)
            self._reset_stream(stream, ErrorCodes.INTERNAL_ERROR, "local")

    def _peer(self) -> str:
        return str(getattr(self.side, "peername", None) or "?")
