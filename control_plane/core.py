"""The control plane's state machine, made durable: registry + store + watchers.

``execute(command)`` runs the pure registry, commits the resulting events to the store
as one transaction, and only then adopts the new state, so a failed write changes
nothing. Readers get consistent snapshots; ``wait_for`` serves blocking queries and
``watch`` streams events decoded from the store's change log (so every store backend,
SQLite or etcd, gives the same semantics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence

from control_plane.registry import TABLES, Command, Config, State, apply
from control_plane.store.base import Change, Delete, Op, Put, Store
from meshlet import wire
from meshlet.model import Event, EventType, Kind, Object, Snapshot, key_of, kind_of

log = logging.getLogger(__name__)


def store_key(obj: Object) -> str:
    return f"{kind_of(obj).value}/{key_of(obj)}"


def to_ops(events: list[Event]) -> list[Op]:
    ops: dict[str, Op] = {}
    for ev in events:
        key = store_key(ev.object)
        ops[key] = Delete(key) if ev.type is EventType.DELETED else Put(key, wire.encode(ev.object))
    return list(ops.values())


def _decode(key: str, raw: bytes) -> Object:
    kind = Kind(key.split("/", 1)[0])
    return wire.decode(wire.KIND_TYPES[kind], raw, what=f"stored {key}")


def to_event(change: Change) -> Event:
    raw = change.value if change.value is not None else change.prev_value
    assert raw is not None, f"store change without a value: {change}"
    return Event(
        type=EventType(change.type.value), object=_decode(change.key, raw), revision=change.revision
    )


class ControlPlane:
    # Decoded batches kept for the watchers still behind: one commit reaches every watcher
    # as the same batch, so it is decoded once, not once per watcher.
    DECODED_BATCHES = 64

    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg
        self.state = State()
        self.revision = 0
        self._write = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._decoded: OrderedDict[tuple[int, int, int], list[Event]] = OrderedDict()

    async def load(self) -> None:
        """Read the whole state from the store (on start)."""
        revision, kv = await self.store.snapshot()
        tables: dict[Kind, dict[str, Object]] = {k: {} for k in TABLES}
        for key, raw in kv.items():
            obj = _decode(key, raw)
            tables[kind_of(obj)][key_of(obj)] = obj
        self.state = State(**{TABLES[k]: t for k, t in tables.items()})  # type: ignore[arg-type]
        self.revision = revision
        log.info(
            "state loaded",
            extra={
                "revision": revision,
                "services": len(self.state.services),
                "endpoints": len(self.state.endpoints),
                "nodes": len(self.state.nodes),
            },
        )

    @property
    def snapshot(self) -> Snapshot:
        return self.state.snapshot(self.revision)

    async def execute(self, command: Command) -> tuple[int, list[Event]]:
        """Apply ``command``; return the revision it produced (or the current one) and events."""
        async with self._write:
            new_state, events = apply(self.state, command, self.cfg)
            if not events:
                return self.revision, []
            revision, _ = await self.store.commit(to_ops(events))
            self.state, self.revision = new_state, revision
        async with self._changed:
            self._changed.notify_all()
        return revision, [Event(type=e.type, object=e.object, revision=revision) for e in events]

    async def execute_all(self, commands: list[Command]) -> int:
        """Apply ``commands`` in order (e.g. what a heartbeat decided); the revision after them."""
        revision = self.revision
        for command in commands:
            revision, _ = await self.execute(command)
        return revision

    async def wait_for(self, index: int, wait_s: float) -> int:
        """Return once the revision passes ``index`` or ``wait_s`` runs out (a blocking query)."""
        if self.revision > index or index < 0:
            return self.revision
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._changed.wait_for(lambda: self.revision > index)
        return self.revision

    async def watch(
        self, since: int, *, wake: asyncio.Event | None = None
    ) -> AsyncGenerator[list[Event]]:
        """Events after ``since``, batch per revision; raises CompactedError when it is gone.
        With ``wake`` (the caller's event), setting it yields an empty batch if nothing came."""
        async with contextlib.aclosing(self.store.watch(since, wake=wake)) as batches:
            async for batch in batches:
                yield self._events(batch)

    def _events(self, batch: Sequence[Change]) -> list[Event]:
        """``batch`` decoded, shared by every watcher (a revision's changes never change)."""
        if not batch:
            return []
        key = (batch[0].revision, batch[-1].revision, len(batch))
        events = self._decoded.get(key)
        if events is None:
            events = [to_event(c) for c in batch]
            self._decoded[key] = events
            if len(self._decoded) > self.DECODED_BATCHES:
                self._decoded.popitem(last=False)
        return events
