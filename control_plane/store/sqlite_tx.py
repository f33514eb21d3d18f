"""The SQLite store's transactions: schema, and one synchronous function per operation.

Each function takes a ``sqlite3.Connection`` (autocommit mode, owned by the caller's one
worker thread), runs one whole transaction and leaves none open, whatever happens. Every
change is one row in ``log``; ``meta`` holds the current and the compacted revision, so
revisions are never reused after compaction or a restart.

This module never touches the event loop, threads or watchers, and lets ``sqlite3`` errors
through untranslated (the async shell in ``sqlite.py`` translates them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from control_plane.store.base import Change, CompactedError, Delete, EventType, Op, Put
from meshlet.errors import ConflictError, InputError

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
    " create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE log (revision INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,"
    " key TEXT NOT NULL, value BLOB, prev_value BLOB, PRIMARY KEY (revision, seq)) WITHOUT ROWID",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """Run the body in one transaction: COMMIT if it returns, ROLLBACK if it raises.

    A read-only body may ROLLBACK itself (nothing to keep); the transaction is then over.
    """
    conn.execute(begin)
    try:
        yield
        if conn.in_transaction:
            conn.execute("COMMIT")  # WAL + synchronous=FULL: on disk when this returns
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def prepare(conn: sqlite3.Connection, path: Path) -> tuple[int, int]:
    """Set the pragmas, take the file, create or check the schema.

    Returns (revision, compacted). Raises InputError for a file that is not a usable store.
    """
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no shared memory, one owner
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise InputError(
            f"store file {path} cannot use write-ahead logging (journal mode stays {mode!r}): "
            f"put the data dir on a local filesystem"
        )
    conn.execute("PRAGMA synchronous=FULL")
    with _transaction(conn, "BEGIN IMMEDIATE"):  # takes the file; EXCLUSIVE mode keeps it
        _ensure_schema(conn, path)
    return read_meta(conn)


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """SQLite's structural check of the whole file: [] when it is sound."""
    problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
    return [] if problems == ["ok"] else problems


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (name, value) VALUES (?, ?)",
            [("schema", SCHEMA_VERSION), ("revision", 0), ("compacted", 0)],
        )
        return
    if not {"kv", "log", "meta"} <= tables:
        raise InputError(
            f"{path} is a SQLite database but not a meshlet store: give the control plane "
            f"its own data dir"
        )
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    if row is None or row[0] != SCHEMA_VERSION:
        found = None if row is None else row[0]
        raise InputError(
            f"store file {path} has schema version {found}, this meshlet reads version "
            f"{SCHEMA_VERSION}: run the meshlet release that wrote it"
        )


def read_meta(conn: sqlite3.Connection) -> tuple[int, int]:
    """(revision, compacted) as stored."""
    rows = conn.execute("SELECT name, value FROM meta WHERE name IN ('revision', 'compacted')")
    meta = dict(rows)
    return int(meta["revision"]), int(meta["compacted"])


def get(conn: sqlite3.Connection, key: str) -> bytes | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def snapshot(conn: sqlite3.Connection, prefix: str) -> tuple[int, dict[str, bytes]]:
    with _transaction(conn):
        revision, _ = read_meta(conn)
        end = prefix_end(prefix)
        if end is None:
            rows = conn.execute("SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,))
        else:
            rows = conn.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key", (prefix, end)
            )
        return revision, {key: bytes(value) for key, value in rows}


def changes(conn: sqlite3.Connection, since: int) -> list[Change]:
    with _transaction(conn):
        current, compacted = read_meta(conn)
        if since < compacted:
            raise CompactedError(requested=since, compacted=compacted, current=current)
        rows = conn.execute(
            "SELECT revision, type, key, value, prev_value FROM log"
            " WHERE revision > ? ORDER BY revision, seq",
            (since,),
        )
        return [
            Change(
                revision=revision,
                type=EventType(kind),
                key=key,
                value=None if value is None else bytes(value),
                prev_value=None if prev is None else bytes(prev),
            )
            for revision, kind, key, value, prev in rows
        ]


def commit(
    conn: sqlite3.Connection, ops: list[Op], *, if_revision: int | None, history: int
) -> tuple[int, int, list[Change]]:
    """Apply ``ops`` under one new revision, compacting to keep ``history`` revisions.

    Returns (revision, compacted, changes); with no changes nothing is written and the
    current revision is returned.
    """
    with _transaction(conn, "BEGIN IMMEDIATE"):
        current, compacted = read_meta(conn)
        if if_revision is not None and if_revision != current:
            raise ConflictError(
                f"store commit expected revision {if_revision} but the store is at revision "
                f"{current}: nothing was written; re-read and try again"
            )
        revision = current + 1
        done = [c for op in ops if (c := _apply(conn, revision, op)) is not None]
        if not done:
            conn.execute("ROLLBACK")
            return current, compacted, []
        conn.executemany(
            "INSERT INTO log (revision, seq, type, key, value, prev_value)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (revision, seq, c.type.value, c.key, c.value, c.prev_value)
                for seq, c in enumerate(done)
            ],
        )
        if revision - compacted > history:
            compacted = revision - history
            conn.execute("DELETE FROM log WHERE revision <= ?", (compacted,))
        _write_meta(conn, revision, compacted)
    return revision, compacted, done


def compact(conn: sqlite3.Connection, revision: int) -> tuple[int, int] | None:
    """Drop the log at or below ``revision``. Returns (revision, compacted), None if a no-op."""
    with _transaction(conn, "BEGIN IMMEDIATE"):
        current, compacted = read_meta(conn)
        if revision > current:
            raise InputError(
                f"cannot compact the store to revision {revision}: the current revision is "
                f"{current}"
            )
        if revision <= compacted:
            conn.execute("ROLLBACK")
            return None
        conn.execute("DELETE FROM log WHERE revision <= ?", (revision,))
        _write_meta(conn, current, revision)
    return current, revision


def _apply(conn: sqlite3.Connection, revision: int, op: Op) -> Change | None:
    """Apply one op to ``kv`` inside the open transaction; None when it changes nothing."""
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (op.key,)).fetchone()
    prev = None if row is None else bytes(row[0])
    if isinstance(op, Put):
        if prev is None:
            conn.execute(
                "INSERT INTO kv (key, value, create_revision, mod_revision) VALUES (?, ?, ?, ?)",
                (op.key, op.value, revision, revision),
            )
            return Change(revision=revision, type=EventType.ADDED, key=op.key, value=op.value)
        if prev == op.value:
            return None
        conn.execute(
            "UPDATE kv SET value = ?, mod_revision = ? WHERE key = ?",
            (op.value, revision, op.key),
        )
        kind, value = EventType.MODIFIED, op.value
    else:
        assert isinstance(op, Delete)
        if prev is None:
            return None
        conn.execute("DELETE FROM kv WHERE key = ?", (op.key,))
        kind, value = EventType.DELETED, None
    return Change(revision=revision, type=kind, key=op.key, value=value, prev_value=prev)


def _write_meta(conn: sqlite3.Connection, revision: int, compacted: int) -> None:
    conn.executemany(
        "UPDATE meta SET value = ? WHERE name = ?",
        [(revision, "revision"), (compacted, "compacted")],
    )


def prefix_end(prefix: str) -> str | None:
    """The smallest string above every string starting with ``prefix`` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so the range
    ``[prefix, end)`` holds exactly the keys under ``prefix``.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars[-1])
        if code == 0x10FFFF:
            chars.pop()
            continue
        code += 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored; skip past them
            code = 0xE000
        chars[-1] = chr(code)
        return "".join(chars)
    return None
