"""The control plane's durable, revisioned key-value store (see ``base`` for the contract).

This module only picks a backend by name; it opens nothing. Use the store opened:
``async with open_store("sqlite", data_dir) as store: ...``.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.store.base import (
    Change,
    CompactedError,
    Delete,
    EventType,
    Op,
    Put,
    Store,
)
from control_plane.store.sqlite import SqliteStore
from meshlet.errors import InputError

SQLITE_FILE = "store.db"  # inside the data dir (with store.db-wal next to it)
SUPPORTED = ("sqlite",)

__all__ = [
    "SQLITE_FILE",
    "Change",
    "CompactedError",
    "Delete",
    "EventType",
    "Op",
    "Put",
    "SqliteStore",
    "Store",
    "open_store",
]


def open_store(kind: str, data_dir: Path, *, history: int = 10_000) -> Store:
    """The store backend named ``kind``, keeping its files in ``data_dir`` (not yet opened)."""
    if kind == "sqlite":
        return SqliteStore(Path(data_dir) / SQLITE_FILE, history=history)
    raise InputError(f"store {kind!r} is not supported: use {' or '.join(SUPPORTED)}")
