"""`meshlet lab` end to end, as a user drives it: `lab up` (2 nodes, the demo) → traffic
across nodes → `scale` → `kill` → `partition`/`heal` → `scale` back → `down`, then zero
leftovers; and `lab down` after `lab up` was killed with SIGKILL halfway.

Everything runs through the real CLI (`python -m meshlet lab ... --prefix mlt-lab
--run-dir TMP`), so every namespace this file creates is named ``mlt-lab-*``. What the
user would notice is read from where the user would look: the client container's own
counts (its app's GET /stats: requests ok and failed, and which replica answered each),
the control plane's API (the VIP), `lab top --once`, `lab status` and the machine itself
(namespaces, PIDs, links, files) after `lab down`. Readings inside a namespace go through
``ip netns exec`` with the system python, independent of the lab's own helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PREFIX = "mlt-lab"
SYSTEM_PYTHON = "/usr/bin/python3"
UP_TIMEOUT_S = 150.0
UNDERLAY = "198.18.20."

pytestmark = [pytest.mark.integration]

# Runs inside a namespace (stdlib only). argv: URL [TOKEN]; prints {"status", "body"}.
GET = r"""
import json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=5) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"""


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == PREFIX or n.startswith(f"{PREFIX}-")}


def host_network() -> set[str]:
    """What the lab could leave in the host's own namespace if it ever built there: links
    named like its underlay ports (``p-cp``, ``p-node1``) and addresses of its underlay.
    (Other engineers' tests may add their own links meanwhile: those are not ours.)"""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10)
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10)
    names = {line.split(":")[1].strip().split("@")[0] for line in links.stdout.splitlines()}
    found = {f"link {n}" for n in names if n.startswith("p-")}
    return found | {
        f"address {line.split()[3]} on {line.split()[1]}"
        for line in addrs.stdout.splitlines()
        if f"inet {UNDERLAY}" in line
    }


