"""The edits `meshlet inject` makes to a loaded compose file, once compose/inject_plan.py
has said which services to inject.

For: compose/inject.py. ``inject_app`` rewrites one app and returns the services to add
for it (sidecar, init, and per further replica a copy of the app with its own sidecar
and init); ``add_top_level`` adds the volume and network and the record of them.
Comments stay on the entries they were written after; the lines that followed an app
(a blank line, a comment about the next service) move to wherever the app now ends,
and the record says how many lines moved so uninject moves exactly those back.
Must never: decide whether a service is injected, or drop a comment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ruamel.yaml.comments import CommentedMap

from compose import inject_build as build
from compose.inject_comments import give_trailer, keep_value, line_count, put_back, take_trailer
from compose.inject_nodes import (
    MERGE,
    cmap,
    cseq,
    insert,
    key_order,
    move_entry,
    own_keys,
    plain_copy,
    quoted,
    set_key_order,
)
from compose.inject_plan import Plan
from compose.inject_rules import COPIED_TO_REPLICAS, MOVED, OPTIONS, MeshOptions

TAIL = "tail"  # in a record: how many lines inject moved to the new end
SERVICES_TAIL = "services-tail"


def inject_app(
    services: CommentedMap,
    plan: Plan,
    settings: build.Settings,
    *,
    cp_condition: str,
    indent: int,
) -> list[tuple[str, CommentedMap]]:
    """Make ``plan.name`` join its sidecar; the services to add for it, in order."""
    name, opts = plan.name, plan.opts
    app = services[name]
    trailer, handle = take_trailer(app)
    template = plain_copy(app) if opts.replicas > 1 else None
    profiles = app.get("profiles")
    original = cmap(
        ("keys", cseq([quoted(k) if k == MERGE else k for k in key_order(app)], flow=True))
    )
    holder = CommentedMap()
    for key in MOVED:
        if key in own_keys(app):
            move_entry(app, key, holder)
    networks = _sidecar_networks(holder.get("networks"), alias=name)
    if "networks" in holder:
        keep_value(holder, "networks", original, shift=indent)
        holder["networks"] = networks
    _join(app, name, original=original, shared_deps=plan.shared_deps, indent=indent)
    if trailer:
        if give_trailer(app, trailer):
            original[TAIL] = line_count(trailer)
        else:
            put_back(handle, trailer)
    sidecar = build.sidecar(
        app=name,
        group=name,
        replica=1,
        opts=opts,
        settings=settings,
        networks=networks,
        profiles=_copy(profiles),
    )
    sidecar["depends_on"][build.CONTROL_PLANE]["condition"] = cp_condition
    _take_moved(sidecar, holder)
    sidecar[build.ORIGINAL] = original
    init = build.init(
        app=name, group=name, replica=1, opts=opts, settings=settings, profiles=_copy(profiles)
    )
    out = [(build.sidecar_name(name), sidecar), (build.init_name(name), init)]
    for number in range(2, opts.replicas + 1):
        assert template is not None
        out += _replica(template, name, number, opts, settings, cp_condition=cp_condition)
    return out


def _copy(value: Any) -> Any:
    return plain_copy(value) if value is not None else None


def control_plane_networks(generated: list[tuple[str, CommentedMap]]) -> list[str]:
    """``default``, every network a generated sidecar is on, and ``meshlet``."""
    names = ["default"]
    for _, svc in generated:
        for net in svc.get("networks") or ():
            if net not in names:
                names.append(str(net))
    if build.NETWORK not in names:
        names.append(build.NETWORK)
    return names


def _take_moved(sidecar: CommentedMap, holder: CommentedMap) -> None:
    """Put the app's moved settings (with their comments) into the sidecar, after its
    command; the generated networks take the comments of the app's networks key."""
    order = key_order(sidecar)
    at = order.index("command") + 1
    for key in list(holder):
        if key == "networks":
            comments = holder.ca.items.get("networks")
            if comments is not None:
                sidecar.ca.items["networks"] = comments
            continue
        move_entry(holder, key, sidecar)
        order.insert(at, key)
        at += 1
    set_key_order(sidecar, order)


