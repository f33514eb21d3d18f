"""The SQLite store against real files: revisions, atomicity, restarts, compaction, watches,
crash safety (kill -9 of a writer process) and a replay property (hypothesis)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.store import (
    SQLITE_FILE,
    Change,
    CompactedError,
    Delete,
    EventType,
    Op,
    Put,
    SqliteStore,
    open_store,
    sqlite_tx,
)
from control_plane.store import sqlite as sqlite_backend
from meshlet.errors import ConflictError, InputError, MeshError

ADDED, MODIFIED, DELETED = EventType.ADDED, EventType.MODIFIED, EventType.DELETED


@contextlib.asynccontextmanager
async def opened(path: Path, **kwargs: int) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(path, **kwargs) as store:
        yield store


async def state(store: SqliteStore) -> tuple[int, dict[str, bytes], list[Change]]:
    revision, snap = await store.snapshot()
    return revision, snap, await store.changes(store.compacted)


# -- revisions and change types ---------------------------------------------------------------


async def test_new_store_is_empty_at_revision_zero(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        assert store.revision == 0
        assert await store.snapshot() == (0, {})
        assert await store.changes(0) == []
        assert await store.get("missing") is None


async def test_each_commit_bumps_the_revision_once_for_its_whole_batch(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        rev, changes = await store.commit([Put("a", b"1"), Put("b", b"2"), Put("c", b"3")])
        assert rev == store.revision == 1
        assert [(c.revision, c.key) for c in changes] == [(1, "a"), (1, "b"), (1, "c")]
        rev, _ = await store.commit([Put("a", b"x"), Delete("b")])
        assert rev == store.revision == 2
        assert await store.snapshot() == (2, {"a": b"x", "c": b"3"})


async def test_commits_that_change_nothing_use_no_revision(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        await store.commit([Put("a", b"1")])
        assert await store.commit([]) == (1, [])
        assert await store.commit([Put("a", b"1")]) == (1, [])
        assert await store.commit([Delete("missing")]) == (1, [])
        assert await store.commit([Put("a", b"1"), Delete("gone")], if_revision=1) == (1, [])
        rev, changes = await store.commit([Put("a", b"1"), Put("b", b"2"), Delete("gone")])
        assert rev == 2
        assert [c.key for c in changes] == ["b"]  # only real changes are reported
        assert [c.revision for c in await store.changes(0)] == [1, 2]


async def test_change_types_follow_the_key_lifecycle(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        await store.commit([Put("k", b"v1")])
        await store.commit([Put("k", b"v2")])
        await store.commit([Delete("k")])
        await store.commit([Put("k", b"")])  # empty value is a value, not a deletion
        assert await store.changes(0) == [
            Change(revision=1, type=ADDED, key="k", value=b"v1", prev_value=None),
            Change(revision=2, type=MODIFIED, key="k", value=b"v2", prev_value=b"v1"),
            Change(revision=3, type=DELETED, key="k", value=None, prev_value=b"v2"),
            Change(revision=4, type=ADDED, key="k", value=b"", prev_value=None),
        ]
        assert await store.get("k") == b""


async def test_changes_resume_after_any_revision(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        for i in range(5):
            await store.commit([Put(f"k{i}", b"v")])
        assert [c.key for c in await store.changes(2)] == ["k2", "k3", "k4"]
        assert await store.changes(5) == []
        assert await store.changes(99) == []  # a future revision: nothing yet
        with pytest.raises(InputError):
            await store.changes(-1)


async def test_snapshot_of_a_prefix_holds_exactly_the_keys_under_it(tmp_path: Path) -> None:
    keys = ["a", "a/", "a/b", "a/\U0010ffff", "a0", "ab", "a\U0010ffff/x", "b", "\ud7ffz", "\ue000"]
    async with opened(tmp_path / "s.db") as store:
        await store.commit([Put(k, k.encode()) for k in keys])
        assert list((await store.snapshot("a/"))[1]) == ["a/", "a/b", "a/\U0010ffff"]
        assert list((await store.snapshot("a\U0010ffff"))[1]) == ["a\U0010ffff/x"]
        assert list((await store.snapshot("\ud7ff"))[1]) == ["\ud7ffz"]
        assert list((await store.snapshot())[1]) == sorted(keys)


async def test_a_malformed_batch_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        bad: list[list[Op]] = [
            [Put("a", b"1"), Delete("a")],
            [Put("", b"1")],
            [Put("a\x00b", b"1")],
            [Put("a", "text")],  # type: ignore[arg-type]
        ]
        for ops in bad:
            with pytest.raises(InputError):
                await store.commit(ops)
        assert await store.snapshot() == (0, {})


# -- atomicity ------------------------------------------------------------------------------


async def test_stale_if_revision_is_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        await store.commit([Put("a", b"1"), Put("b", b"2")])
        await store.commit([Put("a", b"2")])
        before = await state(store)
        with pytest.raises(ConflictError, match="revision 1 but the store is at revision 2"):
            await store.commit([Put("c", b"3"), Delete("b")], if_revision=1)
        assert await state(store) == before
        rev, _ = await store.commit([Put("c", b"3")], if_revision=2)
        assert rev == 3


async def test_a_failure_in_the_middle_of_a_commit_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with opened(path) as store:
        await store.commit([Put("a", b"1"), Put("b", b"2")])
    # A real SQLite failure mid-transaction: a trigger that aborts the insert of one key.
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON kv WHEN NEW.key = 'boom'"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        raw.commit()
    async with opened(path) as store:
        before = await state(store)
        with pytest.raises(MeshError, match="injected failure") as failed:
            await store.commit([Put("x", b"1"), Delete("a"), Put("b", b"9"), Put("boom", b"!")])
        assert not isinstance(failed.value, ConflictError | InputError)
        assert await state(store) == before
        assert store.revision == 1
        rev, _ = await store.commit([Put("x", b"1")])  # the failed commit used no revision
        assert rev == 2
    async with opened(path) as store:
        assert await store.snapshot() == (2, {"a": b"1", "b": b"2", "x": b"1"})


# -- restarts and compaction ----------------------------------------------------------------


async def test_restart_keeps_revision_keys_and_history(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with opened(path) as store:
        await store.commit([Put("a", b"1"), Put("b", b"2")])
        await store.commit([Delete("a"), Put("c", b"3")])
        await store.commit([Put("b", b"22")])
        before = await state(store)
    async with opened(path) as store:
        assert store.revision == 3
        assert await state(store) == before
        assert (await store.commit([Put("d", b"4")]))[0] == 4


async def test_compacted_history_answers_relist_with_the_current_revision(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with opened(path) as store:
        for i in range(5):
            await store.commit([Put(f"k{i}", b"v")])
        await store.compact(3)
        with pytest.raises(CompactedError, match="re-list") as compacted:
            await store.changes(2)
        assert (compacted.value.requested, compacted.value.compacted) == (2, 3)
        assert compacted.value.current == 5
        assert [c.revision for c in await store.changes(3)] == [4, 5]
        assert len((await store.snapshot())[1]) == 5  # keys stay
        await store.compact(2)  # below the compacted revision: nothing to do
        with pytest.raises(InputError, match="current revision is 5"):
            await store.compact(6)
        assert (await store.commit([Put("k5", b"v")]))[0] == 6
    async with opened(path) as store:
        assert (store.revision, store.compacted) == (6, 3)
        with pytest.raises(CompactedError):
            await store.changes(2)
        assert (await store.commit([Put("k6", b"v")]))[0] == 7


async def test_revisions_are_never_reused_even_when_everything_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with opened(path) as store:
        await store.commit([Put("a", b"1")])
        await store.commit([Delete("a")])
        await store.compact(2)
    async with opened(path) as store:
        assert await store.snapshot() == (2, {})
        assert await store.changes(2) == []
        assert (await store.commit([Put("a", b"1")]))[0] == 3


async def test_history_is_compacted_automatically_to_its_limit(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db", history=3) as store:
        for i in range(10):
            await store.commit([Put("k", b"%d" % i)])
        assert store.compacted == 7
        assert [c.revision for c in await store.changes(7)] == [8, 9, 10]
        with pytest.raises(CompactedError):
            await store.changes(6)


# -- watches --------------------------------------------------------------------------------


def revisions(batches: list[list[Change]]) -> list[list[int]]:
    return [[c.revision for c in batch] for batch in batches]


async def test_watchers_get_the_backlog_then_each_commit_in_order(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        for i in range(3):
            await store.commit([Put(f"k{i}", b"v")])

        async def follow(since: int, queue: asyncio.Queue[list[Change]]) -> None:
            async with contextlib.aclosing(store.watch(since)) as watch:
                async for batch in watch:
                    queue.put_nowait(batch)

        queues: list[asyncio.Queue[list[Change]]] = [asyncio.Queue() for _ in range(4)]
        async with asyncio.timeout(10), asyncio.TaskGroup() as tasks:
            for queue in queues:
                tasks.create_task(follow(1, queue))
            for queue in queues:
                assert revisions([await queue.get()]) == [[2, 3]]  # the backlog, one batch
            for i in range(5):
                await store.commit([Put("live", b"%d" % i), Put(f"x{i}", b"1")])
            for queue in queues:
                live = [await queue.get() for _ in range(5)]
                assert revisions(live) == [[r, r] for r in range(4, 9)]
                assert [b[0].type for b in live] == [ADDED] + [MODIFIED] * 4
            await asyncio.sleep(0.05)
            assert all(queue.empty() for queue in queues)
            await store.close()  # ends every watch, so the task group finishes


async def test_a_slow_watcher_never_blocks_commits_and_catches_up_from_the_log(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "s.db", watch_buffer=4) as store:
        await store.commit([Put("k", b"0")])
        async with contextlib.aclosing(store.watch(0)) as watch:
            assert revisions([await anext(watch)]) == [[1]]
            async with asyncio.timeout(10):  # the watcher reads nothing meanwhile
                for i in range(1, 21):
                    await store.commit([Put("k", b"%d" % i)])
                caught_up = [await anext(watch) for _ in range(20)]
            assert revisions(caught_up) == [[r] for r in range(2, 22)]
            assert [b[0].value for b in caught_up] == [b"%d" % i for i in range(1, 21)]


async def test_a_watcher_left_behind_by_compaction_must_relist(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db", history=5, watch_buffer=2) as store:
        await store.commit([Put("k", b"0")])
        watch = store.watch(0)
        await anext(watch)
        for i in range(1, 20):
            await store.commit([Put("k", b"%d" % i)])
        with pytest.raises(CompactedError) as compacted:
            await anext(watch)
        assert compacted.value.current == 20


async def test_a_watch_from_a_compacted_revision_fails_at_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store:
        for i in range(4):
            await store.commit([Put(f"k{i}", b"v")])
        await store.compact(3)
        with pytest.raises(CompactedError) as compacted:
            store.watch(2)
        assert (compacted.value.requested, compacted.value.current) == (2, 4)
        async with contextlib.aclosing(store.watch(3)) as watch:
            assert revisions([await anext(watch)]) == [[4]]


async def test_a_watch_from_a_future_revision_starts_there(tmp_path: Path) -> None:
    async with opened(tmp_path / "s.db") as store, contextlib.aclosing(store.watch(2)) as watch:
        next_batch = asyncio.ensure_future(anext(watch))
        for i in range(3):
            await store.commit([Put("k", b"%d" % i)])
        assert revisions([await asyncio.wait_for(next_batch, 5)]) == [[3]]


async def test_a_commit_whose_caller_was_cancelled_still_reaches_watchers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real_commit = sqlite_tx.commit

    def held_commit(*args: Any, **kwargs: Any) -> Any:  # the worker is inside the commit...
        started.set()
        release.wait(5)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(sqlite_tx, "commit", held_commit)
    async with opened(tmp_path / "s.db") as store, contextlib.aclosing(store.watch(0)) as watch:
        pending = asyncio.ensure_future(anext(watch))
        commit = asyncio.create_task(store.commit([Put("k", b"v")]))
        assert await asyncio.to_thread(started.wait, 5)
        commit.cancel()  # ...when its caller gives up
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await commit
        assert revisions([await asyncio.wait_for(pending, 5)]) == [[1]]
        assert store.revision == 1
        assert await store.get("k") == b"v"


# -- concurrency ----------------------------------------------------------------------------


async def test_snapshots_are_consistent_while_commits_run(tmp_path: Path) -> None:
    keys = [f"svc/{j}" for j in range(10)]
    async with opened(tmp_path / "s.db") as store:
        await store.commit([Put("other", b"x")])
        done = asyncio.Event()
        seen: list[tuple[int, dict[str, bytes]]] = []

        async def write() -> None:
            for i in range(2, 42):  # commit i sets every key to i
                await store.commit([Put(k, b"%d" % i) for k in keys])
            done.set()

        async def read() -> None:
            while not done.is_set():
                seen.append(await store.snapshot("svc/"))

        async with asyncio.timeout(20), asyncio.TaskGroup() as tasks:
            tasks.create_task(write())
            tasks.create_task(read())
            tasks.create_task(read())
        for revision, snap in seen:
            if revision == 1:
                assert snap == {}
            else:
                assert snap == {k: b"%d" % revision for k in keys}
        assert len({revision for revision, _ in seen}) > 5


# -- files, errors, factory -----------------------------------------------------------------


async def test_open_store_makes_a_sqlite_store_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "cp"
    async with open_store("sqlite", data_dir) as store:
        await store.commit([Put("a", b"1")])
    assert (data_dir / SQLITE_FILE).is_file()
    with contextlib.closing(sqlite3.connect(data_dir / SQLITE_FILE)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(InputError, match="store 'etcd' is not supported: use sqlite"):
        open_store("etcd", data_dir)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"not a database" * 500), id="garbage"),
        pytest.param(lambda p: p.mkdir(), id="a-directory"),
        pytest.param(
            lambda p: sqlite3.connect(p).execute("CREATE TABLE t (x)").connection.close(),
            id="another-database",
        ),
    ],
)
async def test_an_unusable_file_says_which_and_what_to_do(
    tmp_path: Path, damage: Callable[[Path], object]
) -> None:
    path = tmp_path / "store.db"
    damage(path)
    with pytest.raises(InputError) as refused:
        await SqliteStore(path).open()
    assert str(path) in str(refused.value)


async def test_a_truncated_database_is_reported_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with opened(path) as store:
        await store.commit([Put(f"k{i}", b"v" * 3000) for i in range(50)])
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(InputError, match="damaged"):
        async with opened(path) as store:
            await store.snapshot()


async def test_a_second_store_on_the_same_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "LOCK_TIMEOUT_S", 0.1)
    async with opened(tmp_path / "s.db") as store:
        with pytest.raises(ConflictError, match="in use by another process"):
            await SqliteStore(tmp_path / "s.db").open()
        await store.commit([Put("a", b"1")])  # the owner is unaffected
    async with opened(tmp_path / "s.db") as again:  # and the file is free once it closes
        assert again.revision == 1


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    with pytest.raises(MeshError, match="open it first"):
        await store.get("a")
    async with store:
        pass
    with pytest.raises(MeshError, match="closed"):
        await store.commit([Put("a", b"1")])


# -- crash safety ---------------------------------------------------------------------------

WRITER = """
import asyncio, sys
from pathlib import Path
from control_plane.store import Put, SqliteStore

