"""The store contract: a durable, revisioned key-value map with a change log (etcd v3 semantics).

Every backend (SQLite now, etcd later) implements ``Store`` with exactly these rules:

- One global revision counter, 0 for a new store. Each commit that changes something gets
  exactly one new revision for its whole batch; a commit that changes nothing gets none.
  Revisions are never reused, not after compaction and not after a restart.
- A commit is atomic and durable when it returns.
- ``changes(since)`` and ``watch(since)`` give every change with a revision above ``since``,
  in order. A ``since`` below the compacted revision raises ``CompactedError``: the
  caller must re-list (``snapshot``) and resume from the snapshot's revision.

This module holds only the contract and the pure checks every backend shares; it never does
I/O.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Self

from meshlet.errors import InputError, MeshError

if TYPE_CHECKING:
    import asyncio


@dataclass(frozen=True, slots=True)
class Put:
    """Set ``key`` to ``value``."""

    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove ``key`` (a no-op when it is missing)."""

    key: str


Op = Put | Delete


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One key's change at one revision.

    ``value`` is the new value (None for DELETED); ``prev_value`` the value before the
    change (None for ADDED).
    """

    revision: int
    type: EventType
    key: str
    value: bytes | None
    prev_value: bytes | None = None


class CompactedError(MeshError):
    """The history asked for has been compacted away: re-list, then watch from there."""

    def __init__(self, *, requested: int, compacted: int, current: int) -> None:
        self.requested = requested
        self.compacted = compacted
        self.current = current
        super().__init__(
            f"revision {requested} has been compacted (history is kept after revision "
            f"{compacted}; current revision is {current}): re-list with a snapshot and "
            f"resume from its revision"
        )


def check_ops(ops: Sequence[Op]) -> None:
    """Refuse a batch no backend can apply as one transaction. Raises InputError."""
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete):
            raise InputError(f"store commit: {op!r} is neither Put nor Delete")
        key = op.key
        if not isinstance(key, str) or not key:
            raise InputError(f"store commit: key {key!r} must be a non-empty string")
        if "\x00" in key:
            raise InputError(f"store commit: key {key!r} contains a NUL character")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"store commit: key {key!r} is not valid Unicode ({e})") from e
        if isinstance(op, Put) and not isinstance(op.value, bytes):
            raise InputError(
                f"store commit: value for key {key!r} must be bytes, not {type(op.value).__name__}"
            )
        if key in seen:
            raise InputError(
                f"store commit: key {key!r} appears twice in one commit: merge the operations"
            )
        seen.add(key)


def check_since(since: int) -> None:
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise InputError(f"store: revision {since!r} must be a non-negative integer")


def split_by_revision(changes: Sequence[Change]) -> list[list[Change]]:
    """Cut an ordered change list into one batch per revision (one batch per commit)."""
    batches: list[list[Change]] = []
    for change in changes:
        if batches and batches[-1][0].revision == change.revision:
            batches[-1].append(change)
        else:
            batches.append([change])
    return batches


class Store(abc.ABC):
    """A durable, revisioned key-value store. Use it opened: ``async with store: ...``."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (creating if needed) the backing storage. Call once, before anything else."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release the storage; running watches end."""

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The current revision (0 for a new store)."""

    @property
    @abc.abstractmethod
    def compacted(self) -> int:
        """The compacted revision: history at or below it is gone (0 when nothing was)."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The key's current value, or None."""

    @abc.abstractmethod
    async def snapshot(self, prefix: str = "") -> tuple[int, dict[str, bytes]]:
        """Every key under ``prefix`` (sorted), all read at the one returned revision."""

    @abc.abstractmethod
    async def commit(
        self, ops: Sequence[Op], *, if_revision: int | None = None
    ) -> tuple[int, list[Change]]:
        """Apply ``ops`` atomically and durably under one new revision.

        A Put of an unchanged value or a Delete of a missing key is a no-op; when nothing
        changes, no revision is used and ``(current revision, [])`` is returned. With
        ``if_revision`` set and not equal to the current revision, raises ConflictError and
        writes nothing. A key may appear only once per commit (InputError otherwise).
        """

    @abc.abstractmethod
    async def changes(self, since: int) -> list[Change]:
        """Every change with a revision above ``since``, in order.

        Raises CompactedError when ``since`` is below the compacted revision; returns []
        when ``since`` is at or beyond the current revision.
        """

    @abc.abstractmethod
    def watch(
        self, since: int, *, wake: asyncio.Event | None = None
    ) -> AsyncGenerator[list[Change]]:
        """Changes after ``since``: the backlog first (one batch, skipped when empty), then
        one batch per commit as it happens. With ``wake`` (the consumer's own event), setting
        it also ends the wait for the next batch: an empty batch comes out when none is new.

        Raises CompactedError at once when ``since`` is compacted, and from the iterator
        when a consumer falls so far behind that its next change has been compacted. A slow
        consumer never delays a commit. The iteration ends when the store closes. Close it
        when done (``contextlib.aclosing``).
        """

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Drop the history at or below ``revision`` (current keys stay). Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
