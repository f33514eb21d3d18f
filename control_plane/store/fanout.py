"""In-process fan-out of committed batches to watchers.

A commit hands its batch to every watcher's bounded buffer and wakes it; it never waits
for a watcher. A watcher whose buffer overflows drops it and, when it next runs, reads
what it missed from the store's change log instead (which raises CompactedError if that
history is gone). Watchers therefore see every revision exactly once, in order.

A watcher may hand in its own ``wake`` event (a gRPC stream also waits for bookmarks and
bundle rotations): then anything that sets it wakes the watch too, and a wake with no new
batch yields an empty batch, so the watcher has one wait point instead of a task per batch.

This module never touches storage itself: it is given the backend's ``changes`` reader.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable

from control_plane.store.base import Change, split_by_revision
from meshlet.errors import MeshError

ReadChanges = Callable[[int], Awaitable[list[Change]]]


class _Subscription:
    __slots__ = ("buffer", "overflowed", "pending", "wake")

    def __init__(self, buffer: int, wake: asyncio.Event | None) -> None:
        self.buffer = buffer
        self.pending: deque[list[Change]] = deque()
        self.overflowed = False
        self.wake = asyncio.Event() if wake is None else wake

    def offer(self, batch: list[Change]) -> None:
        if not self.overflowed:
            if len(self.pending) < self.buffer:
                self.pending.append(batch)
            else:
                self.pending.clear()
                self.overflowed = True
        self.wake.set()


class Fanout:
    """Delivers each published batch (one revision) to every live watcher, never blocking."""

    def __init__(self, *, buffer: int) -> None:
        if buffer < 1:
            raise ValueError("fan-out buffer must hold at least one batch")
        self._buffer = buffer
        self._subs: set[_Subscription] = set()
        self._closed = False

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def publish(self, batch: list[Change]) -> None:
        """Hand one committed batch to every watcher. Call on the event loop, in order."""
        for sub in self._subs:
            sub.offer(batch)

    def close(self) -> None:
        """End every watch (after the batch it is yielding)."""
        self._closed = True
        for sub in self._subs:
            sub.wake.set()

    async def follow(
        self, since: int, read: ReadChanges, *, wake: asyncio.Event | None = None
    ) -> AsyncGenerator[list[Change]]:
        """The backlog after ``since`` as one batch, then one batch per revision; with
        ``wake``, also an empty batch whenever someone else set it and nothing came."""
        sub = _Subscription(self._buffer, wake)
        self._subs.add(sub)  # before reading the backlog, so no commit falls in between
        try:
            backlog = await read(since)
            last = since
            if backlog:
                last = backlog[-1].revision
                yield backlog
            elif wake is not None and wake.is_set():
                yield []  # its owner woke it during the read: do not lose that
            while not self._closed:
                if sub.overflowed:
                    sub.overflowed = False
                    sub.pending.clear()
                    try:
                        missed = await read(last)
                    except MeshError:
                        if self._closed:  # the store closed under the read: end quietly
                            return
                        raise
                    for batch in split_by_revision(missed):
                        last = batch[0].revision
                        yield batch
                elif sub.pending:
                    batch = sub.pending.popleft()
                    if batch[0].revision > last:  # already seen in the backlog or a log read
                        last = batch[0].revision
                        yield batch
                else:
                    sub.wake.clear()
                    await sub.wake.wait()
                    if wake is not None and not (sub.pending or sub.overflowed or self._closed):
                        yield []  # woken by its owner: a bookmark or a bundle is due
        finally:
            self._subs.discard(sub)