async def main(path):
    async with SqliteStore(Path(path)) as store:
        for i in range(100_000):
            value = b"%d" % i * 500
            rev, _ = await store.commit([Put(f"{g}/{i}", value) for g in "abc"])
            print(i, rev, flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_every_acknowledged_commit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    acked: dict[int, int] = {}
    try:
        async with asyncio.timeout(60):
            assert writer.stdout is not None and writer.stderr is not None
            while len(acked) < 200:
                line = await writer.stdout.readline()
                assert line, (await writer.stderr.read()).decode()
                i, rev = map(int, line.split())
                acked[i] = rev
            os.kill(writer.pid, signal.SIGKILL)  # mid-stream, most likely mid-commit
            for line in (await writer.stdout.read()).splitlines(keepends=True):
                if line.endswith(b"\n"):  # a complete line was printed after its commit
                    i, rev = map(int, line.split())
                    acked[i] = rev
            assert await writer.wait() == -signal.SIGKILL
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
    async with opened(path) as store:
        revision, snap = await store.snapshot()
        assert revision >= max(acked.values())
        for i, rev in acked.items():
            assert rev == i + 1
            assert all(snap[f"{g}/{i}"] == b"%d" % i * 500 for g in "abc")
        # atomic: every commit is there whole or not at all, with no gap in revisions
        assert sorted(snap) == sorted(f"{g}/{i}" for g in "abc" for i in range(revision))
        assert [c.revision for c in await store.changes(0)] == [
            r for r in range(1, revision + 1) for _ in "abc"
        ]


# -- property: a snapshot plus the changes after it is the current state ---------------------

KEYS = st.sampled_from(["a", "b", "c", "d/1", "d/2"])
OPS = st.one_of(st.builds(Put, KEYS, st.binary(max_size=2)), st.builds(Delete, KEYS))
BATCHES = st.lists(st.lists(OPS, max_size=4, unique_by=lambda op: op.key), max_size=15)


def expected_changes(model: dict[str, bytes], ops: list[Op], revision: int) -> list[Change]:
    out = []
    for op in ops:
        prev = model.get(op.key)
        if isinstance(op, Put) and prev != op.value:
            kind = ADDED if prev is None else MODIFIED
            out.append(
                Change(revision=revision, type=kind, key=op.key, value=op.value, prev_value=prev)
            )
            model[op.key] = op.value
        elif isinstance(op, Delete) and prev is not None:
            out.append(
                Change(revision=revision, type=DELETED, key=op.key, value=None, prev_value=prev)
            )
            del model[op.key]
    return out


async def check_replay(
    store: SqliteStore, snapshots: dict[int, dict[str, bytes]], history: int
) -> None:
    revision, current = await store.snapshot()
    assert store.compacted == max(0, revision - history)
    for since, snap in snapshots.items():
        if since < store.compacted:
            with pytest.raises(CompactedError):
                await store.changes(since)
            continue
        replayed = dict(snap)
        for change in await store.changes(since):
            assert change.revision > since
            assert replayed.get(change.key) == change.prev_value
            if change.type is DELETED:
                del replayed[change.key]
            else:
                assert (change.type is ADDED) == (change.prev_value is None)
                assert change.value is not None
                replayed[change.key] = change.value
        assert replayed == current


async def replay_scenario(batches: list[list[Op]], history: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.db"
        model: dict[str, bytes] = {}
        snapshots: dict[int, dict[str, bytes]] = {0: {}}
        async with opened(path, history=history) as store:
            for ops in batches:
                before = store.revision
                expected = expected_changes(model, ops, before + 1)
                revision, changes = await store.commit(ops)
                assert changes == expected
                assert revision == before + (1 if expected else 0)
                assert await store.snapshot() == (revision, model)
                snapshots[revision] = dict(model)
            await check_replay(store, snapshots, history)
        async with opened(path, history=history) as store:  # the same after a restart
            await check_replay(store, snapshots, history)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, history=st.integers(min_value=1, max_value=12))
def test_replaying_changes_onto_any_retained_snapshot_gives_the_current_state(
    batches: list[list[Op]], history: int
) -> None:
    asyncio.run(replay_scenario(batches, history))
