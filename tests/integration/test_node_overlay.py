"""The node helper in network namespaces: a real VXLAN overlay between "hosts", built by
`meshlet node run` from a real control plane's node map, and containers plugged in with
`meshlet node attach`.

The lab (tests/netns_helpers.py, namespaces ``mlt-nd<hex>-*``): a switch namespace with a
bridge on the underlay 198.18.30.0/24 and one namespace per host — ``cp`` (the control
plane, 198.18.30.2, serving gRPC on the underlay: the node helpers reach it the way real
hosts would, so no extra routes are needed) and the nodes ``a``, ``b`` (and ``c`` for the
leaving test). Each node runs `meshlet node run` in its own namespace; containers are
further namespaces attached to a node. Entries are read with pyroute2, independently of
the helper's own netlink code.

What a user would notice: a 1 MiB HTTP body crosses from a container on node a to one on
node b, full-size packets with DF cross and bigger ones are refused locally (the MTU is
right, nothing is blackholed); a restarted helper leaves exactly one copy of every entry
and removes what it did not make; a node that leaves disappears from the others' FDB,
neighbour and route tables; attach/detach hand out, free and reuse addresses; missing
NET_ADMIN is said plainly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import PREFIX, SYSTEM_PYTHON, Host, Lab, NsProcess, _sh
from pyroute2 import IPRoute

ROOT = Path(__file__).resolve().parents[2]
UNDERLAY = "198.18.30.0/24"
BRIDGE = "mesh0"
VXLAN = "mesh-vxlan"
MTU = 1450  # the underlay veths have 1500
NUD_PERMANENT = 0x80
WAIT_S = 30.0
pytestmark = pytest.mark.integration

# Inside a container: GET a URL, print its length and sha256.
FETCH = r"""
import hashlib, json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=20) as r:
    body = r.read()
print(json.dumps({"status": r.status, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}))
"""

# Inside a container: a UDP echo server. argv: ADDRESS PORT.
ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

# Inside a container: one UDP datagram of SIZE bytes with DF set (IP_PMTUDISC_DO), and its
# echo. argv: ADDRESS PORT SIZE. Prints {"echo": n} or {"errno": e}.
DF_PROBE = r"""
import json, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.settimeout(1.0)
for attempt in range(10):
    try:
        s.sendto(b"x" * size, (host, port))
    except OSError as e:
        print(json.dumps({"errno": e.errno}))
        break
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        continue
    print(json.dumps({"echo": len(data)}))
    break
else:
    print(json.dumps({"lost": True}))
