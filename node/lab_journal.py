"""RUN_DIR/journal.jsonl on disk: append a record durably, read them all back, and hold the
lab's lock while a command changes it.

For: ``Journal.append`` (one line, written with O_APPEND and fsynced before the caller
goes on to create the thing the record names, so a crash at any point leaves a journal
that names everything that may exist), ``Journal.state`` (read + ``lab_state.fold``) and
``Journal.lock`` (flock on RUN_DIR/lock: `up`, `scale`, `partition` and `down` never
interleave; `status` and `top` only read).

Must never: rewrite or truncate the journal (only ``remove`` deletes it, at the very end
of ``lab down``), or decide anything about its content (node/lab_state.py does).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from meshlet.errors import ConflictError
from node import lab_state

JOURNAL = "journal.jsonl"
LOCK = "lock"


class Journal:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / JOURNAL
        self.lock_path = run_dir / LOCK
        self._mutex = threading.Lock()  # appends from the worker threads of `lab up`

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, record: Mapping[str, Any]) -> None:
        line = lab_state.encode(record)
        with self._mutex:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def add(self, kind: str, rid: str, **fields: Any) -> None:
        self.append(lab_state.add(kind, rid, **fields))

    def forget(self, rid: str) -> None:
        self.append(lab_state.forget(rid))

    def records(self) -> list[dict[str, Any]]:
        try:
            return lab_state.decode(self.path.read_bytes())
        except FileNotFoundError:
            return []

    def state(self) -> lab_state.LabState:
        return lab_state.fold(self.records())

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Exclusive, not waiting: a second `lab up`/`scale`/`down` on the same run
        directory is refused at once instead of queueing behind a long one. The run
        directory must exist (``lab up`` makes it, recorded, first)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(
                    f"another `meshlet lab` command is changing {self.run_dir} right now; "
                    f"wait for it, then run `meshlet lab {what}` again"
                ) from None
            yield
        finally:
            os.close(fd)

    def remove(self) -> None:
        """The last step of ``lab down``: the journal and the lock file go."""
        for p in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