def alive(pid: int, start: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def journal(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line torn by a kill
            out.append(json.loads(line))
    return out


def recorded_processes(run_dir: Path) -> list[tuple[str, int, int | None]]:
    return [
        (r["name"], r["pid"], r.get("start"))
        for r in journal(run_dir)
        if r.get("kind") == "process" and r.get("op") == "add"
    ]


def leftovers(
    run_dir: Path, host_before: set[str], procs: list[tuple[str, int, int | None]]
) -> list[str]:
    left = [f"namespace {n}" for n in sorted(ours(netns_names()))]
    left += [f"process {name} (pid {pid})" for name, pid, start in procs if alive(pid, start)]
    left += [f"file {p}" for p in Path("/etc/netns").glob(f"{PREFIX}-*")]
    if run_dir.exists():
        left.append(f"run directory {run_dir}: {sorted(os.listdir(run_dir))}")
    left += [f"{item} in the host's namespace" for item in host_network() - host_before]
    return left


def lab_cmd(run_dir: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshlet", "lab", *args, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def get(netns: str, url: str, token: str | None = None) -> tuple[int, str]:
    argv = [
        "ip",
        "netns",
        "exec",
        netns,
        SYSTEM_PYTHON,
        "-c",
        GET,
        url,
        *([token] if token else []),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    return int(answer["status"]), str(answer["body"])


def wait_for(
    check: Callable[[], Any], what: str, timeout: float, diagnose: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}\n{diagnose()}")
        time.sleep(0.5)


@dataclass
class Lab:
    run_dir: Path
    host_before: set[str]
    up_output: str

    @property
    def client(self) -> str:
        return f"{PREFIX}-load-0"

    def stats(self) -> dict[str, Any]:
        status, body = get(self.client, "http://127.0.0.1:8080/stats")
        assert status == 200, body
        return dict(json.loads(body)["targets"])

    def vip(self, key: str) -> str:
        token = (self.run_dir / "cp" / "admin-token").read_text().strip()
        status, body = get(f"{PREFIX}-cp", f"http://198.18.20.2:15080/v1/services/{key}", token)
        assert status == 200, body
        return str(json.loads(body)["vip"])

    def metric(self, container: str, name: str, **labels: str) -> float:
        """A counter from the sidecar of ``container`` (its admin port, inside it)."""
        status, text = get(f"{PREFIX}-{container}", "http://127.0.0.1:15000/stats/prometheus")
        assert status == 200, text
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(w in line for w in want)
        )

    def replicas(self) -> dict[str, dict[str, Any]]:
        """name → the replica's journal record (node, address, netns), as the lab left it."""
        state: dict[str, dict[str, Any]] = {}
        for r in journal(self.run_dir):
            if r.get("op") == "forget":
                state = {k: v for k, v in state.items() if v["id"] != r["id"]}
            elif r.get("kind") == "replica":
                state[r["name"]] = r
        return state

    def diagnose(self) -> str:
        logs = self.run_dir / "logs"
        tails = []
        for name in ("sidecar-web-0", "sidecar-load-0", "app-web-0", "app-load-0", "node-node2"):
            path = logs / f"{name}.log"
            if path.exists():
                tails.append(f"--- {name} ---\n{path.read_text(errors='replace')[-1500:]}")
        try:
            tails.append(json.dumps(self.stats(), indent=1)[-3000:])
        except AssertionError as e:
            tails.append(f"no client stats: {e}")
        return "\n".join(tails)

    def wait_counts(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        def check_now() -> dict[str, Any] | None:
            stats = self.stats()
            return stats if check(stats) else None

        return dict(wait_for(check_now, what, timeout, self.diagnose))


def test_lab_down_after_lab_up_was_killed_halfway_leaves_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    host_before = host_network()
    assert not ours(netns_names()), f"namespaces from an earlier run: {ours(netns_names())}"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshlet",
            "lab",
            "up",
            "--prefix",
            PREFIX,
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def midway() -> bool:
            roles = [r.get("role") for r in journal(run_dir) if r.get("kind") == "process"]
            return "sidecar" in roles

        wait_for(
            midway,
            "lab up starting its first sidecar",
            UP_TIMEOUT_S,
            lambda: str(journal(run_dir))[-2000:],
        )
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
    procs = recorded_processes(run_dir)
    assert any(alive(pid, start) for _, pid, start in procs), "nothing was running when killed"
    assert ours(netns_names()), "nothing was built when killed"
    down = ok(lab_cmd(run_dir, "down"))
    assert "nothing it created is left" in down
    assert leftovers(run_dir, host_before, procs) == []
    assert "nothing to take down" in ok(lab_cmd(run_dir, "down"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    run_dir = tmp_path_factory.mktemp("lab") / "run"
    host_before = host_network()
    assert not ours(netns_names()), f"namespaces from an earlier run: {ours(netns_names())}"
    started = time.monotonic()
    done = lab_cmd(run_dir, "up", "--prefix", PREFIX, timeout=UP_TIMEOUT_S)
    built = Lab(run_dir, host_before, done.stdout)
    try:
        assert done.returncode == 0, (
            f"lab up failed:\n{done.stdout}\n{done.stderr}\n{built.diagnose()}"
        )
        print(f"lab up: {time.monotonic() - started:.1f}s")
        yield built
    finally:
        procs = recorded_processes(run_dir)
        if (run_dir / "journal.jsonl").exists():
            lab_cmd(run_dir, "down", timeout=120)
        assert leftovers(run_dir, host_before, procs) == []


def test_up_says_where_to_look_and_traffic_crosses_nodes(lab: Lab) -> None:
    out = lab.up_output
    for expected in (
        "is up: scenario demo, 2 nodes, 8 containers",
        "http://198.18.20.2:15080",
        f"{lab.run_dir / 'logs'}",
        f"nsenter --net=/run/netns/{PREFIX}-load-0",
        f"{PREFIX}-node1",
        f"{PREFIX}-node2",
    ):
        assert expected in out, (expected, out)
    status = ok(lab_cmd(lab.run_dir, "status"))
    assert "everything recorded is there" in status
    reps = lab.replicas()
    assert {reps[f"orders-{i}"]["node"] for i in range(3)} == {"node1", "node2"}
    assert reps["orders-1"]["address"].startswith("198.19.")

    def served_everywhere(s: dict[str, Any]) -> bool:
        served = s["http"]["replicas"]
        return (
            all(served.get(f"orders-{i}", 0) >= 3 for i in range(3))
            and s["grpc"]["ok"] >= 5
            and s["redis"]["ok"] >= 3
        )

    stats = lab.wait_counts(
        "requests answered by every orders replica, gRPC and redis", served_everywhere
    )
    # the client started once every server was ready: not one request failed
    assert [stats[t]["failed"] for t in ("http", "grpc", "redis")] == [0, 0, 0], stats
    assert set(stats["grpc"]["replicas"]) == {"prices-0", "prices-1"}  # node2 and node1

    table = ok(lab_cmd(lab.run_dir, "top", "--once", "--interval", "2"))
    for expected in ("shop/web", "shop/orders", "shop/prices", "shop/redis", "req/s", "conn/s",
                     "orders-1@node2", "redis-0@node2"):  # fmt: skip
        assert expected in table, (expected, table)
    assert "shop/load" not in table


def privileges(pid: int) -> tuple[int, int, bool]:
    """The effective uid, capability mask and no_new_privs of ``pid``."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (
        int(status["Uid"].split()[1]),
        int(status["CapEff"], 16),
        status["NoNewPrivs"].strip() == "1",
    )


def test_sidecars_hold_no_privilege_but_binding_their_dns_port(lab: Lab) -> None:
    """The sidecars keep uid 0 (what interception exempts) but no capability save
    NET_BIND_SERVICE, for their DNS on port 53: they cannot touch the interception rules
    or the routes. The control plane's and nodes' processes are not sidecars."""
    net_bind_service = 1 << 10
    sidecars = [(n, p) for n, p, _ in recorded_processes(lab.run_dir) if n.startswith("sidecar-")]
    assert len(sidecars) >= 8
    for name, pid in sidecars:
        if Path(f"/proc/{pid}").exists():
            assert privileges(pid) == (0, net_bind_service, True), name
    # and still it serves: a name answered through both sidecars
    out = subprocess.run(
        ["ip", "netns", "exec", f"{PREFIX}-load-0", "setpriv", "--reuid=65534", "--regid=65534",
         "--clear-groups", "curl", "-sS", "--max-time", "10", "http://web:8080/"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["replica"] == "web-0" and answer["upstream"]["replica"].startswith("orders-")


def test_scale_orders_to_four_keeps_the_vip_and_the_new_replica_serves(lab: Lab) -> None:
    vip = lab.vip("shop/orders")
    out = ok(lab_cmd(lab.run_dir, "scale", "shop/orders=4"))
    assert f"3 → 4 replicas; VIP {vip} unchanged" in out, out
    assert lab.vip("shop/orders") == vip
    assert lab.replicas()["orders-3"]["node"] == "node2"
    before = lab.stats()["http"]["replicas"].get("orders-3", 0)
    lab.wait_counts(
        "the new replica orders-3 answering requests",
        lambda s: s["http"]["replicas"].get("orders-3", 0) >= before + 5,
    )


def test_killing_a_replica_costs_at_most_a_handful_of_requests_then_none(lab: Lab) -> None:
    start = lab.stats()["http"]
    ejections = lab.metric("web-0", "meshlet_outlier_ejections_total", service="shop/orders")
    print(ok(lab_cmd(lab.run_dir, "kill", "shop/orders#0")).strip())
    # the window of the kill: callers find out and eject orders-0
    after_kill = lab.wait_counts(
        "traffic continuing after the kill", lambda s: s["http"]["ok"] >= start["ok"] + 60
    )["http"]
    assert after_kill["failed"] - start["failed"] <= 5, after_kill
    # after the ejection: nothing fails, and orders-0 answers nothing
    settled = lab.wait_counts(
        "traffic continuing after the ejection",
        lambda s: s["http"]["ok"] >= after_kill["ok"] + 60,
    )["http"]
    assert settled["failed"] == after_kill["failed"], settled
    assert settled["replicas"].get("orders-0", 0) == after_kill["replicas"].get("orders-0", 0)
    # it was the mesh that took orders-0 out: web's sidecar ejected it
    assert lab.metric("web-0", "meshlet_outlier_ejections_total", service="shop/orders") > ejections
    status = lab_cmd(lab.run_dir, "status")
    assert status.returncode == 1 and "DEAD" in status.stdout and "app-orders-0" in status.stdout


def test_partition_cuts_node2_off_and_heal_brings_it_back(lab: Lab) -> None:
    start = lab.stats()
    assert "partitioned" in ok(lab_cmd(lab.run_dir, "partition", "node2"))
    # redis has its one replica on node2: it fails; HTTP goes on with node1's orders-2
    cut = lab.wait_counts(
        "redis calls failing while node2 is cut off",
        lambda s: (
            s["redis"]["failed"] >= start["redis"]["failed"] + 3
            and s["http"]["ok"] >= start["http"]["ok"] + 40
        ),
    )
    assert cut["http"]["failed"] - start["http"]["failed"] <= 5, cut["http"]
    assert "healed" in ok(lab_cmd(lab.run_dir, "heal", "node2"))
    healed = lab.wait_counts(
        "redis answering again after the heal",
        lambda s: s["redis"]["ok"] >= cut["redis"]["ok"] + 3,
    )
    node2 = ("orders-1", "orders-3")
    served = {r: healed["http"]["replicas"].get(r, 0) for r in node2}
    lab.wait_counts(
        "orders replicas on node2 answering again once their ejection ends",
        lambda s: any(s["http"]["replicas"].get(r, 0) > served[r] for r in node2),
        timeout=60.0,
    )


def test_scaling_back_drains_the_removed_replica_without_failed_requests(lab: Lab) -> None:
    vip = lab.vip("shop/orders")
    start = lab.stats()["http"]
    out = ok(lab_cmd(lab.run_dir, "scale", "shop/orders=3"))
    assert "removed orders-3" in out and f"VIP {vip} unchanged" in out, out
    assert "orders-3" not in lab.replicas()
    assert f"{PREFIX}-orders-3" not in netns_names()
    end = lab.wait_counts(
        "traffic after the scale-down", lambda s: s["http"]["ok"] >= start["ok"] + 40
    )["http"]
    assert end["failed"] == start["failed"], end


def test_down_removes_every_namespace_process_link_and_file(lab: Lab) -> None:
    procs = recorded_processes(lab.run_dir)
    assert len(procs) >= 20 and any(alive(pid, start) for _, pid, start in procs)
    started = time.monotonic()
    out = ok(lab_cmd(lab.run_dir, "down"))
    print(f"lab down: {time.monotonic() - started:.1f}s")
    assert "nothing it created is left" in out
    assert leftovers(lab.run_dir, lab.host_before, procs) == []
