"""How ``sidecar.h2conn`` configures and looks into h2 (python-hyper, 4.x).

For: building the h2 connection object with our SETTINGS and limits, the two behaviours
of h2 we adjust, what h2 holds between reads (for the CONTINUATION and frame-size caps),
naming h2's protocol errors, and the connection's counters.

- h2 closes its connection state on any GOAWAY, sent or received
  (python-hyper/h2#1181), so no stream could finish after one; ``_GracefulStateMachine``
  keeps frames flowing and ``H2Connection`` enforces the stream-id rules itself.
- h2 ends the whole connection on the first peer stream over our
  MAX_CONCURRENT_STREAMS; ``_LocalSettings`` advertises the limit but lets h2 tolerate up
  to ``hard_max_concurrent_streams``, so that we refuse single streams (REFUSED_STREAM).

tests/unit/test_h2_limits.py pins every h2 internal used here.

Must never: change what h2 puts on the wire beyond SETTINGS values, or hold state of
its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes

from sidecar.h2_limits import H2Limits

_CLOSED = h2.connection.ConnectionState.CLOSED


class _GracefulStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, but frames keep flowing after a GOAWAY."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{(_CLOSED, i): (None, _CLOSED) for i in h2.connection.ConnectionInputs},
    }


class _LocalSettings(h2.settings.Settings):
    """Our SETTINGS as advertised; h2's own stream check reads the hard cap instead."""

    def __init__(self, *, client: bool, values: dict[SettingCodes, int], hard: int) -> None:
        super().__init__(client=client, initial_values=values)
        self._hard = hard

    @property
    def max_concurrent_streams(self) -> int:
        return self._hard

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value  # advertised from the next SETTINGS


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, remembering fewer closed streams: h2 keeps how each of the last
    65536 closed (~7 MB on a long-lived connection); a frame for a stream it forgot ends
    the connection, so the number stays far above what can be in flight."""

    def __init__(self, config: h2.config.H2Configuration, closed_streams: int) -> None:
        self.MAX_CLOSED_STREAMS = closed_streams  # read by h2's __init__
        super().__init__(config)


def new_h2(*, client: bool, limits: H2Limits) -> h2.connection.H2Connection:
    """An h2 connection with our SETTINGS, frame size and HPACK decoding cap.

    Received headers are validated (h2's default); sent ones are not validated again:
    each was validated when it arrived on the other leg, or is our own (a local reply,
    the trace headers) — about 8% of the proxy's CPU per request saved."""
    h = _H2Connection(
        h2.config.H2Configuration(
            client_side=client, header_encoding=None, validate_outbound_headers=False
        ),
        limits.closed_streams_remembered,
    )
    h.state_machine = _GracefulStateMachine()
    values = {
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window_size,
        SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
    }
    if client:
        values[SettingCodes.ENABLE_PUSH] = 0
    h.local_settings = _LocalSettings(
        client=client, values=values, hard=limits.hard_max_concurrent_streams
    )
    h.max_inbound_frame_size = limits.max_frame_size
    # Decoding stops here (HPACK bomb); a list over max_header_list_size but under this
    # is decoded, and its stream reset by H2Connection.
    h.decoder.max_header_list_size = limits.max_decoded_header_bytes
    return h


@dataclass(frozen=True, slots=True)
class Buffered:
    """What h2 holds between reads."""

    partial_frame: int  # bytes of a frame still arriving
    block_frames: int  # CONTINUATION frames of a header block without END_HEADERS
    block_bytes: int  # encoded bytes of that header block


def buffered(h: h2.connection.H2Connection) -> Buffered:
    buf = h.incoming_buffer
    partial = len(getattr(buf, "_data", b""))
    block = getattr(buf, "_headers_buffer", None) or []
    return Buffered(
        partial_frame=partial,
        block_frames=max(len(block) - 1, 0),
        block_bytes=sum(len(f.data) for f in block),
    )


_REASONS: list[tuple[type[Exception], str]] = [
    (h2.exceptions.DenialOfServiceError, "hpack_bomb"),
    (h2.exceptions.TooManyStreamsError, "too_many_streams"),
    (h2.exceptions.FrameTooLargeError, "frame_too_large"),
    (h2.exceptions.FlowControlError, "flow_control"),
]


def protocol_error_reason(e: h2.exceptions.ProtocolError) -> str:
    """A short, stable name for why h2 refused what the peer sent."""
    for kind, reason in _REASONS:
        if isinstance(e, kind):
            return reason
    return "continuation_flood" if "continuation" in str(e).lower() else "protocol_error"


@dataclass(slots=True)
class H2Stats:
    """One connection's counters (the metrics layer reads them)."""

    streams_opened: int = 0  # accepted (server) or opened (client)
    streams_refused: int = 0  # REFUSED_STREAM: over the limit, or above our GOAWAY
    streams_rejected: int = 0  # a header list over the limits
    resets_received: int = 0
    resets_sent: int = 0
    bytes_received: int = 0  # DATA payload
    bytes_sent: int = 0
    wire_bytes_received: int = 0  # everything h2 parsed (not what was dropped while closing)
    max_active_streams: int = 0
    pings_sent: int = 0