"""


# ---- the lab -------------------------------------------------------------------------------------


def node_lab(names: list[str]) -> Lab:
    """``Lab.create``, with this module's namespace prefix ``mlt-nd``."""
    net = ipaddress.IPv4Network(UNDERLAY)
    addresses = list(net.hosts())
    tag = "nd" + secrets.token_hex(2)
    lab = Lab(tag=tag, switch=f"{PREFIX}{tag}-sw", subnet=net, gateway=str(addresses[0]))
    try:
        lab._add_netns(lab.switch)
        _sh("ip", "-n", lab.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", lab.switch, "addr", "add", f"{lab.gateway}/{net.prefixlen}", "dev", "br0")
        _sh("ip", "-n", lab.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            lab._add_host(name, str(addresses[i + 1]), f"v{i}")
    except BaseException:
        lab.destroy()
        raise
    return lab


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def wait_until(check: Callable[[], bool], what: str, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}\n{logs()}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Entries:
    """What is programmed on a node's VXLAN device, every entry as the kernel lists it."""

    fdb: list[tuple[str, str]]
    neighbours: list[tuple[str, str, bool]]  # ip, mac, permanent
    routes: list[tuple[str, str, bool]]  # dst, via, onlink

    @property
    def counts(self) -> tuple[int, int, int]:
        return len(self.fdb), len(self.neighbours), len(self.routes)


def entries(netns: str) -> Entries:
    with IPRoute(netns=f"/run/netns/{netns}", flags=0) as ipr:
        found = ipr.link_lookup(ifname=VXLAN)
        if not found:
            return Entries([], [], [])
        vx = found[0]
        fdb = [
            (m.get("NDA_LLADDR"), m.get("NDA_DST"))
            for m in ipr.fdb("dump", ifindex=vx)
            if m["ifindex"] == vx and m.get("NDA_DST")
        ]
        neighbours = [
            (m.get("NDA_DST"), m.get("NDA_LLADDR"), bool(m["state"] & NUD_PERMANENT))
            for m in ipr.neigh("dump", family=socket.AF_INET)
            if m["ifindex"] == vx
        ]
        routes = [
            (f"{m.get('dst')}/{m['dst_len']}", m.get("gateway"), bool(m["flags"] & 4))
            for m in ipr.route("dump", family=socket.AF_INET, table=254)
            if m.get("oif") == vx
        ]
    return Entries(sorted(fdb), sorted(neighbours), sorted(routes))


def links(netns: str) -> dict[str, dict[str, Any]]:
    """Every link in ``netns``: name → {mtu, master, kind}."""
    with IPRoute(netns=f"/run/netns/{netns}", flags=0) as ipr:
        return {
            m.get("ifname"): {
                "index": m["index"],
                "mtu": m.get("mtu"),
                "master": m.get("master"),
                "kind": m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
            }
            for m in ipr.link("dump")
        }


def expected(peers: list[dict[str, Any]]) -> Entries:
    """The entries a node should have for these peers (their NAME.json)."""
    fdb, neighbours, routes = [], [], []
    for p in peers:
        hop = p["subnet"].split("/")[0]
        fdb += [
            (p["vtep_mac"], p["underlay_address"]),
            ("00:00:00:00:00:00", p["underlay_address"]),
        ]
        neighbours.append((hop, p["vtep_mac"], True))
        routes.append((p["subnet"], hop, True))
    return Entries(sorted(fdb), sorted(neighbours), sorted(routes))


@dataclass
class World:
    lab: Lab
    tmp: Path
    data: Path
    cp: NsProcess
    helpers: dict[str, NsProcess] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)  # name → address

    @property
    def cp_address(self) -> str:
        return self.lab.hosts["cp"].address

    def state_dir(self, node: str) -> Path:
        return self.tmp / f"state-{node}"

    def logs(self) -> str:
        procs = [self.cp, *self.helpers.values()]
        return "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in procs)

    def info(self, node: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state_dir(node) / f"{node}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

    def start_helper(self, node: str, *extra: str) -> NsProcess:
        proc = self.lab.spawn(
            node,
            f"node-{node}",
            sys.executable, "-m", "meshlet", "node", "run",
            "--name", node,
            "--control-plane", f"{self.cp_address}:15010",
            "--ca-bundle", str(self.data / "ca" / "bundle.pem"),
            "--join-token", str(self.data / "join-token"),
            "--underlay-address", self.lab.hosts[node].address,
            "--state-dir", str(self.state_dir(node)),
            *extra,
            log=self.tmp / f"node-{node}-{len(self.lab.procs)}.log", cwd=ROOT, env=clean_env(),
        )  # fmt: skip
        self.helpers[node] = proc

        def up() -> bool:
            assert proc.alive, f"node helper {node} exited:\n{proc.tail()}"
            info = self.info(node)
            return info is not None and info["pid"] == proc.pid

        wait_until(up, f"node {node} writes its state file", self.logs)
        return proc

    def stop_helper(self, node: str) -> int:
        proc = self.helpers[node]
        proc.signal(signal.SIGTERM)
        return proc.popen.wait(timeout=20)

    def node_cli(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(
            node,
            sys.executable, "-m", "meshlet", "node", *args,
            "--state-dir", str(self.state_dir(node)),
            cwd=ROOT, timeout=60,
        )  # fmt: skip

    def add_netns(self, name: str) -> str:
        """A container namespace, deleted with the lab."""
        netns = f"{PREFIX}{self.lab.tag}-{name}"
        self.lab._add_netns(netns)
        self.lab.hosts[name] = Host(name, netns, "")
        return netns

    def attach(self, node: str, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.node_cli(
            node, "attach", "--netns", self.lab.hosts[name].netns, "--service", "shop/web", *extra
        )

    def container(self, node: str, name: str) -> str:
        self.add_netns(name)
        done = self.attach(node, name)
        assert done.returncode == 0, f"{done.stderr}\n{self.logs()}"
        address = done.stdout.strip()
        self.lab.hosts[name] = Host(name, self.lab.hosts[name].netns, address)
        self.containers[name] = address
        return address

    def peers_of(self, node: str) -> list[dict[str, Any]]:
        found = []
        for other, proc in self.helpers.items():
            info = self.info(other)
            if other != node and proc.alive and info is not None:
                found.append(info)
        return found


def start_control_plane(lab: Lab, tmp: Path, data: Path) -> NsProcess:
    ip = lab.hosts["cp"].address
    cp = lab.spawn(
        "cp",
        "control-plane",
        sys.executable, "-m", "meshlet", "control-plane", "run",
        "--data-dir", str(data),
        "--api", f"{ip}:15080", "--grpc", f"{ip}:15010", "--grpc-mtls", f"{ip}:15012",
        log=tmp / "control-plane.log", cwd=ROOT, env=clean_env(),
    )  # fmt: skip
    info = data / "control-plane.json"

    def serving() -> bool:
        assert cp.alive, f"control plane exited:\n{cp.tail()}"
        try:
            return bool(json.loads(info.read_text()).get("pid") == cp.pid)
        except (FileNotFoundError, ValueError):
            return False

    wait_until(serving, "the control plane serves", cp.tail)
    return cp


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("node-overlay")
    lab = node_lab(["cp", "a", "b", "c"])
    try:
        data = tmp / "cp"
        w = World(lab, tmp, data, start_control_plane(lab, tmp, data))
        for node in ("a", "b"):
            w.start_helper(node)
        for node in ("a", "b"):
            wait_until(
                lambda n=node: entries(lab.hosts[n].netns) == expected(w.peers_of(n)),  # type: ignore[misc]
                f"node {node} programs its peer",
                w.logs,
            )
        yield w
    finally:
        lab.destroy()
    assert not lab.leftovers(), lab.leftovers()


# ---- traffic ---------------------------------------------------------------------------------------


def test_vxlan_carries_a_1mib_http_body_and_full_size_packets(world: World) -> None:
    lab = world.lab
    server = world.container("a", "web")
    world.container("b", "cli")
    info_a, info_b = world.info("a"), world.info("b")
    assert info_a is not None and info_b is not None
    assert ipaddress.IPv4Address(server) in ipaddress.IPv4Network(info_a["subnet"])
    assert ipaddress.IPv4Address(world.containers["cli"]) in ipaddress.IPv4Network(info_b["subnet"])
    assert info_a["subnet"] != info_b["subnet"]

    www = world.tmp / "www"
    www.mkdir()
    blob = os.urandom(1 << 20)
    (www / "blob").write_bytes(blob)
    http = lab.spawn(
        "web", "http-web",
        SYSTEM_PYTHON, "-u", "-m", "http.server", "8080", "--bind", server, "--directory", str(www),
        log=world.tmp / "http-web.log",
    )  # fmt: skip
    http.wait_for_output("Serving HTTP")
    done = lab.python("cli", FETCH, f"http://{server}:8080/blob", timeout=60)
    assert done.returncode == 0, f"{done.stderr}\n{world.logs()}"
    got = json.loads(done.stdout)
    assert got == {"status": 200, "length": 1 << 20, "sha256": hashlib.sha256(blob).hexdigest()}

    # The container's MTU is the overlay's: a full-size datagram with DF crosses the tunnel
    # (and comes back), one byte more is refused at the sender instead of vanishing.
    assert lab.run("cli", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == str(MTU)
    echo = lab.spawn(
        "web", "udp-echo", SYSTEM_PYTHON, "-u", "-c", ECHO, server, "9000",
        log=world.tmp / "udp-echo.log",
    )  # fmt: skip
    echo.wait_for_output("ready")
    full = MTU - 20 - 8
    done = lab.python("cli", DF_PROBE, server, "9000", str(full))
    assert json.loads(done.stdout) == {"echo": full}, done.stderr
    done = lab.python("cli", DF_PROBE, server, "9000", str(full + 1))
    assert json.loads(done.stdout) == {"errno": 90}, done.stderr  # EMSGSIZE


# ---- restart -------------------------------------------------------------------------------------------


def plant_stale(netns: str, peer: dict[str, Any]) -> None:
    """Entries no node explains, as a crash or a hand edit leaves them: another node's, and
    the peer's VTEP MAC pointing at a wrong underlay address."""
    with IPRoute(netns=f"/run/netns/{netns}", flags=0) as ipr:
        vx = ipr.link_lookup(ifname=VXLAN)[0]
        ipr.fdb("append", ifindex=vx, lladdr="02:4d:c6:12:1e:63", dst="198.18.30.99", state=NUD_PERMANENT)  # fmt: skip
        ipr.fdb("del", ifindex=vx, lladdr=peer["vtep_mac"], dst=peer["underlay_address"])
        ipr.fdb("append", ifindex=vx, lladdr=peer["vtep_mac"], dst="198.18.30.98", state=NUD_PERMANENT)  # fmt: skip
        ipr.neigh("replace", ifindex=vx, dst="198.19.99.0", lladdr="02:4d:c6:12:1e:63", state=NUD_PERMANENT)  # fmt: skip
        ipr.route("replace", dst="198.19.99.0/24", gateway="198.19.99.0", oif=vx, flags=4)


def test_a_restart_resyncs_without_duplicates_and_removes_stale_entries(world: World) -> None:
    netns = world.lab.hosts["a"].netns
    before = entries(netns)
    assert before == expected(world.peers_of("a")) and before.counts == (2, 1, 1)
    old_pid = world.helpers["a"].pid

    assert world.stop_helper("a") == 0
    assert entries(netns) == before, "SIGTERM must leave the overlay in place"
    assert {BRIDGE, VXLAN} <= set(links(netns))
    peer = world.info("b")
    assert peer is not None
    plant_stale(netns, peer)
    planted = entries(netns)
    assert planted.counts == (3, 2, 2)
    assert (peer["vtep_mac"], "198.18.30.98") in planted.fdb

    proc = world.start_helper("a")
    assert proc.pid != old_pid
    wait_until(lambda: entries(netns) == before, "the restarted helper re-syncs", world.logs)
    after = entries(netns)
    for table in (after.fdb, after.neighbours, after.routes):
        assert len(table) == len(set(table)), f"duplicated: {table}"
    assert after.counts == before.counts
    log = proc.output()
    assert "overlay synced" in log and "RemoveRoute" in log and "CreateVxlan" not in log


# ---- leaving --------------------------------------------------------------------------------------------


def test_a_node_leaving_removes_its_entries_on_the_others(world: World) -> None:
    # The control plane restarts first: a and b must reconnect their watch to see c at all.
    world.cp.signal(signal.SIGTERM)
    assert world.cp.popen.wait(timeout=20) == 0
    world.cp = start_control_plane(world.lab, world.tmp, world.data)
    world.start_helper("c", "--teardown-on-exit")
    info_c = world.info("c")
    assert info_c is not None
    route_c = (info_c["subnet"], info_c["subnet"].split("/")[0], True)
    for node in ("a", "b"):
        wait_until(
            lambda n=node: route_c in entries(world.lab.hosts[n].netns).routes,  # type: ignore[misc]
            f"{node} learns c",
            world.logs,
        )
    wait_until(
        lambda: entries(world.lab.hosts["c"].netns) == expected(world.peers_of("c")),
        "c programs a and b",
        world.logs,
    )

    assert world.stop_helper("c") == 0  # deregisters, then tears its overlay down
    for node in ("a", "b"):
        wait_until(
            lambda n=node: entries(world.lab.hosts[n].netns) == expected(world.peers_of(n)),  # type: ignore[misc]
            f"{node} forgets c",
            world.logs,
        )
        left = entries(world.lab.hosts[node].netns)
        assert info_c["underlay_address"] not in {dst for _, dst in left.fdb}
        assert info_c["vtep_mac"] not in {mac for _, mac, _ in left.neighbours}
    remaining = links(world.lab.hosts["c"].netns)
    assert BRIDGE not in remaining and VXLAN not in remaining
    assert world.info("c") is None
    nodes = world.lab.http_json(
        "cp",
        "GET",
        f"http://{world.cp_address}:15080/v1/nodes",
        token=(world.data / "admin-token").read_text().strip(),
    )
    assert {n["name"] for n in nodes["items"]} == {"a", "b"}


# ---- attach / detach -----------------------------------------------------------------------------------


def test_attach_hands_out_frees_and_reuses_addresses(world: World) -> None:
    info = world.info("b")
    assert info is not None
    subnet = ipaddress.IPv4Network(info["subnet"])
    first = world.container("b", "x1")
    second = world.container("b", "x2")
    assert first != second
    for address in (first, second):
        assert ipaddress.IPv4Address(address) in subnet
        assert address not in (str(subnet[0]), str(subnet[1]))

    again = world.attach("b", "x1", "--json")  # attaching twice converges to the same lease
    assert again.returncode == 0, again.stderr
    details = json.loads(again.stdout)
    assert details["address"] == first and details["gateway"] == info["gateway"]
    assert details["interface"] == "eth0" and details["mtu"] == MTU
    x1 = world.lab.hosts["x1"].netns
    with IPRoute(netns=f"/run/netns/{x1}", flags=0) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        assert [
            (a.get("address"), a["prefixlen"])
            for a in ipr.addr("dump", index=eth0, family=socket.AF_INET)
        ] == [(first, 24)]
        default = [r for r in ipr.route("dump", family=socket.AF_INET) if r["dst_len"] == 0]
        assert [(r.get("gateway"), r.get("oif")) for r in default] == [(info["gateway"], eth0)]
    node_links = links(world.lab.hosts["b"].netns)
    host_if = node_links[details["host_interface"]]
    assert host_if["master"] == node_links[BRIDGE]["index"] and host_if["mtu"] == MTU

    done = world.node_cli("b", "detach", "--netns", x1)
    assert done.returncode == 0 and first in done.stdout, done.stderr
    assert "eth0" not in links(x1)
    assert details["host_interface"] not in links(world.lab.hosts["b"].netns)
    done = world.node_cli("b", "detach", "--netns", x1)  # twice is fine
    assert done.returncode == 0 and "was not attached" in done.stdout, done.stderr

    assert world.container("b", "x3") == first  # the freed address is the next one out
    for name in ("x2", "x3"):
        done = world.node_cli("b", "detach", "--netns", world.lab.hosts[name].netns)
        assert done.returncode == 0, done.stderr


# ---- errors ---------------------------------------------------------------------------------------------


def test_missing_net_admin_and_bad_flags_are_reported_plainly(world: World) -> None:
    no_net_admin = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"]
    for args in (
        ["run", "--name", "z", "--control-plane", f"{world.cp_address}:15010",
         "--ca-bundle", str(world.data / "ca" / "bundle.pem"),
         "--join-token", str(world.data / "join-token"),
         "--underlay-address", world.lab.hosts["a"].address],
        ["attach", "--netns", world.lab.hosts["a"].netns, "--service", "shop/web"],
    ):  # fmt: skip
        done = world.lab.run(
            "a", *no_net_admin, sys.executable, "-m", "meshlet", "node", *args, cwd=ROOT
        )
        assert done.returncode == 1, (done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("meshlet: error: meshlet node "), lines
        assert "needs the NET_ADMIN capability" in lines[0]

    done = world.node_cli(
        "a", "run", "--name", "z", "--control-plane", f"{world.cp_address}:15010",
        "--ca-bundle", str(world.data / "ca" / "bundle.pem"),
        "--join-token", str(world.data / "join-token"), "--underlay-address", "198.18.30.200",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "198.18.30.200 is not an address of this host" in done.stderr
    done = world.node_cli("a", "attach", "--netns", "mlt-nd-missing", "--service", "shop/web")
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr
    assert "mlt-nd-missing" not in os.listdir("/run/netns")  # never created by mistake
