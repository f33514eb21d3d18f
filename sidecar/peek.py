"""Peeking at an app connection's first bytes without taking them (protocol detection).

For: ``peek(side, decide, timeout_s)`` attaches a temporary ``Peer`` to a relay side
that has not started yet, reads until ``decide`` (``sidecar.detect``) answers, the
client finishes sending (EOF), the connection is lost, or the time is up; then it
detaches, giving every byte it read back to the side, so the handler the caller picks
next (L4 relay, HTTP/1.1, HTTP/2) receives the connection from its first byte.

Must never: consume, change or reorder a byte, write to the side, or keep reading once
it has decided.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.detect import Detected
from sidecar.relay import Side, TransportSide


@dataclass(frozen=True, slots=True)
class Peeked:
    """What a peek found. ``found`` is ``NEED_MORE`` when it could not decide: the time
    was up (``timed_out``), the client finished sending (``eof``), or the connection is
    gone (``lost``)."""

    found: Detected
    data: bytes  # what was read (given back to the side)
    seconds: float
    timed_out: bool = False
    eof: bool = False
    lost: bool = False


class _Peek:
    """The temporary Peer: collects data and wakes the waiter when there is news."""

    __slots__ = ("data", "decide", "done", "eof", "found", "lost")

    def __init__(self, decide: Callable[[bytes], Detected], done: asyncio.Future[None]) -> None:
        self.decide = decide
        self.done = done
        self.data = b""
        self.found = Detected.NEED_MORE
        self.eof = False
        self.lost = False

    def on_data(self, side: Side, data: bytes) -> None:
        self.data += data
        if self.found is Detected.NEED_MORE:
            self.found = self.decide(self.data)
            if self.found is not Detected.NEED_MORE:
                side.pause_reading()
                self._wake()

    def on_eof(self, side: Side) -> None:
        self.eof = True
        self._wake()

    def on_closed(self, side: Side, exc: BaseException | None) -> None:
        self.lost = True
        self._wake()

    def on_pause_writing(self, side: Side) -> None:
        pass  # nothing is written while peeking; the next peer learns it on attach

    def on_resume_writing(self, side: Side) -> None:
        pass

    def _wake(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def peek(
    side: TransportSide, decide: Callable[[bytes], Detected], timeout_s: float
) -> Peeked:
    """Read ``side`` until ``decide`` answers (or EOF, loss, ``timeout_s``); the side is
    detached again, with everything read kept for its next ``attach``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    peer = _Peek(decide, loop.create_future())
    timed_out = False
    side.attach(peer)  # early data, EOF and loss arrive now, if there were any
    try:
        if not peer.done.done():
            side.resume_reading()
            try:
                async with asyncio.timeout(timeout_s):
                    await peer.done
            except TimeoutError:
                timed_out = True
    finally:
        side.detach(peer.data)
    return Peeked(
        peer.found,
        peer.data,
        loop.time() - started,
        timed_out=timed_out,
        eof=peer.eof,
        lost=peer.lost,
    )