def _join(
    app: CommentedMap,
    replica: str,
    *,
    original: CommentedMap | None,
    shared_deps: bool = False,
    indent: int = 0,
) -> None:
    """Make ``app`` join ``replica``'s sidecar: network_mode and depends_on. A depends_on
    map of its own gets our entries first; a list, a shared map or one that comes from a
    merge key is replaced by a map (the original kept in ``original``)."""
    ours = build.app_dependencies(replica)
    deps = app.get("depends_on")
    own = "depends_on" in own_keys(app)
    if own and isinstance(deps, CommentedMap) and not shared_deps:
        for pos, (key, value) in enumerate(ours):
            insert(deps, pos, key, value)
    elif own:
        if original is not None:
            keep_value(app, "depends_on", original, shift=indent)
        app["depends_on"] = cmap(*ours, *_dependency_entries(deps))
    else:
        insert(app, 0, "depends_on", cmap(*ours, *_dependency_entries(deps)))
    insert(app, 0, "network_mode", quoted(f"service:{build.sidecar_name(replica)}"))


def _dependency_entries(deps: Any) -> list[tuple[Any, Any]]:
    """An app's own dependencies, in the map form (a list means service_started)."""
    if deps is None:
        return []
    if isinstance(deps, Mapping):
        return [(k, plain_copy(v)) for k, v in deps.items()]
    return [(d, cmap(("condition", "service_started"))) for d in deps]


def _sidecar_networks(value: Any, *, alias: str) -> CommentedMap:
    """The app's networks for its sidecar, each with the app's name as an alias."""
    entries: list[tuple[Any, Any]]
    if value is None:
        entries = [("default", None)]
    elif isinstance(value, Mapping):
        entries = list(value.items())
    else:
        entries = [(n, None) for n in value]
    nets = CommentedMap()
    for net, cfg in entries:
        settings = plain_copy(cfg) if isinstance(cfg, Mapping) else cmap()
        aliases = settings.get("aliases")
        if aliases is None:
            settings["aliases"] = cseq([alias], flow=True)
        elif alias not in aliases:
            aliases.append(alias)
        nets[net] = settings
    return nets


def _replica(
    template: CommentedMap,
    app: str,
    number: int,
    opts: MeshOptions,
    settings: build.Settings,
    *,
    cp_condition: str,
) -> list[tuple[str, CommentedMap]]:
    name = build.replica_name(app, number)
    copy = plain_copy(template)
    kept = CommentedMap()
    for key in (*MOVED, OPTIONS):
        if key in copy:
            if key in COPIED_TO_REPLICAS:
                kept[key] = copy[key]
            del copy[key]
    _join(copy, name, original=None)
    copy[build.GENERATED] = build.marker("replica", app, number)
    profiles = template.get("profiles")
    sidecar = build.sidecar(
        app=name,
        group=app,
        replica=number,
        opts=opts,
        settings=settings,
        networks=_sidecar_networks(template.get("networks"), alias=app),
        profiles=_copy(profiles),
    )
    sidecar["depends_on"][build.CONTROL_PLANE]["condition"] = cp_condition
    _take_moved(sidecar, kept)
    init = build.init(
        app=name,
        group=app,
        replica=number,
        opts=opts,
        settings=settings,
        profiles=_copy(profiles),
    )
    return [(name, copy), (build.sidecar_name(name), sidecar), (build.init_name(name), init)]


def add_top_level(root: CommentedMap) -> CommentedMap:
    """Add the volume and the network where missing; the record of what was added."""
    record = CommentedMap()
    created = []
    for key, entry, value in (
        ("networks", build.NETWORK, None),
        ("volumes", build.VOLUME, None),
        ("volumes", build.PUBLIC_VOLUME, build.public_volume()),
    ):
        if key not in root:
            root[key] = cmap()
            created.append(key)
        if entry not in root[key]:
            root[key][entry] = value
            record.setdefault(key, cseq([], flow=True)).append(entry)
    if created:
        record["created"] = cseq(created, flow=True)
    return record
