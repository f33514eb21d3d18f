"""HTTP/2 limits and the per-connection abuse accounting: pure, on an injected clock.

For: the numbers an ``sidecar.h2conn.H2Connection`` enforces (``H2Limits``, plain data
parsed once at the edge) and the decisions about a peer's behaviour, each returned as a
value for the I/O shell to act on (``Flood`` → GOAWAY ENHANCE_YOUR_CALM and close;
``header_problem`` → reset that stream):

- rapid reset (CVE-2023-44487, Envoy's rule): within the last ``rapid_reset_window_s``,
  at least ``rapid_reset_min_streams`` streams were opened by the peer and at least
  ``rapid_reset_ratio`` of that many were reset (by the peer, or by us because of the
  peer: refused, bad headers);
- SETTINGS, PING and "empty" frames (zero-length DATA, PRIORITY, unknown types: frames
  that cost us work and carry nothing) above a per-second rate;
- a header list over ``max_header_count`` fields or ``max_header_list_size`` bytes
  (RFC 7541 size: name + value + 32 per field) → that stream is reset.

Sliding windows are bucketed (``SlidingCount``): memory is a fixed ten slots per counter,
whatever the traffic, and a count covers between 0.9 and 1.0 of the window.

Must never: import asyncio/socket/ssl or h2, read the clock itself, or keep memory that
grows with the traffic.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from meshlet.errors import InputError

KiB = 1024
MiB = 1024 * KiB
_MAX_WINDOW = 2**31 - 1
# RFC 7541 §4.1: each field counts its name, its value and 32 bytes of overhead.
HEADER_FIELD_OVERHEAD = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Limits:
    """What one HTTP/2 connection allows its peer, and its timers. Defaults are Envoy's
    edge figures where it has one (REFERENCE.md)."""

    # -- SETTINGS we advertise -----------------------------------------------------------
    max_concurrent_streams: int = 100  # more open streams from the peer: REFUSED_STREAM
    initial_window_size: int = 256 * KiB  # per stream: bounds buffered data per stream
    connection_window_size: int = 1 * MiB  # bounds buffered data per connection
    max_frame_size: int = 16 * KiB
    max_header_list_size: int = 60 * KiB  # over it: the stream is reset (HTTP/1's 431)
    # -- enforced on what the peer sends -------------------------------------------------
    max_header_count: int = 100  # more fields in one header list: the stream is reset
    # Decoded size at which HPACK decoding stops and the connection ends (HPACK bomb,
    # CVE-2016-6581): the HPACK state is lost once a block is abandoned half-way.
    max_decoded_header_bytes: int = 120 * KiB
    # One header block (HEADERS + CONTINUATION*) before END_HEADERS: encoded bytes and
    # CONTINUATION frames (CONTINUATION flood). h2 itself stops at 64 frames.
    max_header_block_bytes: int = 128 * KiB
    max_continuation_frames: int = 16
    # Open peer streams h2 itself tolerates inside one read before it ends the connection
    # (we refuse each one above max_concurrent_streams as soon as we see it).
    hard_max_concurrent_streams: int = 1000
    rapid_reset_min_streams: int = 500
    rapid_reset_ratio: float = 0.5
    rapid_reset_window_s: float = 1.0
    max_settings_per_s: int = 100
    max_pings_per_s: int = 100
    max_empty_frames_per_s: int = 1000
    # Bytes waiting in our write buffer (ACKs, resets, data) while the peer does not read:
    # above this the peer is flooding us with work it does not collect.
    max_outbound_backlog: int = 1 * MiB
    # Closed streams h2 remembers, to tell a late frame from a protocol error (h2's own
    # default, 65536, costs ~7 MB per long-lived connection).
    closed_streams_remembered: int = 4096
    # -- timers ---------------------------------------------------------------------------
    ping_interval_s: float | None = 30.0  # PING after this long without a frame; None: off
    ping_timeout_s: float = 10.0  # no PING ACK by then: the connection is dead
    shutdown_grace_s: float = 30.0  # ``shutdown()``'s default wait for open streams
    linger_s: float = 2.0  # after a GOAWAY for an error: drain the peer this long, then close
    # -- sending ----------------------------------------------------------------------------
    send_buffer_low_water: int = 64 * KiB  # ``H2Stream.drain()`` waits until below this

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"HTTP/2 limits: {what}")

        need(self.max_concurrent_streams >= 1, "max_concurrent_streams must be at least 1")
        need(
            self.max_concurrent_streams <= self.hard_max_concurrent_streams,
            "hard_max_concurrent_streams must be at least max_concurrent_streams",
        )
        need(
            65535 <= self.connection_window_size <= _MAX_WINDOW,
            "connection_window_size must be between 65535 and 2^31-1",
        )
        need(
            1 <= self.initial_window_size <= _MAX_WINDOW,
            "initial_window_size must be between 1 and 2^31-1",
        )
        need(
            16 * KiB <= self.max_frame_size <= 2**24 - 1,
            "max_frame_size must be between 16384 and 2^24-1",
        )
        need(
            0 < self.max_header_list_size <= self.max_decoded_header_bytes,
            "max_decoded_header_bytes must be at least max_header_list_size",
        )
        need(self.max_header_count >= 1, "max_header_count must be at least 1")
        need(self.max_continuation_frames >= 0, "max_continuation_frames must be >= 0")
        need(self.max_header_block_bytes >= 1, "max_header_block_bytes must be positive")
        need(0 < self.rapid_reset_ratio <= 1, "rapid_reset_ratio must be in (0, 1]")
        need(self.rapid_reset_min_streams >= 1, "rapid_reset_min_streams must be >= 1")
        need(self.rapid_reset_window_s > 0, "rapid_reset_window_s must be positive")
        for name in ("max_settings_per_s", "max_pings_per_s", "max_empty_frames_per_s"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(
            self.closed_streams_remembered >= 4 * self.max_concurrent_streams,
            "closed_streams_remembered must be at least 4 x max_concurrent_streams",
        )
        need(self.max_outbound_backlog >= 64 * KiB, "max_outbound_backlog must be >= 64 KiB")
        need(
            self.ping_interval_s is None or self.ping_interval_s > 0,
            "ping_interval_s must be positive (or None)",
        )
        need(self.ping_timeout_s > 0, "ping_timeout_s must be positive")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s must be >= 0")
        need(self.linger_s >= 0, "linger_s must be >= 0")
        need(self.send_buffer_low_water >= 0, "send_buffer_low_water must be >= 0")


class SlidingCount:
    """How many events happened in the last ``window_s`` seconds, in ``slots`` buckets.

    ``count(now)`` includes every event in ``[now - window_s + window_s/slots, now]`` and
    none before ``now - window_s``: memory is O(slots), however many events arrive.
    Time that goes backwards is treated as the latest time seen.
    """

    __slots__ = ("_counts", "_ids", "_latest", "_width")

    def __init__(self, window_s: float, *, slots: int = 10) -> None:
        if window_s <= 0 or slots < 1:
            raise ValueError("window_s must be positive and slots at least 1")
        self._width = window_s / slots
        self._ids = [-(2**62)] * slots  # which bucket (time // width) each slot holds
        self._counts = [0] * slots
        self._latest = -math.inf

    def _bucket(self, now: float) -> int:
        if now < self._latest:
            now = self._latest
        self._latest = now
        return math.floor(now / self._width)

    def add(self, now: float, n: int = 1) -> int:
        """Record ``n`` events at ``now``; returns the count in the window afterwards."""
        k = self._bucket(now)
        i = k % len(self._ids)
        if self._ids[i] != k:
            self._ids[i] = k
            self._counts[i] = 0
        self._counts[i] += n
        return self._sum(k)

    def count(self, now: float) -> int:
        return self._sum(self._bucket(now))

    def _sum(self, k: int) -> int:
        oldest = k - len(self._ids)
        return sum(c for b, c in zip(self._ids, self._counts, strict=True) if oldest < b <= k)


class Flood(enum.Enum):
    """Why a connection is ended with GOAWAY ENHANCE_YOUR_CALM."""

    RAPID_RESET = "rapid_reset"
    SETTINGS = "settings_flood"
    PING = "ping_flood"
    EMPTY_FRAMES = "empty_frames_flood"
    BACKLOG = "outbound_backlog"  # the peer makes us write but does not read
    HEADER_BLOCK = "continuation_flood"  # a header block over its caps


class FloodGuard:
    """One connection's accounting. Each method records one event at ``now`` and returns
    the ``Flood`` it completes, or None."""

    __slots__ = ("_empty", "_limits", "_opened", "_pings", "_resets", "_settings")

    def __init__(self, limits: H2Limits) -> None:
        self._limits = limits
        self._opened = SlidingCount(limits.rapid_reset_window_s)
        self._resets = SlidingCount(limits.rapid_reset_window_s)
        self._settings = SlidingCount(1.0)
        self._pings = SlidingCount(1.0)
        self._empty = SlidingCount(1.0)

    def stream_opened(self, now: float) -> Flood | None:
        opened = self._opened.add(now)
        return self._rapid_reset(opened, self._resets.count(now))

    def stream_reset(self, now: float) -> Flood | None:
        """A peer stream was reset: by the peer, or by us because of the peer."""
        resets = self._resets.add(now)
        return self._rapid_reset(self._opened.count(now), resets)

    def _rapid_reset(self, opened: int, resets: int) -> Flood | None:
        lim = self._limits
        if opened >= lim.rapid_reset_min_streams and resets >= lim.rapid_reset_ratio * opened:
            return Flood.RAPID_RESET
        return None

    def settings(self, now: float) -> Flood | None:
        over = self._settings.add(now) > self._limits.max_settings_per_s
        return Flood.SETTINGS if over else None

    def ping(self, now: float) -> Flood | None:
        return Flood.PING if self._pings.add(now) > self._limits.max_pings_per_s else None

    def empty_frame(self, now: float) -> Flood | None:
        over = self._empty.add(now) > self._limits.max_empty_frames_per_s
        return Flood.EMPTY_FRAMES if over else None

    def backlog(self, buffered: int) -> Flood | None:
        return Flood.BACKLOG if buffered > self._limits.max_outbound_backlog else None

    def header_block(self, frames: int, size: int) -> Flood | None:
        """A header block still waiting for END_HEADERS: ``frames`` CONTINUATIONs so far
        (after its HEADERS frame) and ``size`` encoded bytes."""
        lim = self._limits
        if frames > lim.max_continuation_frames or size > lim.max_header_block_bytes:
            return Flood.HEADER_BLOCK
        return None


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The RFC 7541 size of a header list, as SETTINGS_MAX_HEADER_LIST_SIZE counts it."""
    return sum(len(n) + len(v) + HEADER_FIELD_OVERHEAD for n, v in headers)


def header_problem(headers: list[tuple[bytes, bytes]], limits: H2Limits) -> str | None:
    """Why a received header list must be refused (its stream reset), or None."""
    if len(headers) > limits.max_header_count:
        return f"{len(headers)} header fields (the limit is {limits.max_header_count})"
    size = header_list_size(headers)
    if size > limits.max_header_list_size:
        return f"a {size}-byte header list (the limit is {limits.max_header_list_size})"
    return None
