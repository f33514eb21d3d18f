"""Pooled client HTTP/2 connections, per key: many streams share one connection.

For: the outbound side's connections to peer sidecars (h2 over mTLS, ALPN ``h2``; the
key names the service, the endpoint and its identity) and the inbound side's h2c
connections to the app. ``ready(key)`` is a connection that can open a stream now (the
oldest with room, so streams gather on few connections) or None; ``connect(key, dial)``
is the future of the connect under way for that key, started if there is none, so
concurrent callers share one connect (a caller whose stream does not fit on it asks
again, and the next connect starts). ``acquire`` does both, for code that can await.

A connection that is closing (a GOAWAY either way, its transport gone) is never handed
out and leaves the pool as it closes; one that carried no stream for
``idle_timeout_s`` is closed by a reaper (GOAWAY, then close). ``on_open``/``on_close``
report each connection's key (metrics). The dialler owns admission (the circuit
breaker's pending and connection counts) and its exceptions reach the callers.

Must never: hand out a connection that cannot open a stream, run two connects for one
key at once, or keep a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

from sidecar.h2_limits import H2Limits
from sidecar.h2_stream import H2Error
from sidecar.h2conn import H2Connection
from sidecar.relay import Side

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 60.0
MAX_ROUNDS = 4  # connects one ``acquire`` may wait for before it gives up on a slot

Dial = Callable[[], Awaitable[Side]]


class H2Pool:
    """Client HTTP/2 connections by key (see the module docstring)."""

    def __init__(
        self,
        *,
        limits: H2Limits | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        on_open: Callable[[Hashable], None] | None = None,
        on_close: Callable[[Hashable], None] | None = None,
    ) -> None:
        self.limits = limits or H2Limits()
        self.idle_timeout_s = idle_timeout_s
        self._on_open = on_open
        self._on_close = on_close
        self._by_key: dict[Hashable, list[H2Connection]] = {}
        self._keys: dict[H2Connection, Hashable] = {}  # every open connection
        # Per connection: streams opened so far and when the reaper last saw it in use.
        self._seen: dict[H2Connection, tuple[int, float]] = {}
        self._connecting: dict[Hashable, asyncio.Future[H2Connection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._closing = False
        self.opened = 0  # connections made since the pool was

    def __len__(self) -> int:
        return len(self._keys)

    def count(self, key: Hashable) -> int:
        """Connections for ``key`` that are open and not closing."""
        return len(self._by_key.get(key, ()))

    def ready(self, key: Hashable) -> H2Connection | None:
        """A connection for ``key`` with room for one more stream, or None."""
        conns = self._by_key.get(key)
        if not conns:
            return None
        for conn in conns:
            if conn.can_open_stream():
                return conn
        for conn in [c for c in conns if _closing(c)]:
            self._forget(conn, keep_open=True)
        return None

    def connect(self, key: Hashable, dial: Dial) -> asyncio.Future[H2Connection]:
        """The connect under way for ``key`` (one is started if none is); it resolves
        with the new connection or with ``dial``'s exception."""
        fut = self._connecting.get(key)
        if fut is not None:
            return fut
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._closing:
            fut.set_exception(H2Error("the HTTP/2 pool is closed"))
            fut.exception()  # retrieved: nobody may be waiting
            return fut
        self._connecting[key] = fut
        task = loop.create_task(self._connect(key, dial, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def acquire(self, key: Hashable, dial: Dial) -> H2Connection:
        """A connection with room for a stream (open it at once, before awaiting)."""
        for _ in range(MAX_ROUNDS):
            conn = self.ready(key)
            if conn is not None:
                return conn
            conn = await asyncio.shield(self.connect(key, dial))
            if conn.can_open_stream():
                return conn
        raise H2Error(f"no HTTP/2 stream slot on {MAX_ROUNDS} new connections")

    def abort_all(self) -> None:
        """Now: connects are cancelled and every connection is reset (shutdown)."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._keys):
            conn.abort()

    # -- internals ---------------------------------------------------------------------------

    async def _connect(self, key: Hashable, dial: Dial, fut: asyncio.Future[H2Connection]) -> None:
        try:
            side = await dial()
        except BaseException as e:
            self._connecting.pop(key, None)
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
                raise
            fut.set_exception(e)
            fut.exception()  # retrieved: the callers may all have gone meanwhile
            return
        self._connecting.pop(key, None)
        if self._closing:
            side.abort()
            fut.set_exception(H2Error("the HTTP/2 pool is closed"))
            fut.exception()
            return
        conn = H2Connection(side, client=True, limits=self.limits)
        self._keys[conn] = key
        self._by_key.setdefault(key, []).append(conn)
        self._seen[conn] = (0, asyncio.get_running_loop().time())
        self.opened += 1
        conn.closed.add_done_callback(lambda _: self._forget(conn, keep_open=False))
        if self._on_open is not None:
            self._call(self._on_open, key)
        conn.start()
        self._schedule_reaper()
        fut.set_result(conn)

    def _forget(self, conn: H2Connection, *, keep_open: bool) -> None:
        """Out of the per-key list (no new streams); with ``keep_open`` it stays counted
        until it closes (its streams finish)."""
        key = self._keys.get(conn)
        if key is None:
            return
        conns = self._by_key.get(key)
        if conns is not None:
            with contextlib.suppress(ValueError):
                conns.remove(conn)
            if not conns:
                del self._by_key[key]
        if keep_open:
            return
        del self._keys[conn]
        self._seen.pop(conn, None)
        if self._on_close is not None:
            self._call(self._on_close, key)

    def _call(self, fn: Callable[[Hashable], None], key: Hashable) -> None:
        try:
            fn(key)
        except Exception:
            log.exception("HTTP/2 pool callback failed")

    def _schedule_reaper(self) -> None:
        if self._reaper is None and not self._closing and self._keys:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(max(0.5, self.idle_timeout_s / 4), self._reap)

    def _reap(self) -> None:
        """Close the connections that carried no stream for ``idle_timeout_s`` (measured
        from the last look that saw one in use: within a quarter of the timeout)."""
        self._reaper = None
        now = asyncio.get_running_loop().time()
        for conn in list(self._keys):
            opened = conn.stats.streams_opened
            seen, since = self._seen.get(conn, (opened, now))
            if conn.active_streams or opened != seen:
                self._seen[conn] = (opened, now)
            elif now - since >= self.idle_timeout_s:
                self._forget(conn, keep_open=True)
                conn.close()
        self._schedule_reaper()


def _closing(conn: H2Connection) -> bool:
    return (
        conn.closed.done()
        or conn.close_reason is not None
        or conn.goaway_received is not None
        or conn.goaway_sent is not None
    )
