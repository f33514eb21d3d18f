"""The SQLite store backend: one file in the data dir, WAL, fsync before a commit returns.

Rules this module keeps:

- One connection, opened, used and closed only on one dedicated worker thread: the event
  loop never waits on the disk, and statements run in submission order.
- The process holds the file exclusively; a second control plane on the same data dir is
  refused (ConflictError) instead of forking the history.
- Watchers are woken in-process (``fanout``) by the worker right after each COMMIT, so a
  cancelled caller cannot make them miss a commit that happened; nothing polls the file.
- No ``sqlite3`` error escapes: they become InputError (damaged or unreadable file),
  ConflictError (file in use) or MeshError (the operation failed; nothing was applied).

The SQL itself lives in ``sqlite_tx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from control_plane.store import sqlite_tx
from control_plane.store.base import (
    Change,
    CompactedError,
    Op,
    Store,
    check_ops,
    check_since,
)
from control_plane.store.fanout import Fanout
from meshlet.errors import ConflictError, InputError, MeshError

T = TypeVar("T")

LOCK_TIMEOUT_S = 2.0  # how long open waits for another process to let go of the file


class SqliteStore(Store):
    """``Store`` on a SQLite file. Open it on the event loop that will use it.

    ``history`` is how many revisions of change log are kept (older ones are compacted
    after each commit); ``watch_buffer`` how many commits a watcher may lag in memory
    before it has to catch up from the log.
    """

    def __init__(self, path: Path, *, history: int = 10_000, watch_buffer: int = 1024) -> None:
        if history < 1:
            raise InputError(f"store history must keep at least 1 revision, not {history}")
        if watch_buffer < 1:
            raise InputError(f"store watch buffer must hold at least 1 commit, not {watch_buffer}")
        self._path = Path(path)
        self._history = history
        self._fanout = Fanout(buffer=watch_buffer)
        self._state = "new"  # new -> open -> closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._revision = 0
        self._compacted = 0

    @property
    def path(self) -> Path:
        return self._path

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compacted(self) -> int:
        return self._compacted

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._state != "new":
            raise MeshError(f"store {self._path} was opened before: make a new SqliteStore")
        self._state = "open"
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshlet-store")
        try:
            self._revision, self._compacted = await self._run("open", self._open_sync)
        except BaseException:
            self._state = "closed"
            self._executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closed"
        self._fanout.close()
        assert self._executor is not None
        try:
            await self._run("close", self._close_sync)
        finally:
            self._executor.shutdown(wait=True)

    # -- reads -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        self._require_open()
        return await self._run("get", self._on_conn(sqlite_tx.get), key)

    async def snapshot(self, prefix: str = "") -> tuple[int, dict[str, bytes]]:
        self._require_open()
        return await self._run("snapshot", self._on_conn(sqlite_tx.snapshot), prefix)

    async def changes(self, since: int) -> list[Change]:
        check_since(since)
        self._require_open()
        return await self._run("read changes", self._on_conn(sqlite_tx.changes), since)

    def watch(
        self, since: int, *, wake: asyncio.Event | None = None
    ) -> AsyncGenerator[list[Change]]:
        check_since(since)
        self._require_open()
        if since < self._compacted:
            raise CompactedError(requested=since, compacted=self._compacted, current=self._revision)
        return self._fanout.follow(since, self.changes, wake=wake)

    # -- writes ------------------------------------------------------------------------

    async def commit(
        self, ops: Sequence[Op], *, if_revision: int | None = None
    ) -> tuple[int, list[Change]]:
        ops = list(ops)
        check_ops(ops)
        if if_revision is not None:
            check_since(if_revision)
        self._require_open()
        return await self._run("commit", self._commit_sync, ops, if_revision)

    async def compact(self, revision: int) -> None:
        check_since(revision)
        self._require_open()
        await self._run("compact", self._compact_sync, revision)

    # -- plumbing ----------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            raise MeshError(f"store {self._path} is {self._state}: open it first")

    async def _run(self, action: str, fn: Callable[..., T], *args: object) -> T:
        assert self._loop is not None
        call = functools.partial(self._guarded, action, fn, *args)
        return await self._loop.run_in_executor(self._executor, call)

    def _guarded(self, action: str, fn: Callable[..., T], *args: object) -> T:
        """Worker thread: run ``fn``, translating sqlite3 errors where they enter."""
        try:
            return fn(*args)
        except sqlite3.Error as e:
            raise self._translate(e, action) from e

    def _on_conn(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Worker thread: ``fn(connection, *args)``."""

        def call(*args: object) -> T:
            assert self._conn is not None
            return fn(self._conn, *args)

        return call

    def _translate(self, e: sqlite3.Error, action: str) -> MeshError:
        p = self._path
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return self._damaged(str(e))
        if primary in (
            sqlite3.SQLITE_CANTOPEN,
            sqlite3.SQLITE_PERM,
            sqlite3.SQLITE_READONLY,
            sqlite3.SQLITE_AUTH,
        ):
            return InputError(
                f"cannot {action} store file {p} ({e}): check that {p.parent} is a directory "
                f"this user can read and write"
            )
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return ConflictError(
                f"store file {p} is in use by another process ({e}): stop the other control "
                f"plane or give this one its own data dir"
            )
        if primary == sqlite3.SQLITE_FULL:
            return MeshError(f"store file {p}: the disk is full, {action} was not applied")
        return MeshError(f"store file {p}: {action} failed, nothing was applied ({e})")

    def _damaged(self, detail: str) -> InputError:
        p = self._path
        return InputError(
            f"store file {p} is damaged or not a SQLite database ({detail}): stop the control "
            f"plane, move {p.name} and {p.name}-wal out of {p.parent} and start again with an "
            f"empty store, or restore them from a backup"
        )

    def _publish(self, revision: int, compacted: int, changes: list[Change]) -> None:
        """Worker thread, right after a COMMIT: update the loop's view, in commit order."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._published, revision, compacted, changes)

    def _published(self, revision: int, compacted: int, changes: list[Change]) -> None:
        self._revision = revision
        self._compacted = compacted
        if changes:
            self._fanout.publish(changes)

    # -- worker thread -----------------------------------------------------------------

    def _open_sync(self) -> tuple[int, int]:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create the data dir {self._path.parent} ({e.strerror}): create it "
                f"or choose another data dir"
            ) from e
        conn = sqlite3.connect(self._path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        try:
            state = sqlite_tx.prepare(conn, self._path)
            if problems := sqlite_tx.quick_check(conn):
                raise self._damaged("quick_check: " + "; ".join(problems[:3]))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return state

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _commit_sync(self, ops: list[Op], if_revision: int | None) -> tuple[int, list[Change]]:
        assert self._conn is not None
        revision, compacted, changes = sqlite_tx.commit(
            self._conn, ops, if_revision=if_revision, history=self._history
        )
        if changes:
            self._publish(revision, compacted, changes)
        return revision, changes

    def _compact_sync(self, revision: int) -> None:
        assert self._conn is not None
        if (done := sqlite_tx.compact(self._conn, revision)) is not None:
            self._publish(*done, [])
