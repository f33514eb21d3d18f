"""What `meshlet lab up` and `meshlet lab status` print: the lab as built (control plane,
nodes, services with their VIPs and replicas), where to look (logs, journal) and how to
get in (the admin API from its namespace, a shell in a container as the app's user).

For: ``summary`` (state → the lines `up` prints) and ``status`` (state + the observed
rows → the lines `status` prints: the layout, then every recorded resource with ok,
missing or dead).

Must never: do I/O; it formats what it is given.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from node.lab_scenario import APP_UID, Layout
from node.lab_state import LabState, Status


def _replicas_by_service(state: LabState) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in state.replicas():
        out[str(r["service"])].append(r)
    return out


def layout_lines(state: LabState, layout: Layout, run_dir: Path) -> list[str]:
    token = run_dir / "cp" / "admin-token"
    lines = [
        f"  control plane  {layout.api_url}  (namespace {layout.cp_netns}; admin token {token})"
    ]
    for i, n in enumerate(state.nodes):
        head = "  nodes        " if i == 0 else "               "
        lines.append(
            f"{head}  {n['name']:<7} {n.get('address', '?'):<14} overlay {n.get('subnet', '?'):<16}"
            f" namespace {n.get('netns')}"
        )
    by_service = _replicas_by_service(state)
    for i, s in enumerate(state.services):
        head = "  services     " if i == 0 else "               "
        reps = ", ".join(
            f"{r['name']}@{r.get('node')} {r.get('address', '(attaching)')}"
            for r in by_service.get(str(s["key"]), [])
        )
        lines.append(
            f"{head}  {s['key']:<13} {s.get('protocol', ''):<5} "
            f"{s.get('vip')}:{s.get('port'):<6} {reps or '(no replicas)'}"
        )
    return lines


def _client_netns(state: LabState) -> str | None:
    clients = {str(s["key"]) for s in state.services if s.get("client")}
    for r in state.replicas():
        if r.get("service") in clients:
            return str(r["netns"])
    reps = state.replicas()
    return str(reps[0]["netns"]) if reps else None


def summary(
    state: LabState, layout: Layout, run_dir: Path, seconds: float, *, flag: str = ""
) -> list[str]:
    """``flag``: what every later command needs to find this lab (`` --run-dir DIR``)."""
    settings = state.lab or {}
    containers = len(state.replicas())
    lines = [
        f"lab {layout.prefix!r} is up: scenario {settings.get('scenario')}, "
        f"{layout.nodes} nodes, {containers} containers, in {seconds:.1f}s",
        "",
        *layout_lines(state, layout, run_dir),
        f"  logs           {run_dir / 'logs'}  (NAME.log per process; NAME.access.log per sidecar)",
        f"  journal        {run_dir / 'journal.jsonl'}  (everything created, for `lab down`)",
        "",
        "look around:",
        f"  meshlet lab top{flag}            per-service rate, success, p50/p99, replicas (--once)",
        f"  meshlet lab status{flag}         every namespace, link and process, and what is dead",
        f"  ip netns exec {layout.cp_netns} meshlet get endpoints --server {layout.api_url} "
        f"--token-file {run_dir / 'cp' / 'admin-token'}",
    ]
    client = _client_netns(state)
    if client:
        lines.append(
            f"  nsenter --net=/run/netns/{client} setpriv --reuid={APP_UID} --regid={APP_UID} "
            "--clear-groups curl -s http://web:8080/"
        )
        lines.append(
            "      (a shell in a container: run it as the app's user, uid "
            f"{APP_UID}; root is the sidecar's uid and is never intercepted)"
        )
    lines += [
        "change it:",
        f"  meshlet lab scale shop/orders=4{flag} | kill shop/orders#1 | partition node2 | heal node2",
        f"  meshlet lab down{flag}",
    ]
    return lines


def status(state: LabState, layout: Layout, run_dir: Path, observed: Status) -> list[str]:
    settings = state.lab or {}
    problems = observed.problems
    verdict = (
        "everything recorded is there"
        if not problems
        else f"{len(problems)} of {len(observed.rows)} recorded things are missing or dead"
    )
    lines = [
        f"lab {layout.prefix!r} (scenario {settings.get('scenario')}, created "
        f"{settings.get('created')}), run directory {run_dir}: {verdict}",
        *layout_lines(state, layout, run_dir),
        "",
    ]
    width = max((len(r.name) for r in observed.rows), default=10)
    for r in observed.rows:
        mark = "ok " if r.state == "ok" else r.state.upper()
        lines.append(f"  {mark:<8} {r.kind:<8} {r.name:<{width}}  {r.detail}".rstrip())
    return lines
