"""A lab container: a network namespace attached to its node's overlay, with interception,
an app and a transparent-mode sidecar — added, drained and removed, or its app killed.

For: ``add_replica`` (namespace → resolv.conf → ``meshlet node attach`` in the node's
namespace → ``meshlet sidecar init`` → the app as uid 65534 → ``meshlet sidecar run`` as
root, exempt from capture by uid), ``wait_ready`` (the sidecar's /ready: certificate,
mesh map, the app accepts), ``remove_replica`` (SIGTERM the sidecar and wait: it marks
its endpoint draining, stops accepting, lets open requests finish and deregisters; then
the app, ``meshlet node detach``, the namespace, its files) and ``kill_app``.

Apps run with the system's python3 (node/lab_apps.py, its source on stdin) as nobody: the
image's runtime, not meshlet's, and a uid the nft rules capture. Their logs, like every
process's, go to RUN_DIR/logs/NAME.log; the sidecars' access logs to NAME.access.log.

Must never: start a process outside the replica's namespace, or remove a replica's
records before what they name is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from meshlet.errors import MeshError
from node import lab_netns as nsio
from node import lab_state
from node.lab import NETNS_ETC, Lab, meshlet_argv, wait_until
from node.lab_scenario import (
    APP_UID,
    CP_GRPC_MTLS_PORT,
    CP_GRPC_PORT,
    DRAIN_TIMEOUT_S,
    SIDECAR_ADMIN_PORT,
    SIDECAR_DNS,
    Layout,
    ServiceSpec,
    Traffic,
    replica_name,
)

SYSTEM_PYTHON = "/usr/bin/python3"
INTERCEPT_TABLE = "inet meshlet"  # what `meshlet sidecar init` installs
APPS_SOURCE = Path(__file__).with_name("lab_apps.py")
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 5.0


def app_argv(spec: ServiceSpec, name: str, node: str, traffic: Traffic) -> list[str]:
    port = str(spec.port)
    if spec.app == "redis":
        return [
            "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
        ]  # fmt: skip
    if spec.app == "load":
        return [
            SYSTEM_PYTHON, "-", "load", "--port", port,
            "--http-url", traffic.http_url, "--http-per-s", str(traffic.http_per_s),
            "--grpc-target", traffic.grpc_target, "--grpc-per-s", str(traffic.grpc_per_s),
            "--redis-host", traffic.redis_host, "--redis-port", str(traffic.redis_port),
            "--redis-per-s", str(traffic.redis_per_s), "--duration", str(traffic.duration_s),
        ]  # fmt: skip
    argv = [SYSTEM_PYTHON, "-", spec.app, "--name", name, "--service", spec.key]
    argv += ["--node", node, "--port", port]
    return argv + (["--call", spec.call] if spec.call else [])


def sidecar_argv(
    lab: Lab, layout: Layout, spec: ServiceSpec, name: str, node: str, address: str
) -> list[str]:
    cp = layout.cp_address
    return meshlet_argv(
        "sidecar", "run",
        "--service", spec.key,
        "--control-plane", f"{cp}:{CP_GRPC_PORT}",
        "--control-plane-mtls", f"{cp}:{CP_GRPC_MTLS_PORT}",
        "--ca-bundle", str(lab.ca_bundle),
        "--join-token", str(lab.join_token),
        "--cert-dir", str(lab.certs / name),
        "--app-port", str(spec.port),
        "--app-protocol", spec.protocol,
        "--mode", "transparent",
        "--inbound", "0.0.0.0:15006",
        "--address", address,
        "--dns", SIDECAR_DNS,
        "--admin", f"127.0.0.1:{SIDECAR_ADMIN_PORT}",
        "--endpoint-id", name,
        "--node", node,
        "--drain-timeout", f"{DRAIN_TIMEOUT_S:g}s",
        "--access-log", str(lab.logs / f"{name}.access.log"),
    )  # fmt: skip


# The sidecar keeps root's uid (the code and the run directory may sit in a 0700 home,
# and uid 0 is what interception exempts) but none of its power: every capability is
# dropped save NET_BIND_SERVICE (its DNS listens on port 53), and no_new_privs holds, so
# it cannot change the interception rules, the routes or anything of the node's.
SIDECAR_PRIVILEGES = ("setpriv", "--bounding-set=-all,+net_bind_service", "--inh-caps=-all",
                      "--no-new-privs")  # fmt: skip


def intercept(lab: Lab, netns: str) -> None:
    """`meshlet sidecar init` in ``netns``: every uid's TCP and DNS but root's (the
    sidecar's) goes to the sidecar."""
    init = meshlet_argv(
        "sidecar", "init", "--outbound-port", "15001", "--inbound-port", "15006",
        "--dns", SIDECAR_DNS, "--proxy-uid", "0",
    )  # fmt: skip
    lab.journal.add(
        "nft", lab_state.nft_id(netns, INTERCEPT_TABLE), netns=netns, table=INTERCEPT_TABLE,
        purpose="interception (meshlet sidecar init)",
    )  # fmt: skip
    nsio.check(nsio.run(netns, init), f"`meshlet sidecar init` in {netns}")


def start_sidecar(
    lab: Lab, netns: str, name: str, argv: list[str], **fields: Any
) -> subprocess.Popen[bytes]:
    """The sidecar of replica ``name``, without privileges (SIDECAR_PRIVILEGES)."""
    return lab.spawn(f"sidecar-{name}", "sidecar", netns, [*SIDECAR_PRIVILEGES, *argv], **fields)


def _attached(stdout: str, netns: str) -> dict[str, Any]:
    """`meshlet node attach --json`'s answer, with the address checked."""
    try:
        answer = json.loads(stdout)
        ipaddress.ip_address(answer["address"])
    except (ValueError, KeyError, TypeError):
        raise MeshError(
            f"`meshlet node attach --netns {netns} --json` printed no address: {stdout[-300:]!r}"
        ) from None
    return dict(answer)


def add_replica(
    lab: Lab, layout: Layout, spec: ServiceSpec, index: int, node: str, traffic: Traffic
) -> dict[str, Any]:
    """Build replica ``index`` of ``spec`` on ``node`` and start it (not waiting for ready)."""
    name = replica_name(spec.name, index)
    netns = layout.container_netns(spec.name, index)
    rid = lab_state.replica_id(spec.key, index)
    fields: dict[str, Any] = dict(service=spec.key, index=index, name=name, node=node, netns=netns)
    lab.journal.add("replica", rid, **fields)
    lab.make_netns(netns, f"container {spec.key}#{index}")
    etc = lab.netns_etc(netns)
    lab.write_file(
        etc / "resolv.conf", f"nameserver {layout.resolver}\noptions timeout:2 attempts:2\n"
    )
    node_netns = layout.node_netns(node)
    attach = meshlet_argv(
        "node", "attach", "--netns", netns, "--service", spec.key,
        "--state-dir", str(lab.node_state), "--name", node, "--json",
    )  # fmt: skip
    attached = _attached(
        nsio.check(nsio.run(node_netns, attach), f"attaching {netns} to {node}"), netns
    )
    # The veth pair is the node helper's to name: recorded once it says (it goes with the
    # container's namespace in any case).
    host_if, container_if = str(attached.get("host_interface")), str(attached.get("interface"))
    lab.journal.add(
        "link", lab_state.link_id(node_netns, host_if), netns=node_netns, name=host_if,
        peer=f"{container_if} in {netns}",
    )  # fmt: skip
    lab.journal.add(
        "link", lab_state.link_id(netns, container_if), netns=netns, name=container_if,
        peer=f"{host_if} in {node_netns}",
    )  # fmt: skip
    address = str(attached["address"])
    fields["address"] = address
    lab.journal.add("replica", rid, **fields)
    intercept(lab, netns)
    source = APPS_SOURCE.read_bytes() if spec.app != "redis" else None
    role = "load" if spec.client else "app"
    lab.spawn(
        f"app-{name}",
        role,
        netns,
        app_argv(spec, name, node, traffic),
        uid=APP_UID,
        stdin_data=source,
        replica=rid,
    )
    start_sidecar(lab, netns, name, sidecar_argv(lab, layout, spec, name, node, address),
                  replica=rid)  # fmt: skip
    return fields


def sidecar_ready(netns: str) -> bool | None:
    try:
        status, _ = nsio.request(netns, "127.0.0.1", SIDECAR_ADMIN_PORT, "GET", "/ready", timeout=3)
    except OSError:
        return None
    return True if status == 200 else None


def wait_ready(lab: Lab, replica: dict[str, Any], timeout: float = READY_TIMEOUT_S) -> None:
    name, netns = str(replica["name"]), str(replica["netns"])
    procs = {str(p["role"]): p for p in lab.state().processes(netns=netns)}

    def gone() -> str | None:
        for p in procs.values():
            if not lab.process_alive(p):
                return f"{p['name']} exited: {lab.log_tail(str(p['name']))} (log: {p['log']})"
        return None

    wait_until(
        lambda: sidecar_ready(netns),
        timeout=timeout,
        what=f"the sidecar of {name} (in {netns}) becoming ready",
        interval=0.25,
        failed=gone,
    )


def stop_process(lab: Lab, record: dict[str, Any] | None, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL — by PID and start time."""
    if record is None:
        return
    pid, started = int(record["pid"]), record.get("start")
    if not nsio.signal_process(pid, started, signal.SIGTERM):
        return
    deadline = time.monotonic() + timeout
    while nsio.alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    nsio.signal_process(pid, started, signal.SIGKILL)


def remove_replica(lab: Lab, layout: Layout, replica: dict[str, Any]) -> None:
    """Drain and remove one replica: nothing of it is left, and its records go last."""
    netns, name = str(replica["netns"]), str(replica["name"])
    state = lab.state()
    procs = {str(p["role"]): p for p in state.processes(netns=netns)}
    stop_process(lab, procs.get("sidecar"), DRAIN_TIMEOUT_S + 10.0)
    for role in ("load", "app"):
        stop_process(lab, procs.get(role), STOP_TIMEOUT_S)
    for pid in nsio.pids_in(netns):  # anything the app started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node = str(replica.get("node", ""))
    if node and netns in nsio.list_netns():
        detach = meshlet_argv(
            "node", "detach", "--netns", netns, "--state-dir", str(lab.node_state)
        )
        with contextlib.suppress(MeshError):
            nsio.run(layout.node_netns(node), detach)  # the namespace goes anyway
    nsio.delete_netns(netns)
    etc = NETNS_ETC / netns
    shutil.rmtree(etc, ignore_errors=True)
    shutil.rmtree(lab.certs / name, ignore_errors=True)
    links = [
        str(e["id"])
        for e in state.of_kind("link")
        if e.get("netns") == netns or str(e.get("peer", "")).endswith(f" in {netns}")
    ]
    for rid in (
        *(str(p["id"]) for p in procs.values()),
        *links,
        lab_state.nft_id(netns, INTERCEPT_TABLE),
        lab_state.file_id(str(etc / "resolv.conf")),
        lab_state.dir_id(str(etc)),
        lab_state.netns_id(netns),
        str(replica["id"]),
    ):
        lab.journal.forget(rid)


def kill_app(lab: Lab, replica: dict[str, Any]) -> int:
    """SIGKILL the replica's app (its sidecar stays); returns the PID killed."""
    procs = [
        p
        for p in lab.state().processes(netns=str(replica["netns"]))
        if p.get("role") in ("app", "load")
    ]
    for p in procs:
        if nsio.signal_process(int(p["pid"]), p.get("start"), signal.SIGKILL):
            return int(p["pid"])
    raise MeshError(f"the app of {replica['name']} is not running (see `meshlet lab status`)")
