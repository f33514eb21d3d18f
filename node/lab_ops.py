"""Changing a running lab: `scale`, `kill`, `partition` and `heal`.

For: ``scale`` (a service's replica count: new replicas are built and waited for like
those of `lab up`, on the nodes the layout's round robin names; the highest-numbered
ones are drained and removed; the service — and so its VIP — is never touched),
``kill`` (SIGKILL one replica's app: its sidecar stays up, so callers see failures and
eject it, as they would a crashed task), ``partition``/``heal`` (an nft table in the
node's namespace that drops the overlay's UDP both ways, recorded, and its removal).

Must never: change the host's namespace or act without the run directory's lock.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from meshlet.errors import ConflictError, InputError
from node import lab_netns as nsio
from node import lab_state
from node.lab import Lab
from node.lab_containers import add_replica, kill_app, remove_replica, wait_ready
from node.lab_scenario import (
    PARTITION_TABLE,
    VXLAN_PORT,
    heal_ruleset,
    partition_ruleset,
    scale_plan,
)

PARTITION = f"inet {PARTITION_TABLE}"


def scale(lab: Lab, key: str, target: int, echo: Callable[[str], None]) -> None:
    with lab.changing("scale"):
        layout, scenario = lab.layout(), lab.scenario()
        spec = scenario.service(key)
        state = lab.state()
        current = {int(r["index"]): r for r in state.replicas(key)}
        vip = (state.get(f"service:{key}") or {}).get("vip")
        add, remove = scale_plan(set(current), target)
        if not add and not remove:
            echo(f"{key}: {len(current)} replicas already, VIP {vip}")
            return
        if add:
            lab.netns_etc_root()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                built = list(
                    pool.map(
                        lambda i: add_replica(
                            lab, layout, spec, i, layout.place(spec, i), scenario.traffic
                        ),
                        add,
                    )
                )
                records = [
                    r
                    for r in (lab.state().get(lab_state.replica_id(key, b["index"])) for b in built)
                    if r is not None
                ]
                list(pool.map(lambda r: wait_ready(lab, r), records))
            for b in built:
                echo(f"added {b['name']} on {b['node']} ({b['address']}), ready")
        for i in remove:
            replica = current[i]
            echo(f"draining {replica['name']} on {replica.get('node')} ...")
            remove_replica(lab, layout, replica)
            echo(f"removed {replica['name']}")
        now = lab.api("GET", f"/v1/services/{key}").get("vip")
        same = "unchanged" if now == vip else f"CHANGED from {vip}"
        echo(f"{key}: {len(current)} → {target} replicas; VIP {now} {same}")


def _replica(lab: Lab, key: str, index: int) -> dict[str, object]:
    lab.scenario().service(key)  # names the known services when this one is not
    replica = lab.state().get(lab_state.replica_id(key, index))
    if replica is None:
        have = ", ".join(f"#{r['index']}" for r in lab.state().replicas(key)) or "none"
        raise InputError(f"{key}#{index} is not a replica in the lab ({key} has {have})")
    return replica


def kill(lab: Lab, key: str, index: int, echo: Callable[[str], None]) -> None:
    with lab.changing("kill"):
        replica = _replica(lab, key, index)
        pid = kill_app(lab, dict(replica))
        echo(
            f"killed the app of {replica['name']} on {replica.get('node')} (pid {pid}); "
            "its sidecar stays up, so callers see the failures and eject it"
        )


def partition(lab: Lab, node: str, echo: Callable[[str], None]) -> None:
    with lab.changing("partition"):
        layout = lab.layout()
        netns = layout.node_netns(layout.check_node(node))
        rid = lab_state.nft_id(netns, PARTITION)
        if lab.state().get(rid) is not None:
            raise ConflictError(f"{node} is partitioned already: `meshlet lab heal {node}` first")
        lab.journal.add(
            "nft",
            rid,
            netns=netns,
            table=PARTITION,
            purpose=f"partition: drop overlay UDP {VXLAN_PORT} to and from {node}",
        )
        nsio.check(
            nsio.run(netns, ["nft", "-f", "-"], input=partition_ruleset(VXLAN_PORT)),
            f"nft in {netns}",
        )
        echo(f"{node} is partitioned: overlay UDP {VXLAN_PORT} to and from it is dropped")


def heal(lab: Lab, node: str, echo: Callable[[str], None]) -> None:
    with lab.changing("heal"):
        layout = lab.layout()
        netns = layout.node_netns(layout.check_node(node))
        rid = lab_state.nft_id(netns, PARTITION)
        nsio.check(nsio.run(netns, ["nft", "-f", "-"], input=heal_ruleset()), f"nft in {netns}")
        was = lab.state().get(rid) is not None
        if was:
            lab.journal.forget(rid)
        echo(
            f"{node} is healed: overlay traffic flows again"
            if was
            else f"{node} was not partitioned"
        )
