"""The L4 relay: every byte of a proxied connection crosses here, between two ``Side``s.

For: moving bytes between the app's plain TCP connection (``PlainSide``, in this module)
and the mTLS leg (``sidecar.tlsleg.TlsLeg``), inside transport callbacks. Data from one
side is written to the other in the same callback; reading pauses while the other
side's write buffer is above its high-water mark; EOF crosses each direction on its own
(half-close); a reset on one side resets the other; an idle connection is closed.

Must never: queue data, start a task per chunk, loop over bytes in Python, raise out of
a protocol callback, or decide anything about routing or identity (the caller does
that before ``Relay.start``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Below Swarm/IPVS's 900 s idle drop: a dead peer is noticed in 60 + 3 * 10 s.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
# Data that may arrive before ``attach`` (uvloop can deliver one read after pause_reading
# in connection_made); more than this before the relay starts ends the connection.
MAX_EARLY_BYTES = 1 << 20
# Write-buffer marks for every relayed transport (uvloop's defaults are 64 KiB / 16 B).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# After a graceful close, a side that cannot flush (peer not reading) is aborted.
CLOSE_GRACE_S = 30.0

_LINGER_RESET = struct.pack("ii", 1, 0)


class Side(typing.Protocol):
    """One end of a relay."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...  # half-close our sending direction
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...  # graceful: flush, then close
    def abort(self) -> None: ...  # now; a TCP peer sees a reset
    def get_write_buffer_size(self) -> int: ...
    def attach(self, peer: Peer) -> None: ...  # deliver to peer from now on; flush early data


class Peer(typing.Protocol):
    """What a Side calls on the relay."""

    def on_data(self, side: Side, data: bytes) -> None: ...
    def on_eof(self, side: Side) -> None: ...
    def on_closed(self, side: Side, exc: BaseException | None) -> None: ...
    def on_pause_writing(self, side: Side) -> None: ...
    def on_resume_writing(self, side: Side) -> None: ...


