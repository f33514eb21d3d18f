"""`meshlet lab down` and the facts behind `meshlet lab status`.

For: ``down`` — from whatever the journal holds (a finished ``lab up``, or one killed
halfway): stop the recorded processes (the load first, then the rest: SIGTERM, a short
grace, SIGKILL; each by PID and only if its start time still matches), kill by PID any
other process still inside a recorded namespace (started but not yet recorded when a
command died), delete the namespaces (which takes their links, addresses, routes and nft
rules with them), remove the recorded files and directories, then the journal; and say
what, if anything, could not be removed. ``observe`` — the facts `lab status` compares
the journal with.

Must never: signal a PID whose start time is not the recorded one, touch a namespace,
file or directory the journal does not name, or stop on the first failure (it removes
all it can, then reports the rest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshlet.errors import MeshError
from node import lab_netns as nsio
from node import lab_state
from node.lab import Lab

GRACE_S = 3.0
GONE_TIMEOUT_S = 10.0


def _wait_gone(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_processes(procs: tuple[dict[str, Any], ...]) -> list[str]:
    """SIGTERM (traffic first), grace, SIGKILL; returns the names still alive after all."""

    def alive(p: dict[str, Any]) -> bool:
        return nsio.alive(int(p["pid"]), p.get("start"))

    load = [p for p in procs if p.get("role") == "load"]
    for p in load:
        nsio.signal_process(int(p["pid"]), p.get("start"), signal.SIGTERM)
    _wait_gone(lambda: not any(alive(p) for p in load), 1.0)
    for p in procs:
        nsio.signal_process(int(p["pid"]), p.get("start"), signal.SIGTERM)
    _wait_gone(lambda: not any(alive(p) for p in procs), GRACE_S)
    for p in procs:
        nsio.signal_process(int(p["pid"]), p.get("start"), signal.SIGKILL)
    _wait_gone(lambda: not any(alive(p) for p in procs), GONE_TIMEOUT_S)
    return [f"process {p['name']} (pid {p['pid']})" for p in procs if alive(p)]


def _sweep(namespaces: tuple[str, ...]) -> list[str]:
    """SIGKILL every process still inside one of ``namespaces`` (found by /proc, by PID)."""
    existing = nsio.list_netns()
    inside = {ns: nsio.pids_in(ns) for ns in namespaces if ns in existing}
    for pids in inside.values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_gone(lambda: not any(nsio.pids_in(ns) for ns in inside), GONE_TIMEOUT_S)
    return [f"process {pid} in {ns}" for ns in inside for pid in nsio.pids_in(ns)]


def down(lab: Lab, echo: Callable[[str], None], *, keep_logs: bool = False) -> list[str] | None:
    """Remove everything the journal names; returns what is left (empty when clean), or
    None when there was no journal at all."""
    if not lab.journal.exists():
        return None
    with lab.journal.lock("down"):
        state = lab.state()
        plan = lab_state.teardown(state)
        live = [p for p in plan.processes if lab.process_alive(p)]
        echo(
            f"stopping {len(live)} processes, deleting {len(plan.namespaces)} namespaces"
            f" and {len(plan.files) + len(plan.dirs)} files and directories"
        )
        left = _stop_processes(plan.processes)
        left += _sweep(plan.namespaces)
        for ns in plan.namespaces:
            try:
                nsio.delete_netns(ns)
            except OSError as e:
                left.append(f"namespace {ns} ({e.strerror})")
        still = nsio.list_netns()
        left += [f"namespace {ns}" for ns in plan.namespaces if ns in still]
        for f in plan.files:
            with contextlib.suppress(FileNotFoundError):
                try:
                    Path(f).unlink()
                except OSError as e:
                    left.append(f"file {f} ({e.strerror})")
        kept = lab.logs if keep_logs else None
        for d in plan.dirs:
            path = Path(str(d["path"]))
            if d.get("only_if_empty") or path == kept:
                continue
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                left.append(f"directory {path}")
        lab.journal.remove()  # still holding the lock: nobody starts on a half-gone lab
        for d in plan.dirs:  # deepest first: the run directory, then what held it
            if d.get("only_if_empty"):
                with contextlib.suppress(OSError):
                    Path(str(d["path"])).rmdir()
    if kept is not None and kept.exists():
        echo(f"logs kept in {kept}")
    return left


def observe(lab: Lab, state: lab_state.LabState) -> lab_state.Facts:
    """What exists now of what the journal names."""
    namespaces = frozenset(nsio.list_netns())
    live = frozenset(str(p["id"]) for p in state.of_kind("process") if lab.process_alive(p))
    paths = frozenset(
        str(e["path"])
        for e in (*state.of_kind("file"), *state.of_kind("dir"))
        if Path(str(e["path"])).exists()
    )
    links_by_ns: dict[str, set[str]] = {}
    tables_by_ns: dict[str, set[str]] = {}
    links, tables = set(), set()
    for e in state.of_kind("link"):
        ns = str(e["netns"])
        if ns in namespaces:
            if ns not in links_by_ns:
                links_by_ns[ns] = nsio.links_in(ns)
            if e["name"] in links_by_ns[ns]:
                links.add(str(e["id"]))
    for e in state.of_kind("nft"):
        ns = str(e["netns"])
        if ns in namespaces:
            with contextlib.suppress(MeshError):
                if ns not in tables_by_ns:
                    tables_by_ns[ns] = nsio.nft_tables(ns)
                if e["table"] in tables_by_ns[ns]:
                    tables.add(str(e["id"]))
    return lab_state.Facts(
        namespaces=namespaces,
        live_processes=live,
        paths=paths,
        links=frozenset(links),
        nft_tables=frozenset(tables),
    )
