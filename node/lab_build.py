"""`meshlet lab up`: the underlay, the control plane, a node helper per node, and the
scenario's containers — every piece recorded in the run directory as it is made.

For: ``check_prerequisites`` (root, the tools, the apps' runtime, the node helper), and
``up``: (1) the underlay — a switch namespace holding bridge ``br0`` and, per host (the
control plane and each node), a namespace joined to it by a veth pair (``p-HOST`` on
the bridge, ``eth0`` inside, 198.18.20.0/24 by default: the control plane .2, node K
.10+K); (2) the control plane in its own namespace on the underlay (API, gRPC and mTLS
gRPC on its underlay address) and the scenario's services declared through its API;
(3) per node: IP forwarding and a masquerade rule in the node's namespace (containers
reach the control plane with the node's underlay address, as flannel's ip-masq does,
so the control plane needs no routes to the overlay), then ``meshlet node run``, waited
for until it writes RUN_DIR/nodes/NODE.json; (4) the containers, four at a time
(node/lab_containers.py), servers first, then — once every server's sidecar is ready —
the clients that send the traffic.

Must never: touch the host's own namespace, or leave anything unrecorded: a failure (or
a kill) at any point leaves a journal that ``lab down`` can finish from.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import NetNS

from meshlet.errors import ConflictError, InputError
from node import lab_netns as nsio
from node import lab_state
from node.lab import DEFAULT_RUN_DIR, Lab, meshlet_argv, wait_until
from node.lab_containers import SYSTEM_PYTHON, add_replica, wait_ready
from node.lab_scenario import (
    CP_API_PORT,
    CP_GRPC_MTLS_PORT,
    CP_GRPC_PORT,
    MASQUERADE_TABLE,
    OVERLAY_CIDR,
    UNDERLAY_DEV,
    VNI,
    VXLAN_PORT,
    Layout,
    Scenario,
    masquerade_ruleset,
    service_body,
)

START_TIMEOUT_S = 60.0
PARALLEL_CONTAINERS = 4
TOOLS = ("ip", "nft", "setpriv", "redis-server", "redis-cli")


def check_prerequisites() -> None:
    if platform.system() != "Linux":
        raise InputError("the lab needs Linux (network namespaces, VXLAN, nftables)")
    if os.geteuid() != 0:
        raise InputError("the lab needs root (it creates network namespaces): run it with sudo")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise InputError(
            f"the lab needs {', '.join(missing)}: apt-get install iproute2 nftables "
            "util-linux redis-server redis-tools"
        )
    probe = [SYSTEM_PYTHON, "-c", "import aiohttp, grpc, google.protobuf"]
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run(probe, capture_output=True).returncode:
        raise InputError(
            f"the lab's apps run on {SYSTEM_PYTHON} with aiohttp and grpcio: "
            "apt-get install python3-aiohttp python3-grpcio"
        )
    if importlib.util.find_spec("node.cli") is None:
        raise InputError("the node helper (`meshlet node`, node/cli.py) is not installed")


def build_underlay(lab: Lab, layout: Layout) -> None:
    sw = layout.switch_netns
    lab.make_netns(sw, "switch (underlay bridge br0)")
    lab.journal.add("link", lab_state.link_id(sw, "br0"), netns=sw, name="br0")
    with nsio.netlink(f"bridge br0 in {sw}"), NetNS(sw) as ns:
        ns.link("add", ifname="br0", kind="bridge")
        ns.link("set", index=ns.link_lookup(ifname="br0")[0], state="up")
    hosts = [("cp", layout.cp_netns, layout.cp_address, "control plane")]
    hosts += [
        (n, layout.node_netns(n), layout.node_address(n), f"node {n}") for n in layout.node_names
    ]
    for host, netns, address, role in hosts:
        lab.make_netns(netns, role)
        port = f"p-{host}"
        lab.journal.add(
            "link",
            lab_state.link_id(sw, port),
            netns=sw,
            name=port,
            peer=f"{UNDERLAY_DEV} in {netns}",
        )
        lab.journal.add(
            "link",
            lab_state.link_id(netns, UNDERLAY_DEV),
            netns=netns,
            name=UNDERLAY_DEV,
            peer=f"{port} in {sw}",
        )
        with nsio.netlink(f"veth {port} to {netns}"), NetNS(sw) as ns:
            ns.link(
                "add", ifname=port, kind="veth", peer={"ifname": UNDERLAY_DEV, "net_ns_fd": netns}
            )
            bridge = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=ns.link_lookup(ifname=port)[0], master=bridge, state="up")
        with nsio.netlink(f"{address} on {UNDERLAY_DEV} in {netns}"), NetNS(netns) as ns:
            eth = ns.link_lookup(ifname=UNDERLAY_DEV)[0]
            ns.addr("add", index=eth, address=address, prefixlen=layout.network.prefixlen)
            ns.link("set", index=eth, state="up")


def start_control_plane(lab: Lab, layout: Layout) -> None:
    lab.make_dir(lab.cp_data, mode=0o700)
    a = layout.cp_address
    popen = lab.spawn(
        "control-plane",
        "control-plane",
        layout.cp_netns,
        meshlet_argv(
            "control-plane", "run", "--data-dir", str(lab.cp_data),
            "--api", f"{a}:{CP_API_PORT}", "--grpc", f"{a}:{CP_GRPC_PORT}",
            "--grpc-mtls", f"{a}:{CP_GRPC_MTLS_PORT}", "--overlay-cidr", OVERLAY_CIDR,
        ),
    )  # fmt: skip
    info = lab.cp_data / "control-plane.json"

    def serving() -> bool | None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(info.read_text()).get("pid") == popen.pid:
                status, _ = nsio.request(
                    layout.cp_netns, a, CP_API_PORT, "GET", "/readyz", timeout=2
                )
                return True if status == 200 else None
        return None

    wait_until(
        serving,
        timeout=START_TIMEOUT_S,
        what="the control plane starting",
        failed=lambda: lab.exited(popen, "control-plane"),
    )


def declare_services(lab: Lab, scenario: Scenario) -> None:
    for spec in scenario.services:
        svc = lab.api("PUT", f"/v1/services/{spec.key}", service_body(spec))
        lab.journal.add(
            "service",
            f"service:{spec.key}",
            key=spec.key,
            name=spec.name,
            protocol=spec.protocol,
            port=spec.port,
            vip=svc.get("vip"),
            client=spec.client,
        )


def start_node(lab: Lab, layout: Layout, node: str) -> subprocess.Popen[bytes]:
    netns = layout.node_netns(node)
    nsio.write_sysctl(netns, "net.ipv4.ip_forward", "1")
    table = f"ip {MASQUERADE_TABLE}"
    lab.journal.add(
        "nft",
        lab_state.nft_id(netns, table),
        netns=netns,
        table=table,
        purpose="containers reach the control plane (masquerade)",
    )
    nsio.check(nsio.run(netns, ["nft", "-f", "-"], input=masquerade_ruleset()), f"nft in {netns}")
    cp = layout.cp_address
    return lab.spawn(
        f"node-{node}",
        "node",
        netns,
        meshlet_argv(
            "node", "run", "--name", node,
            "--control-plane", f"{cp}:{CP_GRPC_PORT}",
            "--ca-bundle", str(lab.ca_bundle), "--join-token", str(lab.join_token),
            "--underlay-address", layout.node_address(node), "--underlay-dev", UNDERLAY_DEV,
            "--vni", str(VNI), "--port", str(VXLAN_PORT), "--state-dir", str(lab.node_state),
        ),
    )  # fmt: skip


def wait_node(lab: Lab, layout: Layout, node: str, popen: subprocess.Popen[bytes]) -> None:
    path = lab.node_state / f"{node}.json"

    def written() -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            if info.get("pid") == popen.pid and info.get("subnet"):
                return dict(info)
        return None

    info = wait_until(
        written,
        timeout=START_TIMEOUT_S,
        what=f"the node helper of {node} building the overlay",
        failed=lambda: lab.exited(popen, f"node-{node}"),
    )
    netns = layout.node_netns(node)
    for key in ("bridge", "vxlan"):  # the helper's own links, for `lab status`
        if info.get(key):
            lab.journal.add(
                "link",
                lab_state.link_id(netns, str(info[key])),
                netns=netns,
                name=str(info[key]),
                peer=f"made by node-{node}",
            )
    lab.journal.add(
        "node",
        f"node:{node}",
        name=node,
        netns=layout.node_netns(node),
        address=layout.node_address(node),
        subnet=info.get("subnet"),
        gateway=info.get("gateway"),
    )


def start_containers(lab: Lab, layout: Layout, scenario: Scenario) -> None:
    """Four at a time; the clients (traffic) only once every server is ready."""
    lab.netns_etc_root()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_CONTAINERS) as pool:
        for clients in (False, True):
            jobs = [
                (spec, i, layout.place(spec, i))
                for spec in scenario.services
                if spec.client == clients
                for i in range(spec.replicas)
            ]
            built = list(
                pool.map(
                    lambda j: add_replica(lab, layout, j[0], j[1], j[2], scenario.traffic), jobs
                )
            )
            state = lab.state()
            records = [state.get(lab_state.replica_id(b["service"], b["index"])) for b in built]
            list(pool.map(lambda r: wait_ready(lab, r), [r for r in records if r is not None]))


def _missing_dirs(run_dir: Path) -> list[Path]:
    """The run directory and the directories above it that do not exist, outermost first."""
    missing = []
    p = run_dir
    while not p.exists():
        missing.append(p)
        p = p.parent
    return list(reversed(missing))


def up(lab: Lab, layout: Layout, scenario: Scenario, echo: Callable[[str], None]) -> float:
    """Build the whole lab; returns the seconds it took."""
    started = time.monotonic()
    check_prerequisites()
    taken = sorted(n for n in nsio.list_netns() if n.startswith(f"{layout.prefix}-"))
    if taken:
        raise ConflictError(
            f"namespaces named {layout.prefix}-* exist already ({', '.join(taken[:3])}): "
            "another lab uses this prefix; take it down or pass another --prefix"
        )
    missing = _missing_dirs(lab.run_dir)
    for d in missing:
        d.mkdir(mode=0o700 if d == lab.run_dir else 0o755)
    with lab.journal.lock("up"):
        if not lab.state().empty:
            raise ConflictError(
                f"a lab is already recorded in {lab.run_dir}: run `meshlet lab down"
                f"{run_dir_flag(lab)}` first (`meshlet lab status` shows it)"
            )
        for d in missing:  # removed by `lab down` once nothing else is left in them
            lab.journal.add("dir", lab_state.dir_id(str(d)), path=str(d), only_if_empty=True)
        lab.journal.add(
            "lab",
            "lab",
            prefix=layout.prefix,
            nodes=layout.nodes,
            underlay=layout.underlay,
            scenario=scenario.name,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        for d in (lab.logs, lab.node_state, lab.certs):
            lab.make_dir(d)
        hosts = [layout.cp_netns, *(layout.node_netns(n) for n in layout.node_names)]
        echo(f"underlay {layout.underlay}: {layout.switch_netns} (bridge br0), {', '.join(hosts)}")
        build_underlay(lab, layout)
        echo(f"control plane: {layout.api_url} in {layout.cp_netns}")
        start_control_plane(lab, layout)
        declare_services(lab, scenario)
        echo(f"node helpers: {', '.join(layout.node_names)} (VXLAN {VNI}, UDP {VXLAN_PORT})")
        helpers = {n: start_node(lab, layout, n) for n in layout.node_names}
        for n, popen in helpers.items():
            wait_node(lab, layout, n, popen)
        count = sum(s.replicas for s in scenario.services)
        echo(f"containers: {count}, each with an app and a transparent sidecar")
        start_containers(lab, layout, scenario)
    return time.monotonic() - started


def run_dir_flag(lab: Lab) -> str:
    return "" if lab.run_dir == DEFAULT_RUN_DIR else f" --run-dir {lab.run_dir}"
