"""Which services `meshlet inject` injects, read from the loaded compose file.

For: compose/inject.py. ``plan`` walks the services in file order, asks
compose/inject_rules.py about each (skip, or the validated options), checks what the
YAML itself must allow (no alias of a whole service, no moved key coming from a merge
key, free names for everything inject adds, replicas without fixed names or addresses)
and returns the plans and the report lines. Must never: change the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ruamel.yaml.comments import CommentedMap

from compose import inject_build as build
from compose.inject_nodes import merged_keys, reference_counts
from compose.inject_rules import MOVED, OPTIONS, MeshOptions, Skip, decide
from meshlet.errors import InputError

MESHLET_SERVICES = (build.CONTROL_PLANE, build.NODE)


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    opts: MeshOptions
    shared_deps: bool  # its depends_on map is used elsewhere too (an anchor): replace it


def plan(root: CommentedMap, *, source: str, report: list[str]) -> list[Plan]:
    """The services to inject, in file order; a line per service appended to ``report``."""
    services = root["services"]
    counts = reference_counts(root)
    plans: list[Plan] = []
    taken: set[str] = {str(n) for n in services}
    for key in list(services):
        name = str(key)
        svc = services[key]
        where = f"{source}: service {name!r}"
        if name in MESHLET_SERVICES:
            report.append(f"{name}: skipped (a meshlet service, left as it is)")
            continue
        if not isinstance(svc, CommentedMap):
            raise InputError(f"{where} must be a mapping of settings")
        decision = decide(
            name,
            options=svc.get(OPTIONS),
            network_mode=svc.get("network_mode"),
            expose=svc.get("expose"),
            ports=svc.get("ports"),
            replicas_setting=_replicas_setting(svc),
            source=source,
        )
        if isinstance(decision, Skip):
            report.append(f"{name}: skipped ({decision.reason})")
            continue
        _check_injectable(name, svc, decision, counts, where=where)
        for needed in added_names(name, decision.replicas):
            if needed in taken:
                raise InputError(
                    f"{where}: inject needs the service name {needed!r}, which is taken: "
                    f"rename that service, or set {OPTIONS}.inject: false on {name}"
                )
            taken.add(needed)
        deps = svc.get("depends_on")
        shared = isinstance(deps, Mapping) and counts.get(id(deps), 0) > 1
        plans.append(Plan(name=name, opts=decision, shared_deps=shared))
        report.append(f"{name}: injected{_details(name, decision)}")
    return plans


def added_names(app: str, replicas: int) -> list[str]:
    """Every service name inject adds for ``app``."""
    names: list[str] = []
    for number in range(1, replicas + 1):
        replica = build.replica_name(app, number)
        if number > 1:
            names.append(replica)
        names += [build.sidecar_name(replica), build.init_name(replica)]
    return names


def _details(name: str, opts: MeshOptions) -> str:
    notes = []
    if opts.replicas > 1:
        names = ", ".join(build.replica_name(name, n) for n in range(1, opts.replicas + 1))
        notes.append(f"{opts.replicas} replicas: {names}")
    if opts.port is None:
        env = ", ".join(repr(u) for u in opts.unknown_ports)
        why = f"its port {env} is set from the environment" if env else "no port declared"
        notes.append(
            f"outbound only: {why}, so it calls the mesh but serves nothing through it; "
            f"add {OPTIONS}.ports: [PORT] to mesh what it serves"
        )
    if opts.unmeshed_ports:
        others = ", ".join(map(str, opts.unmeshed_ports))
        notes.append(f"port {opts.port} in the mesh; {others} not: a sidecar serves one port")
    return f" ({'; '.join(notes)})" if notes else ""


def _replicas_setting(svc: CommentedMap) -> tuple[str, Any] | None:
    if "scale" in svc:
        return "scale", svc["scale"]
    deploy = svc.get("deploy")
    if isinstance(deploy, Mapping) and "replicas" in deploy:
        return "deploy.replicas", deploy["replicas"]
    return None


def _check_injectable(
    name: str, svc: CommentedMap, opts: MeshOptions, counts: dict[int, int], *, where: str
) -> None:
    if counts.get(id(svc), 0) > 1:
        anchor = getattr(svc.anchor, "value", None) or "its anchor"
        raise InputError(
            f"{where} is used again elsewhere through &{anchor} (*{anchor} or <<: *{anchor}): "
            "inject would change both; write the other one out in full"
        )
    from_merge = sorted(str(k) for k in merged_keys(svc) if k in MOVED)
    if from_merge:
        raise InputError(
            f"{where}: {from_merge[0]} comes from a merge key (<<), and inject must move it to "
            f"the sidecar: set {from_merge[0]} in {name} itself instead of in the merged mapping"
        )
    if opts.replicas > 1:
        for key in ("container_name", "mac_address"):
            if key in svc:
                raise InputError(
                    f"{where}: {OPTIONS}.replicas {opts.replicas} with {key}: every replica "
                    f"would get the same one; remove {key}"
                )
        nets = svc.get("networks")
        if isinstance(nets, Mapping):
            for net, cfg in nets.items():
                if isinstance(cfg, Mapping) and ({"ipv4_address", "ipv6_address"} & set(cfg)):
                    raise InputError(
                        f"{where}: {OPTIONS}.replicas {opts.replicas} with a fixed address on "
                        f"network {net}: every replica would get it; remove it"
                    )
