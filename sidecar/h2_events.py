"""What the peer sent: h2's events turned into stream events, and the limits that judge
them (``sidecar.h2_limits`` decides, this module acts).

For: ``sidecar.h2conn.H2Connection``. New peer streams are counted, checked (GOAWAY'd
ids, header lists, concurrency) and handed to ``on_stream``; headers, data, trailers,
ends and resets go to their ``H2Stream``; SETTINGS, PING, empty and unknown frames are
rated; what h2 buffers between reads is capped. A stream's fault resets that stream, a
flood ends the connection with GOAWAY ENHANCE_YOUR_CALM.

Must never: hand an event to a stream after it was reset, leave flow-control window
unreturned for data nobody will read, or keep processing events once the connection is
ending.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import h2.events as ev
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar.h2_core import H2Core, log
from sidecar.h2_limits import Flood, header_problem
from sidecar.h2_stream import H2Stream, Headers, _code_name
from sidecar.h2_wire import buffered

MAX_INFORMATIONAL = 16  # 1xx heads before the final one, per stream (each is memory and work)


class H2Events(H2Core):
    """Event handling (see the module docstring)."""

    _on_stream: Callable[[H2Stream], object] | None
    _dispatch: dict[type[ev.Event], Callable[[Any], None]]

    def _dispatch_table(self) -> dict[type[ev.Event], Callable[[Any], None]]:
        return {
            ev.RequestReceived: self._on_request,
            ev.ResponseReceived: self._on_response,
            ev.InformationalResponseReceived: self._on_informational,
            ev.TrailersReceived: self._on_trailers,
            ev.DataReceived: self._on_data,
            ev.StreamEnded: self._on_stream_ended,
            ev.StreamReset: self._on_stream_reset,
            ev.WindowUpdated: self._on_window_updated,
            ev.RemoteSettingsChanged: self._on_remote_settings,
            ev.PingReceived: self._on_ping,
            ev.PingAckReceived: self._on_ping_ack,
            ev.ConnectionTerminated: self._on_goaway,
            ev.PriorityUpdated: self._on_empty_frame,
            ev.UnknownFrameReceived: self._on_empty_frame,
        }

    def _on_ping_ack(self, e: ev.PingAckReceived) -> None:
        raise NotImplementedError  # H2Connection (keepalive)

    def _handle(self, events: list[ev.Event]) -> None:
        dispatch = self._dispatch
        prev: Any = None
        for e in events:
            if self._dead:
                return
            if isinstance(e, ev.PriorityUpdated) and getattr(prev, "priority_updated", None) is e:
                continue  # the priority part of a HEADERS frame
            fn = dispatch.get(type(e))
            if fn is not None:
                fn(e)
            prev = e

    def _on_request(self, e: ev.RequestReceived) -> None:
        sid = e.stream_id
        headers = e.headers
        if (flood := self._guard.stream_opened(self._clock.monotonic())) is not None:
            self._flood(flood)
            return
        if self._goaway_last is not None and sid > self._goaway_last:
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, counts=False)
            return
        if header_problem(headers, self.limits) is not None:
            self.stats.streams_rejected += 1
            self._refuse(sid, ErrorCodes.PROTOCOL_ERROR, counts=True)
            return
        if self._active_in >= self.limits.max_concurrent_streams:
            self.stats.streams_refused += 1
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, counts=True)
            return
        stream = H2Stream(self, sid, headers=headers)
        stream.remote_ended = e.stream_ended is not None
        self._streams[sid] = stream
        self._active_in += 1
        self._count_opened()
        assert self._on_stream is not None
        self._call(stream, self._on_stream, stream)

    def _on_response(self, e: ev.ResponseReceived) -> None:
        stream = self._streams.get(e.stream_id)
        if stream is not None and self._headers_ok(stream, e.headers):
            stream._deliver_headers(e.headers, e.stream_ended is not None)

    def _on_informational(self, e: ev.InformationalResponseReceived) -> None:
        stream = self._streams.get(e.stream_id)
        if stream is None or not self._headers_ok(stream, e.headers):
            return
        if stream.informational >= MAX_INFORMATIONAL:
            log.info("HTTP/2 peer %s, stream %d: endless 1xx heads", self._peer(), stream.id)
            self.stats.streams_rejected += 1
            self._reset_stream(stream, ErrorCodes.PROTOCOL_ERROR, "headers")
            return
        stream._deliver_informational(e.headers)

    def _on_trailers(self, e: ev.TrailersReceived) -> None:
        stream = self._streams.get(e.stream_id)
        if stream is not None and self._headers_ok(stream, e.headers):
            stream._deliver_trailers(e.headers)

    def _headers_ok(self, stream: H2Stream, headers: Headers) -> bool:
        problem = header_problem(headers, self.limits)
        if problem is None:
            return True
        log.info("HTTP/2 peer %s, stream %d: %s", self._peer(), stream.id, problem)
        self.stats.streams_rejected += 1
        self._reset_stream(stream, ErrorCodes.PROTOCOL_ERROR, "headers")
        return False

    def _on_data(self, e: ev.DataReceived) -> None:
        data, sid = e.data, e.stream_id
        n = e.flow_controlled_length
        self.stats.bytes_received += len(data)
        stream = self._streams.get(sid)
        if stream is None or stream.reset_code is not None:
            self._ack(sid, n)  # a stream we refused or reset: give the window back
            return
        if n > len(data):
            self._ack(sid, n - len(data))  # padding
        if data:
            stream._deliver_data(data)
        elif e.stream_ended is None:
            self._on_empty_frame(e)

    def _on_stream_ended(self, e: ev.StreamEnded) -> None:
        stream = self._streams.get(e.stream_id)
        if stream is not None and stream.reset_code is None:
            stream._deliver_end()
            self._maybe_done(stream)

    def _on_stream_reset(self, e: ev.StreamReset) -> None:
        stream = self._streams.get(e.stream_id)
        if e.remote_reset:
            self.stats.resets_received += 1
            now = self._clock.monotonic()
            if self._peer_initiated(e.stream_id) and (flood := self._guard.stream_reset(now)):
                self._flood(flood)
                return
        else:
            self.stats.resets_sent += 1  # h2 reset it: the peer broke the stream's rules
        if stream is not None:
            self._fail_stream(stream, e.error_code, "remote" if e.remote_reset else "protocol")

    def _on_window_updated(self, e: ev.WindowUpdated) -> None:
        if self._sendq:
            self._write_soon()

    def _on_remote_settings(self, e: ev.RemoteSettingsChanged) -> None:
        if (flood := self._guard.settings(self._clock.monotonic())) is not None:
            self._flood(flood)
            return
        self._remote_settings_seen = True
        if SettingCodes.MAX_CONCURRENT_STREAMS in e.changed_settings:
            self._wake_slot_waiters()
        if self._sendq:
            self._write_soon()

    def _on_ping(self, e: ev.PingReceived) -> None:
        if (flood := self._guard.ping(self._clock.monotonic())) is not None:
            self._flood(flood)

    def _on_empty_frame(self, e: ev.Event) -> None:
        if (flood := self._guard.empty_frame(self._clock.monotonic())) is not None:
            self._flood(flood)

    def _on_goaway(self, e: ev.ConnectionTerminated) -> None:
        code = int(e.error_code or 0)
        last = e.last_stream_id if e.last_stream_id is not None else 0
        self.goaway_received = code
        self._peer_goaway_last = last
        self._wake_slot_waiters()
        if code != ErrorCodes.NO_ERROR:
            log.info("HTTP/2 peer %s sent GOAWAY %s", self._peer(), _code_name(code))
            self._end("goaway_received", ErrorCodes.NO_ERROR, goaway=False)
            return
        for stream in list(self._streams.values()):
            if not self._peer_initiated(stream.id) and stream.id > last:
                self._reset_stream(stream, ErrorCodes.REFUSED_STREAM, "refused")
        self._check_drained()

    def _check_buffers(self) -> None:
        """What h2 holds between reads: a frame still arriving, a header block without its
        END_HEADERS (CONTINUATION flood)."""
        held = buffered(self._h2)
        if held.partial_frame > self.limits.max_frame_size + 9:
            log.info("HTTP/2 peer %s: frame over MAX_FRAME_SIZE", self._peer())
            self._end("frame_too_large", ErrorCodes.FRAME_SIZE_ERROR, goaway=True)
            return
        if held.block_frames or held.block_bytes:
            size = held.block_bytes + held.partial_frame
            if (flood := self._guard.header_block(held.block_frames, size)) is not None:
                self._flood(flood)

    def _flood(self, flood: Flood) -> None:
        log.info("HTTP/2 peer %s: %s, sending GOAWAY", self._peer(), flood.value)
        self._end(flood.value, ErrorCodes.ENHANCE_YOUR_CALM, goaway=True)

    def _refuse(self, sid: int, code: ErrorCodes, *, counts: bool) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # the peer reset it too
            self._h2.reset_stream(sid, code)
            self.stats.resets_sent += 1
        if counts and (flood := self._guard.stream_reset(self._clock.monotonic())) is not None:
            self._flood(flood)
