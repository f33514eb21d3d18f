"""Keep-alive HTTP/1.1 connections to upstreams, pooled per key: per peer-sidecar endpoint
(mTLS, ALPN ``http/1.1``) on the outbound side, and the local app on the inbound side.

For: ``acquire(key, connect)`` hands out an idle connection (most recently used first)
or opens one; ``release(conn, reusable)`` takes it back after a complete exchange, or
closes it. An idle connection keeps reading, so when the peer closes it (EOF,
close_notify, reset) or sends anything unasked, it leaves the pool at once and is
never handed out. The peer may still close one just as it is handed out; the exchange
sees that as a connection closed before any response byte on a *reused* connection,
which it retries once on a fresh connection (``acquire(..., fresh=True)``) without
counting an attempt. Idle connections older than ``idle_timeout_s`` are closed by a
reaper (below the peers' own idle timeouts, so the client side closes first), and at
most ``max_idle`` are kept per key.

Must never: hand out a connection that is busy, closed or holding unread bytes, or
keep a connection whose last exchange did not end cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from sidecar.http1 import ResponseParser
from sidecar.l7_io import Channel, Waker
from sidecar.relay import Side

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 60.0
MAX_IDLE_PER_KEY = 128


class UpstreamConn:
    """One HTTP/1.1 connection to an upstream, idle in a pool or serving one exchange."""

    __slots__ = ("_on_lost", "channel", "exchanges", "idle_since", "key", "pool")

    def __init__(self, pool: Pool, key: Hashable, side: Side) -> None:
        self.pool = pool
        self.key = key
        self.channel: Channel[ResponseParser] = Channel(
            side, ResponseParser(request_method="GET"), None
        )
        self.exchanges = 0  # requests sent on it
        self.idle_since = 0.0
        self._on_lost: Callable[[], None] | None = None

    @property
    def reused(self) -> bool:
        return self.exchanges > 1

    def begin(self, method: str, waker: Waker, *, upgrade: bool = False) -> None:
        """Expect the response to one more request; news goes to ``waker``."""
        ch = self.channel
        if self.exchanges == 0:  # nothing was read yet (an idle byte ends a connection)
            ch.parser = ResponseParser(request_method=method, upgrade_requested=upgrade)
        else:
            ch.parser.start_next(request_method=method, upgrade_requested=upgrade)
        self.exchanges += 1
        ch.on_idle_news = None
        ch.waker = waker

    def _idle_news(self, ch: Channel[Any]) -> None:
        self.pool._stale_idle(self)

    @property
    def usable(self) -> bool:
        ch = self.channel
        return not (ch.eof or ch.lost or ch.parser.buffered)


class Pool:
    """Idle connections by key. One per process side (outbound, inbound)."""

    def __init__(
        self,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_idle: int = MAX_IDLE_PER_KEY,
        on_open: Callable[[Hashable], None] | None = None,
        on_close: Callable[[Hashable], None] | None = None,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self._idle: dict[Hashable, collections.deque[UpstreamConn]] = {}
        self._open: set[UpstreamConn] = set()
        self._on_open = on_open
        self._on_close = on_close
        self._reaper: asyncio.TimerHandle | None = None
        self._closing = False
        self.stale = 0  # idle connections found closed by the peer (and dropped)
        self.opened = 0

    def __len__(self) -> int:
        return len(self._open)

    def idle_count(self, key: Hashable | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(q) for q in self._idle.values())

    async def acquire(
        self, key: Hashable, connect: Callable[[], Awaitable[Side]], *, fresh: bool = False
    ) -> UpstreamConn:
        """An idle connection for ``key`` (unless ``fresh``), else a new one from
        ``connect()`` (whose exceptions pass through)."""
        if not fresh:
            conn = self.take_idle(key)
            if conn is not None:
                return conn
        side = await connect()
        conn = UpstreamConn(self, key, side)
        self._open.add(conn)
        self.opened += 1
        if self._on_open is not None:
            self._on_open(key)
        closed: asyncio.Future[None] = side.closed  # type: ignore[attr-defined]
        closed.add_done_callback(lambda _: self._gone(conn))
        conn.channel.start()
        return conn

    def take_idle(self, key: Hashable) -> UpstreamConn | None:
        """An idle, usable connection for ``key`` (most recently used first), or None;
        without a wait, for the callers that try this before ``acquire``."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            self._drop(conn)
        return None

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """The exchange on ``conn`` is over; keep it for the next one if ``reusable``."""
        ch = conn.channel
        ch.waker = None
        if not reusable or self._closing or not conn.usable:
            self.discard(conn, graceful=reusable)
            return
        idle = self._idle.setdefault(conn.key, collections.deque())
        if len(idle) >= self.max_idle:
            self.discard(conn, graceful=True)
            return
        conn.idle_since = asyncio.get_running_loop().time()
        ch.on_idle_news = conn._idle_news
        idle.append(conn)
        self._schedule_reaper()

    def discard(self, conn: UpstreamConn, *, graceful: bool = False) -> None:
        """Close ``conn`` (a reset unless ``graceful``) and forget it."""
        self._remove_idle(conn)
        ch = conn.channel
        ch.waker = None
        ch.on_idle_news = None
        if graceful:
            ch.close()
        else:
            ch.abort()

    def close_all(self) -> None:
        """Close every idle connection and refuse to pool any more (shutdown)."""
        self._closing = True
        for idle in list(self._idle.values()):
            for conn in list(idle):
                self.discard(conn, graceful=True)
        self._idle.clear()
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    def abort_all(self) -> None:
        self.close_all()
        for conn in list(self._open):
            conn.channel.abort()

    # -- internals ---------------------------------------------------------------------------

    def _stale_idle(self, conn: UpstreamConn) -> None:
        """An idle connection had news: the peer closed it or spoke unasked. Drop it."""
        self.stale += 1
        self.discard(conn, graceful=not conn.channel.parser.buffered)

    def _remove_idle(self, conn: UpstreamConn) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def _drop(self, conn: UpstreamConn) -> None:
        self.stale += 1
        self.discard(conn, graceful=False)

    def _gone(self, conn: UpstreamConn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._remove_idle(conn)
            if self._on_close is not None:
                try:
                    self._on_close(conn.key)
                except Exception:
                    log.exception("pool on_close callback failed")

    def _schedule_reaper(self) -> None:
        if self._reaper is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(max(1.0, self.idle_timeout_s / 4), self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = asyncio.get_running_loop().time()
        limit = now - self.idle_timeout_s
        for idle in list(self._idle.values()):
            # Oldest first (left); the deque is in release order.
            while idle and idle[0].idle_since <= limit:
                self.discard(idle[0], graceful=True)
        if self._idle:
            self._schedule_reaper()
