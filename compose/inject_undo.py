"""`meshlet uninject` on a loaded compose file: the exact reverse of compose/inject_apply.py.

For: compose/inject.py (uninject, and inject, which uninjects first). It undoes in the
reverse order inject worked: the top level (the record, the volume and network inject
added, the lines it moved to the end of the file), then the services (every service
marked ``x-meshlet-generated``, and the lines moved to the end of ``services``), then
each app (from its first sidecar's ``x-meshlet-original``: key order, moved settings,
``network_mode``, ``depends_on``, and the lines moved to its new end).
Must never: remove a service inject did not mark, or a volume or network it did not add.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from compose import inject_build as build
from compose.inject_apply import SERVICES_TAIL, TAIL
from compose.inject_comments import (
    give_after_entry,
    give_trailer,
    keep_lines,
    keep_value,
    take_last_lines,
    take_lines_of,
)
from compose.inject_nodes import delete, move_entry, own_keys, set_key_order
from compose.inject_plan import MESHLET_SERVICES
from compose.inject_rules import MOVED


def uninject_tree(root: CommentedMap, *, indent: int) -> list[str]:
    """Undo inject in place; the report lines."""
    services = root["services"]
    record = root.get(build.INJECTED)
    record = record if isinstance(record, Mapping) else {}
    moved = _take(root, record.get(TAIL))
    for key in ("networks", "volumes"):
        entries = root.get(key)
        if isinstance(entries, CommentedMap):
            for entry in record.get(key) or []:
                if entry in entries:
                    delete(entries, entry)
    for key in record.get("created") or []:
        if isinstance(root.get(key), CommentedMap) and not root[key]:
            delete(root, key)
    if build.INJECTED in root:
        delete(root, build.INJECTED)
    _give(root, moved)

    moved = _take(services, record.get(SERVICES_TAIL))
    generated = [
        n
        for n in list(services)
        if isinstance(services[n], Mapping) and build.GENERATED in services[n]
    ]
    users = [n for n in services if n not in generated]
    if users and moved:  # inject took these from the end of the user's last service
        give_after_entry(services, users[-1], moved)

    done = []
    for name in generated:
        info = _restore_info(services, services[name])
        if info is not None:
            app_name, sidecar, original = info
            _restore(services[app_name], app_name, sidecar, original, indent=indent)
            done.append(f"{app_name}: restored")

    report: list[str] = []
    kept = ""  # comment lines left among the generated services: never dropped
    for name in generated:
        kept += take_lines_of(services, name)
        delete(services, name)
        if name in MESHLET_SERVICES:
            report.append(f"{name}: removed")
    keep_lines(root, "services", kept)
    return done + report


def _before(m: CommentedMap, key: Any, text: str) -> None:
    """Write ``text`` (whole comment lines) just before entry ``key``."""
    entry = m.ca.items.setdefault(key, [None, None, None, None])
    entry[1] = [CommentToken(text, CommentMark(0), None), *(entry[1] or [])]


def _take(node: Any, count: Any) -> str | None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return None
    return take_last_lines(node, count)


def _give(node: Any, text: str | None) -> None:
    if text:
        give_trailer(node, text)


def _restore_info(
    services: CommentedMap, sidecar: Any
) -> tuple[str, CommentedMap, CommentedMap] | None:
    original = sidecar.get(build.ORIGINAL)
    mark = sidecar.get(build.GENERATED)
    if not isinstance(original, CommentedMap) or not isinstance(mark, Mapping):
        return None
    app_name = mark.get("app")
    app = services.get(app_name)
    if not isinstance(app, CommentedMap) or build.GENERATED in app:
        return None  # the app is gone (or is ours): nothing to put back
    return str(app_name), sidecar, original


def _restore(
    app: CommentedMap, name: str, sidecar: CommentedMap, original: CommentedMap, *, indent: int
) -> None:
    keys = [str(k) for k in original.get("keys") or []]
    moved = _take(app, original.get(TAIL))
    # Lines written after what inject put first (network_mode, a new depends_on) were
    # written before the next key: they go back there.
    order = own_keys(app)
    following = [k for k in order if k in keys and k != "depends_on"]
    lines = ""
    if "network_mode" not in keys and "network_mode" in order:
        lines += take_lines_of(app, "network_mode")
    if "depends_on" in order and ("depends_on" in original or "depends_on" not in keys):
        lines += take_lines_of(app, "depends_on", before="depends_on" not in keys)
    if app.get("network_mode") == f"service:{build.sidecar_name(name)}":
        delete(app, "network_mode")
    if "depends_on" in original:
        keep_value(original, "depends_on", app, shift=-indent, remove=True)
    elif "depends_on" not in keys:
        if "depends_on" in own_keys(app):
            delete(app, "depends_on")
    elif isinstance(app.get("depends_on"), CommentedMap):
        deps = app["depends_on"]
        for key in [k for k in deps if k in (build.init_name(name), build.sidecar_name(name))]:
            delete(deps, key)
    if lines and following:
        _before(app, following[0], lines)
    for key in MOVED:
        if key in own_keys(sidecar) and (key != "networks" or "networks" in keys):
            move_entry(sidecar, key, app)
    if "networks" in original:
        keep_value(original, "networks", app, shift=-indent, remove=True)
    set_key_order(app, keys)
    _give(app, moved)
