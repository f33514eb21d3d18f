"""The lab's journal, read back: what was created, in order, and what taking it down means.

For: the record shapes ``lab up``/``scale``/``partition`` append to RUN_DIR/journal.jsonl
(one JSON object per line, written *before* a named thing is created and right after a
process is started), ``fold`` (records → ``LabState``: the resources still owned, the
lab's settings, nodes, services and replicas), ``teardown`` (the order ``lab down``
removes things in) and ``status_rows`` (resources + observed facts → what `lab status`
prints: ok, missing or dead).

Records: ``{"op": "add", "id": ..., "kind": ..., ...}`` adds or replaces the resource
``id``; ``{"op": "forget", "id": ...}`` says it was removed on purpose (scale down, heal).
Kinds: ``lab`` (settings), ``node``, ``service``, ``replica`` (the layout, for
`top`/`scale`), and the resources ``netns``, ``link``, ``nft``, ``process``, ``file``,
``dir``. A torn last line (a crash mid-write) is ignored.

Must never: touch the system, read the clock or ``random``, or raise on a damaged journal
line: ``lab down`` must work on whatever a crash left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESOURCE_KINDS = ("netns", "link", "nft", "process", "file", "dir")
LAYOUT_KINDS = ("lab", "node", "service", "replica")
# Processes stop in this order of roles (the traffic first, the control plane last).
STOP_ORDER = ("load", "app", "sidecar", "node", "control-plane")


def netns_id(name: str) -> str:
    return f"netns:{name}"


def process_id(name: str) -> str:
    return f"process:{name}"


def file_id(path: str) -> str:
    return f"file:{path}"


def dir_id(path: str) -> str:
    return f"dir:{path}"


def nft_id(netns: str, table: str) -> str:
    return f"nft:{netns}:{table}"


def link_id(netns: str, name: str) -> str:
    return f"link:{netns}:{name}"


def replica_id(service_key: str, index: int) -> str:
    return f"replica:{service_key}#{index}"


def add(kind: str, rid: str, **fields: Any) -> dict[str, Any]:
    """One ``add`` record, ready to append."""
    return {"op": "add", "id": rid, "kind": kind, **fields}


def forget(rid: str) -> dict[str, Any]:
    return {"op": "forget", "id": rid}


def encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> list[dict[str, Any]]:
    """Every well-formed record; a damaged line (a crash mid-write) is skipped."""
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records


@dataclass(frozen=True, slots=True, kw_only=True)
class LabState:
    """The journal folded: everything still owned, in creation order."""

    entries: tuple[dict[str, Any], ...] = ()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") == kind]

    def get(self, rid: str) -> dict[str, Any] | None:
        for e in self.entries:
            if e["id"] == rid:
                return e
        return None

    @property
    def empty(self) -> bool:
        return not self.entries

    @property
    def lab(self) -> dict[str, Any] | None:
        labs = self.of_kind("lab")
        return labs[-1] if labs else None

    @property
    def resources(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") in RESOURCE_KINDS]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.of_kind("node")

    @property
    def services(self) -> list[dict[str, Any]]:
        return self.of_kind("service")

    def replicas(self, service_key: str | None = None) -> list[dict[str, Any]]:
        reps = self.of_kind("replica")
        if service_key is not None:
            reps = [r for r in reps if r.get("service") == service_key]
        return sorted(reps, key=lambda r: (str(r.get("service")), int(r.get("index", 0))))

    def processes(self, *, netns: str | None = None) -> list[dict[str, Any]]:
        procs = self.of_kind("process")
        if netns is not None:
            procs = [p for p in procs if p.get("netns") == netns]
        return procs


def fold(records: Iterable[Mapping[str, Any]]) -> LabState:
    """Records in journal order → the state: a later ``add`` of an id replaces the earlier
    one in place (keeping its creation position); ``forget`` drops it."""
    order: dict[str, dict[str, Any]] = {}
    for r in records:
        rid = r.get("id")
        if not isinstance(rid, str):
            continue
        if r.get("op") == "forget":
            order.pop(rid, None)
        elif r.get("op") == "add" and isinstance(r.get("kind"), str):
            order[rid] = {k: v for k, v in r.items() if k != "op"}  # keeps its position
    return LabState(entries=tuple(order.values()))


@dataclass(frozen=True, slots=True, kw_only=True)
class Teardown:
    """What ``lab down`` does, in order: stop processes (by PID, checked against the start
    time recorded with it), sweep each namespace for processes nobody recorded, delete the
    namespaces, then files and directories."""

    processes: tuple[dict[str, Any], ...] = ()
    namespaces: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    dirs: tuple[dict[str, Any], ...] = ()


def teardown(state: LabState) -> Teardown:
    rank = {role: i for i, role in enumerate(STOP_ORDER)}
    procs = sorted(
        state.of_kind("process"), key=lambda p: rank.get(str(p.get("role")), len(STOP_ORDER))
    )
    namespaces = [str(e["name"]) for e in state.of_kind("netns")]
    files = [str(e["path"]) for e in state.of_kind("file")]
    dirs = state.of_kind("dir")
    return Teardown(
        processes=tuple(procs),
        # Containers before nodes before the switch: the reverse of creation.
        namespaces=tuple(reversed(namespaces)),
        files=tuple(reversed(files)),
        # Inner directories before the ones that hold them.
        dirs=tuple(sorted(dirs, key=lambda d: str(d.get("path", "")).count("/"), reverse=True)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What is there now, observed by the I/O side."""

    namespaces: frozenset[str] = frozenset()
    live_processes: frozenset[str] = frozenset()  # process ids whose PID and start time match
    paths: frozenset[str] = frozenset()  # files and directories that exist
    links: frozenset[str] = frozenset()  # link ids that exist
    nft_tables: frozenset[str] = frozenset()  # nft ids that exist


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    kind: str
    name: str
    detail: str
    state: str  # "ok", "missing", "dead"


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    rows: tuple[Row, ...] = field(default_factory=tuple)

    @property
    def problems(self) -> list[Row]:
        return [r for r in self.rows if r.state != "ok"]


def status_rows(state: LabState, facts: Facts) -> Status:
    rows: list[Row] = []
    for e in state.resources:
        kind = str(e["kind"])
        if kind == "netns":
            name = str(e["name"])
            rows.append(
                Row(
                    kind=kind,
                    name=name,
                    detail=str(e.get("role", "")),
                    state="ok" if name in facts.namespaces else "missing",
                )
            )
        elif kind == "process":
            detail = f"pid {e.get('pid')} in {e.get('netns')}"
            rows.append(
                Row(
                    kind=kind,
                    name=str(e.get("name")),
                    detail=detail,
                    state="ok" if e["id"] in facts.live_processes else "dead",
                )
            )
        elif kind in ("file", "dir"):
            path = str(e["path"])
            rows.append(
                Row(
                    kind=kind,
                    name=path,
                    detail="",
                    state="ok" if path in facts.paths else "missing",
                )
            )
        elif kind == "link":
            rows.append(
                Row(
                    kind=kind,
                    name=str(e.get("name")),
                    detail=f"in {e.get('netns')}" + (f" ({e['peer']})" if e.get("peer") else ""),
                    state="ok" if e["id"] in facts.links else "missing",
                )
            )
        elif kind == "nft":
            rows.append(
                Row(
                    kind=kind,
                    name=str(e.get("table")),
                    detail=f"in {e.get('netns')}: {e.get('purpose', '')}".rstrip(": "),
                    state="ok" if e["id"] in facts.nft_tables else "missing",
                )
            )
    return Status(rows=tuple(rows))
