"""The async edge of the HTTP/1.1 proxy: a connection read through a sans-IO parser.

For: ``Channel`` attaches to a relay ``Side`` (``PlainSide`` or ``TlsLeg``) as its
``Peer``: bytes go straight into the parser inside the transport callback, and the one
task that owns the exchange is woken through a ``Waker``. The task pulls events with
``next_event`` and writes with ``Side.write``; write pressure is reported by the side
and awaited with ``drain``. Reading pauses while the parser holds more than
``READ_HIGH`` unparsed bytes (pipelined requests) and resumes when it needs data.

Two channels of one exchange (downstream and upstream) share one ``Waker``, so the task
also wakes when the other side goes away while it waits (the client hung up while the
upstream thinks: abort the upstream).

Must never: parse anything itself, start a task, or raise out of a transport callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sidecar.http1 import NEED_DATA, RequestParser, ResponseParser
from sidecar.relay import Side

READ_HIGH = 256 * 1024  # unparsed bytes held before reading from the peer pauses

P = TypeVar("P", RequestParser, ResponseParser)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Waker:
    """Where the task of one exchange sleeps until a channel has news (or time is up)."""

    __slots__ = ("_fut", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fut: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def wait(self, until: float | None) -> bool:
        """Sleep until woken (True) or the loop time ``until`` (False). Check the
        condition before calling: a wake while nobody waits is not remembered."""
        loop = self._loop
        handle = None
        if until is not None and until <= loop.time():
            return False
        fut: asyncio.Future[bool] = loop.create_future()
        if until is not None:
            handle = loop.call_at(until, _expire, fut)
        self._fut = fut
        try:
            return await fut
        finally:
            self._fut = None
            if handle is not None:
                handle.cancel()


class Channel(Generic[P]):
    """One HTTP/1.1 connection: a Side, its parser, and what happened to it."""

    __slots__ = (
        "eof",
        "error",
        "lost",
        "on_idle_news",
        "parser",
        "read_paused",
        "received",
        "side",
        "waker",
        "write_paused",
    )

    def __init__(self, side: Side, parser: P, waker: Waker | None) -> None:
        self.side = side
        self.parser: P = parser
        self.waker = waker
        self.on_idle_news: Callable[[Channel[Any]], None] | None = None  # when no waker
        self.eof = False  # the peer finished sending (or the connection is gone)
        self.lost = False  # the connection is gone
        self.error: BaseException | None = None  # why, when it was not a clean close
        self.read_paused = False
        self.write_paused = False
        self.received = 0  # bytes read from the peer

    def start(self) -> None:
        """Attach to the side (early data arrives now) and start reading."""
        self.side.attach(self)
        if not (self.read_paused or self.lost):
            self.side.resume_reading()

    # -- relay.Peer: called inside transport callbacks ------------------------------------

    def on_data(self, side: Side, data: bytes) -> None:
        self.received += len(data)
        parser = self.parser
        parser.receive_data(data)
        if not self.read_paused and parser.buffered > READ_HIGH:
            self.read_paused = True
            side.pause_reading()
        self._news()

    def on_eof(self, side: Side) -> None:
        if not self.eof:
            self.eof = True
            self.parser.receive_data(b"")
        self._news()

    def on_closed(self, side: Side, exc: BaseException | None) -> None:
        self.lost = True
        if exc is not None and self.error is None:
            self.error = exc
        if not self.eof:
            self.eof = True
            self.parser.receive_data(b"")
        self._news()

    def on_pause_writing(self, side: Side) -> None:
        self.write_paused = True

    def on_resume_writing(self, side: Side) -> None:
        self.write_paused = False
        self._news()

    def _news(self) -> None:
        waker = self.waker
        if waker is not None:
            waker.wake()
        elif self.on_idle_news is not None:
            self.on_idle_news(self)

    # -- for the task ----------------------------------------------------------------------

    def want_data(self) -> None:
        """The parser needs more bytes: make sure we read."""
        if self.read_paused:
            self.read_paused = False
            if not self.lost:
                self.side.resume_reading()

    def write(self, data: bytes) -> None:
        self.side.write(data)

    def close(self) -> None:
        """Graceful: flush what was written, then close (TLS: close_notify)."""
        if not self.lost:
            self.side.close()

    def abort(self) -> None:
        """Now: a TCP peer sees a reset."""
        if not self.lost:
            self.side.abort()


def _until(
    until: float | None, idle_s: float | None, loop: asyncio.AbstractEventLoop
) -> float | None:
    if idle_s is None:
        return until
    stall = loop.time() + idle_s
    return stall if until is None else min(until, stall)


async def next_event(
    ch: Channel[Any],
    until: float | None,
    watch: Channel[Any] | None = None,
    *,
    idle_s: float | None = None,
) -> Any:
    """The parser's next event (never NEED_DATA), or None when the loop time ``until``
    passed, nothing came for ``idle_s``, or ``watch`` (the other side of the exchange)
    was lost. Raises ``HttpError``."""
    waker = ch.waker
    assert waker is not None
    parser = ch.parser
    while True:
        event = parser.next_event()
        if event is not NEED_DATA:
            return event
        if watch is not None and watch.lost:
            return None
        ch.want_data()
        if not await waker.wait(_until(until, idle_s, asyncio.get_running_loop())):
            return None


async def drain(
    ch: Channel[Any],
    until: float | None,
    watch: Channel[Any] | None = None,
    *,
    idle_s: float | None = None,
) -> bool:
    """Wait while ``ch``'s write buffer is over its high-water mark; False on timeout (as
    for ``next_event``), or when ``ch`` or ``watch`` was lost meanwhile."""
    waker = ch.waker
    assert waker is not None
    while ch.write_paused:
        if ch.lost or (watch is not None and watch.lost):
            return False
        if not await waker.wait(_until(until, idle_s, asyncio.get_running_loop())):
            return False
    return not ch.lost