def tune_socket(sock: typing.Any) -> None:
    """TCP_NODELAY and keepalive (idle 60 s, every 10 s, 3 probes); best effort."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (OSError, AttributeError):  # not TCP (a unix socket in a test), or already gone
        pass


class TransportSide(asyncio.Protocol):
    """What every transport-backed Side shares (``PlainSide``, ``sidecar.tlsleg.TlsLeg``).

    Socket tuning and buffer limits on connect; until ``attach``, data, EOF and loss are
    kept (bounded) and handed to the peer on attach; write-buffer pressure is reported;
    ``closed`` resolves (always with None) when the connection is gone and ``error``
    says why, when it was not a clean close; ``abort`` resets a TCP peer.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.peername: typing.Any = None
        self.sockname: typing.Any = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None
        self._peer: Peer | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._eof_in = False  # the peer finished sending (TCP FIN, or TLS close_notify)
        self._lost = False
        self._write_paused = False

    # Provided by each kind of side (see Side):
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = typing.cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        tune_socket(self.sock)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and self.error is None:
            self.error = exc
        if not self.closed.done():
            self.closed.set_result(None)
        if self._peer is not None:
            self._peer.on_closed(self, self.error)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._peer is not None:
            self._peer.on_pause_writing(self)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._peer is not None:
            self._peer.on_resume_writing(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.pause_reading()

    def abort(self) -> None:
        if self.transport is not None and not self._lost:
            if self.sock is not None:
                with contextlib.suppress(OSError):  # SO_LINGER 0: close sends RST, not FIN
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def attach(self, peer: Peer) -> None:
        self._peer = peer
        if self._early:
            data = b"".join(self._early)
            self._early.clear()
            self._early_size = 0
            peer.on_data(self, data)
        if self._write_paused:
            peer.on_pause_writing(self)
        if self._eof_in:
            peer.on_eof(self)
        if self._lost:
            peer.on_closed(self, self.error)

    def detach(self, unread: bytes = b"") -> None:
        """Undo ``attach`` (protocol detection peeks, then hands the side on): reading
        pauses, the peer is forgotten, and ``unread`` (what it read and did not use) is
        kept as early data ahead of anything read later; the next ``attach`` delivers it,
        then EOF and loss as usual."""
        self.pause_reading()
        self._peer = None
        if unread:
            self._early.insert(0, unread)
            self._early_size += len(unread)

    def _keep_early(self, data: bytes) -> None:
        """Data before attach: kept for the peer; too much of it ends the connection."""
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_EARLY_BYTES:
            self.error = ConnectionError(
                f"{self.peername} sent more than {MAX_EARLY_BYTES} bytes before the relay started"
            )
            self.abort()


class PlainSide(TransportSide):
    """A Side over a plain TCP transport (the app's connection, or ours to the app).

    Reading stays paused from connect until the relay starts.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self._writable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._writable = True
        if self._peer is None:
            self.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer is not None:
            peer.on_data(self, data)
            return
        self.pause_reading()  # uvloop may deliver once after pause_reading in connection_made
        self._keep_early(data)

    def eof_received(self) -> bool:
        self._eof_in = True
        if self._peer is not None:
            self._peer.on_eof(self)
        return True  # keep our sending direction open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable = False
        super().connection_lost(exc)

    def write(self, data: bytes) -> None:
        if self._writable:
            try:
                self.transport.write(data)  # type: ignore[union-attr]
            except RuntimeError:  # the handle just closed; connection_lost is on its way
                self._writable = False

    def write_eof(self) -> None:
        if not self._writable:
            return
        self._writable = False
        t = self.transport
        if t is None or t.is_closing() or not t.can_write_eof():
            return
        with contextlib.suppress(RuntimeError, OSError):  # write_eof on a closing transport
            t.write_eof()

    def resume_reading(self) -> None:
        # Never after EOF: libuv must not read a stream again once it returned EOF.
        if self.transport is not None and not (self._lost or self._eof_in or self._peer is None):
            self.transport.resume_reading()

    def close(self) -> None:
        self._writable = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._writable = False
        super().abort()


@dataclass(slots=True)
class RelayStats:
    """Counters the metrics layer reads: one per relay, or one shared by many to aggregate."""

    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    pauses_a: int = 0  # times reading from A paused because B was not draining
    pauses_b: int = 0


class Relay:
    """Relays between ``a`` and ``b`` once started; ``done`` resolves when both are closed.

    ``reason`` says how it ended: "eof" (both directions finished), "idle", "reset"
    (one side reset or failed; the other was reset too), "closed" (one side closed, or
    ``close()``), "aborted" (``abort()``).
    """

    def __init__(
        self,
        a: Side,
        b: Side,
        *,
        idle_timeout_s: float | None = 300.0,
        stats: RelayStats | None = None,
        on_done: Callable[[Relay], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._time = self._loop.time
        self.a = a
        self.b = b
        self.stats = stats if stats is not None else RelayStats()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.reason: str | None = None
        self._idle_s = idle_timeout_s
        self._on_done = on_done
        self._eof_a = self._eof_b = False
        self._closed_a = self._closed_b = False
        self._paused_a = self._paused_b = False
        self._started = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Attach both sides (early data flows now) and start reading from both."""
        if self._started:
            raise RuntimeError("relay already started")
        self._started = True
        self._last = self._time()
        if self._idle_s is not None:
            self._timer = self._loop.call_later(self._idle_s, self._on_idle_timer)
        self.a.attach(self)
        self.b.attach(self)
        if not (self._paused_a or self._closed_a):
            self.a.resume_reading()
        if not (self._paused_b or self._closed_b):
            self.b.resume_reading()

    def close(self) -> None:
        """Close both sides gracefully (buffers flush); abort them if that takes too long."""
        self._end("closed")
        if not self._closed_a:
            self.a.close()
        if not self._closed_b:
            self.b.close()
        if self._grace is None and not self.done.done():
            self._grace = self._loop.call_later(CLOSE_GRACE_S, self.abort)

    def abort(self) -> None:
        self._end("aborted")
        if not self._closed_a:
            self.a.abort()
        if not self._closed_b:
            self.b.abort()

    # -- Peer: called by the sides, inside their transport callbacks ---------------------

    def on_data(self, side: Side, data: bytes) -> None:
        if side is self.a:
            self.b.write(data)
            self.stats.bytes_a_to_b += len(data)
        else:
            self.a.write(data)
            self.stats.bytes_b_to_a += len(data)
        self._last = self._time()

    def on_eof(self, side: Side) -> None:
        if side is self.a:
            self._eof_a = True
            if not self._closed_b:
                self.b.write_eof()
        else:
            self._eof_b = True
            if not self._closed_a:
                self.a.write_eof()
        if self._eof_a and self._eof_b:
            self._end("eof")
            self.close()

    def on_closed(self, side: Side, exc: BaseException | None) -> None:
        if side is self.a:
            self._closed_a = True
            other, other_closed = self.b, self._closed_b
        else:
            self._closed_b = True
            other, other_closed = self.a, self._closed_a
        if not other_closed:
            if exc is not None:
                self._end("reset")
                other.abort()  # the app sees a reset, as it would without the mesh
            else:
                self._end("closed")
                other.close()
        if self._closed_a and self._closed_b:
            self._finish()

    def on_pause_writing(self, side: Side) -> None:
        if side is self.b:
            self._paused_a = True
            self.stats.pauses_a += 1
            self.a.pause_reading()
        else:
            self._paused_b = True
            self.stats.pauses_b += 1
            self.b.pause_reading()

    def on_resume_writing(self, side: Side) -> None:
        if side is self.b:
            self._paused_a = False
            if self._started and not self._closed_a:
                self.a.resume_reading()
        else:
            self._paused_b = False
            if self._started and not self._closed_b:
                self.b.resume_reading()

    # -- internals ---------------------------------------------------------------------

    def _end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _on_idle_timer(self) -> None:
        self._timer = None
        if self.done.done() or self._idle_s is None:
            return
        remaining = self._last + self._idle_s - self._time()
        if remaining > 0:  # there was traffic since the timer was set: look again later
            self._timer = self._loop.call_later(remaining, self._on_idle_timer)
            return
        self._end("idle")
        self.close()

    def _finish(self) -> None:
        if self.done.done():
            return
        for handle in (self._timer, self._grace):
            if handle is not None:
                handle.cancel()
        self._timer = self._grace = None
        self._end("closed")
        self.done.set_result(None)
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:
                log.exception("relay on_done callback failed")
