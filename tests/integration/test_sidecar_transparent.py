"""The sidecar in transparent mode, in network namespaces: nft interception, SO_ORIGINAL_DST
and the sidecar's DNS, with apps that know nothing about the mesh.

The lab (tests/netns_helpers.py): a switch namespace with a bridge, and one namespace per
host on 198.18.10.0/24 — ``cp`` (the control plane, 198.18.10.2), and the "containers"
``web``, ``orders-0..2`` and ``redis``, each one namespace holding an app and its sidecar
(`meshlet sidecar init` rules, then `meshlet sidecar run --mode transparent`). Every
container's resolv.conf names 198.18.10.53, an address no one in the lab has: a name only
resolves because nft hands the query to the sidecar's DNS on 127.0.0.53.

Clients run as uid 65534 (the sidecars run as root, exempted by ``--proxy-uid 0``): they
dial the name they were given, and only the mesh makes that work — an echo app behind
three sidecars, and Debian's redis-benchmark / redis-cli against Debian's redis-server,
which listens on 127.0.0.1 of its own namespace only, so its sidecar is the one way in.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import NOBODY, SYSTEM_PYTHON, Lab, NsProcess, have_netns_tools, netns_names
from sidecar_helpers import ECHO_APP, metric

ROOT = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "transparent.test"
ORDERS = ("orders-0", "orders-1", "orders-2")
CONTAINERS = ("web", *ORDERS, "redis")
HOSTS = ("cp", *CONTAINERS)  # cp gets 198.18.10.2, then .3, .4, ...
SERVICE_OF = {"web": "shop/web", "redis": "shop/redis", **{o: "shop/orders" for o in ORDERS}}
APP_PORT = {"web": 8080, "redis": 6379, **{o: 8080 for o in ORDERS}}
RESOLVER = "198.18.10.53"  # in every resolv.conf; no namespace has this address
SIDECAR_DNS = "127.0.0.53:53"
ADMIN = "http://127.0.0.1:15000"
REDIS_BIN = ("redis-server", "redis-benchmark", "redis-cli")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not have_netns_tools()
        or not all(shutil.which(b) for b in ("nft", "dig", *REDIS_BIN))
        or not Path(SYSTEM_PYTHON).exists(),
        reason="needs root, ip, nft, setpriv, dig, redis-server/-benchmark/-cli (Debian)",
    ),
]

# Runs as the app (uid 65534, stdlib only). argv: NAME PORT COUNT. Resolves NAME with
# getaddrinfo (resolv.conf → nft → the sidecar's DNS), then opens COUNT connections:
# each reads the greeting, sends a line, half-closes and reads the echo.
CLIENT = r"""
import json, socket, sys
name, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
addr = infos[0][4]
out = {"address": addr[0], "replies": []}
for i in range(count):
    with socket.create_connection(addr, timeout=5) as s:
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        s.sendall(b"ping %d\n" % i)
        s.shutdown(socket.SHUT_WR)
        out["replies"].append([greeting, f.read().decode()])
print(json.dumps(out))
"""

RESOLVE = r"""
import json, socket, sys
print(json.dumps(sorted({i[4][0] for i in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)})))
"""


@dataclass
class Mesh:
    lab: Lab
    tmp: Path
    data: Path
    cp: NsProcess
    apps: dict[str, NsProcess]
    sidecars: dict[str, NsProcess]
    vips: dict[str, str]  # service key → VIP

    @property
    def cp_address(self) -> str:
        return self.lab.hosts["cp"].address

    @property
    def api(self) -> str:
        return f"http://{self.cp_address}:15080"

    def address(self, host: str) -> str:
        return self.lab.hosts[host].address

    def admin_json(self, host: str, path: str) -> Any:
        return self.lab.http_json(host, "GET", ADMIN + path)

    def metrics(self, host: str) -> str:
        status, text = self.lab.http(host, "GET", ADMIN + "/stats/prometheus")
        assert status == 200, text
        return text

    def logs(self) -> str:
        procs = [self.cp, *self.sidecars.values(), *self.apps.values()]
        return "\n".join(f"--- {p.name} ---\n{p.tail(1500)}" for p in procs)

    def dig(self, *args: str) -> str:
        done = self.lab.run("web", "dig", "+time=2", "+tries=1", *args, uid=NOBODY, timeout=15)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout


def wait_for(check: Callable[[], bool], what: str, mesh: Mesh, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (AssertionError, KeyError, ValueError):  # not answering yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting: {what}\n{mesh.logs()}")


def clean_env() -> dict[str, str]:
    """The environment without proxy settings (gRPC and urllib would obey them)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def start_control_plane(lab: Lab, tmp: Path, data: Path) -> NsProcess:
    ip = lab.hosts["cp"].address
    cp = lab.spawn(
        "cp",
        "control-plane",
        sys.executable, "-m", "meshlet", "control-plane", "run",
        "--data-dir", str(data),
        "--api", f"{ip}:15080", "--grpc", f"{ip}:15010", "--grpc-mtls", f"{ip}:15012",
        "--trust-domain", TRUST_DOMAIN,
        log=tmp / "control-plane.log", cwd=ROOT, env=clean_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    info = data / "control-plane.json"
    while True:
        assert cp.alive, f"control plane exited:\n{cp.tail()}"
        try:
            if json.loads(info.read_text()).get("pid") == cp.pid:
                break
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < deadline, f"control plane did not serve:\n{cp.tail()}"
        time.sleep(0.05)
    status, body = lab.http("cp", "GET", f"http://{ip}:15080/readyz", want=200, timeout=20)
    assert status == 200, (status, body, cp.tail())
    return cp


def start_app(lab: Lab, tmp: Path, host: str) -> NsProcess:
    log = tmp / f"app-{host}.log"
    if host == "redis":
        app = lab.spawn(
            host, "redis-server",
            "redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
            log=log, uid=NOBODY,
        )  # fmt: skip
        app.wait_for_output("Ready to accept connections")
        return app
    app = lab.spawn(
        host, f"app-{host}", SYSTEM_PYTHON, "-c", ECHO_APP, host, "127.0.0.1", str(APP_PORT[host]),
        log=log, uid=NOBODY,
    )  # fmt: skip
    app.wait_for_output("ready")
    return app


def start_sidecar(lab: Lab, tmp: Path, data: Path, host: str) -> NsProcess:
    cp = lab.hosts["cp"].address
    done = lab.run(
        host,
        sys.executable, "-m", "meshlet", "sidecar", "init",
        "--outbound-port", "15001", "--inbound-port", "15006", "--dns", SIDECAR_DNS,
        "--proxy-uid", "0",
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("installed table inet meshlet"), (
        done.stdout,
        done.stderr,
    )
    return lab.spawn(
        host,
        f"sidecar-{host}",
        sys.executable, "-m", "meshlet", "sidecar", "run",
        "--service", SERVICE_OF[host],
        "--control-plane", f"{cp}:15010", "--control-plane-mtls", f"{cp}:15012",
        "--ca-bundle", str(data / "ca" / "bundle.pem"),
        "--join-token", str(data / "join-token"),
        "--cert-dir", str(tmp / f"certs-{host}"),
        "--app-port", str(APP_PORT[host]),
        "--mode", "transparent",
        "--inbound", "0.0.0.0:15006",
        "--address", lab.hosts[host].address,
        "--dns", SIDECAR_DNS,
        "--admin", "127.0.0.1:15000",
        "--endpoint-id", host,
        "--drain-timeout", "1s",
        log=tmp / f"sidecar-{host}.log", cwd=ROOT, env=clean_env(),
    )  # fmt: skip


def build_mesh(tmp: Path) -> Mesh:
    lab = Lab.create(HOSTS)
    data = tmp / "cp"
    try:
        for host in HOSTS:
            lab.etc_file(host, "resolv.conf", f"nameserver {RESOLVER}\noptions timeout:2\n")
        cp = start_control_plane(lab, tmp, data)
        mesh = Mesh(lab, tmp, data, cp, apps={}, sidecars={}, vips={})
        token = (data / "admin-token").read_text().strip()
        specs = {
            "shop/orders": {
                "ports": [{"port": 8080, "protocol": "tcp"}],
                "policy": {"balancing": {"algorithm": "round_robin"}},
            },
            "shop/redis": {"ports": [{"port": 6379, "protocol": "tcp"}]},
            "shop/web": {"ports": [{"port": 8080, "protocol": "tcp"}]},
        }
        for key, spec in specs.items():
            svc = lab.http_json("cp", "PUT", f"{mesh.api}/v1/services/{key}", spec, token=token)
            assert svc["vip"].startswith("198.19."), svc
            mesh.vips[key] = svc["vip"]
        for host in CONTAINERS:
            mesh.apps[host] = start_app(lab, tmp, host)
        for host in CONTAINERS:
            mesh.sidecars[host] = start_sidecar(lab, tmp, data, host)
        for host in CONTAINERS:
            status, body = lab.http(host, "GET", ADMIN + "/ready", want=200, timeout=40)
            assert status == 200, f"sidecar in {host} not ready: {body}\n{mesh.logs()}"

        def web_sees_everyone() -> bool:
            clusters = mesh.admin_json("web", "/clusters")["clusters"]
            healthy = collections.Counter(
                c["service"] for c in clusters for e in c["endpoints"] if e["health"] == "healthy"
            )
            return healthy["shop/orders"] == len(ORDERS) and healthy["shop/redis"] == 1

        wait_for(web_sees_everyone, "the web sidecar lists every replica as healthy", mesh)
    except BaseException:
        lab.destroy()
        raise
    return mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = build_mesh(tmp_path_factory.mktemp("transparent"))
    try:
        yield m
    finally:
        m.lab.destroy()
    assert not m.lab.leftovers(), m.lab.leftovers()


def test_names_resolve_through_the_sidecar_dns(mesh: Mesh) -> None:
    orders_vip = mesh.vips["shop/orders"]
    answer = mesh.dig("orders")
    assert "status: NOERROR" in answer and f"SERVER: {RESOLVER}#53" in answer, answer
    assert mesh.dig("+short", "orders").split() == [orders_vip]
    assert mesh.dig("+short", "orders.shop.svc.meshlet").split() == [orders_vip]
    assert mesh.dig("+short", "redis").split() == [mesh.vips["shop/redis"]]
    tasks = mesh.dig("+short", "tasks.orders").split()
    assert sorted(tasks) == sorted(mesh.address(o) for o in ORDERS)
    assert "status: NXDOMAIN" in mesh.dig("nothing.shop.svc.meshlet")
    # the C library's resolver, as every app uses it
    for name, vip in (("orders", orders_vip), ("redis.shop.svc.meshlet", mesh.vips["shop/redis"])):
        done = mesh.lab.python("web", RESOLVE, name, uid=NOBODY)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [vip]


def test_connections_to_the_vip_reach_every_orders_replica_over_mtls(mesh: Mesh) -> None:
    count = 12
    before = {o: mesh.metrics(o) for o in ORDERS}
    done = mesh.lab.python("web", CLIENT, "orders", "8080", str(count), uid=NOBODY, timeout=60)
    assert done.returncode == 0, f"{done.stderr}\n{mesh.logs()}"
    result = json.loads(done.stdout)
    assert result["address"] == mesh.vips["shop/orders"]
    replies = result["replies"]
    assert [echo for _, echo in replies] == [f"ping {i}\n" for i in range(count)]
    seen = collections.Counter(greeting for greeting, _ in replies)
    assert seen == {f"hello from {o}": count // len(ORDERS) for o in ORDERS}  # round robin

    for o in ORDERS:  # each replica's inbound sidecar terminated mTLS for its share
        delta = metric(
            mesh.metrics(o), "meshlet_tcp_open_total", direction="inbound", service="shop/orders"
        ) - metric(before[o], "meshlet_tcp_open_total", direction="inbound", service="shop/orders")
        assert delta == count // len(ORDERS), o
    web = mesh.metrics("web")
    assert (
        metric(web, "meshlet_tcp_open_total", direction="outbound", service="shop/orders") >= count
    )
    clusters = {c["service"]: c for c in mesh.admin_json("web", "/clusters")["clusters"]}
    orders = clusters["shop/orders"]
    assert orders["vip"] == mesh.vips["shop/orders"] and orders["ports"] == [8080]
    assert sorted(e["address"] for e in orders["endpoints"]) == sorted(
        f"{mesh.address(o)}:15006" for o in ORDERS
    )
    assert {e["identity"] for e in orders["endpoints"]} == {
        f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/orders"
    }


# A TCP server outside the mesh (stdlib only). argv: PORT...; answers "outside PORT".
OUTSIDE = r"""
import socket, sys, threading
def serve(port):
    s = socket.create_server(("0.0.0.0", port))
    ready.release()
    while True:
        c, _ = s.accept()
        c.sendall(b"outside %d\n" % port)
        c.close()
ports = [int(p) for p in sys.argv[1:]]
ready = threading.Semaphore(0)
for port in ports:
    threading.Thread(target=serve, args=(port,), daemon=True).start()
for _ in ports:
    ready.acquire()
print("ready", flush=True)
threading.Event().wait()
"""

# The app's view (stdlib only). argv: HOST PORT; prints the first line the server sends.
GREETING = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(f"oserror {e.strerror}")
"""


@pytest.fixture(scope="module")
def outside(mesh: Mesh) -> Iterator[str]:
    """Servers on the cp host, outside the mesh, on ports 9000 and 15001."""
    server = mesh.lab.spawn(
        "cp", "outside", SYSTEM_PYTHON, "-c", OUTSIDE, "9000", "15001",
        log=mesh.tmp / "outside.log", uid=NOBODY,
    )  # fmt: skip
    server.wait_for_output("ready")
    yield mesh.cp_address  # lab.destroy stops it


def greeting(mesh: Mesh, host: str, port: int) -> str:
    done = mesh.lab.python("web", GREETING, host, str(port), uid=NOBODY)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_non_mesh_address_in_the_lab_passes_through(mesh: Mesh, outside: str) -> None:
    def passed() -> float:
        return metric(mesh.metrics("web"), "meshlet_unknown_destination_total", action="pass")

    before = passed()
    status, body = mesh.lab.http("web", "GET", f"{mesh.api}/readyz", uid=NOBODY)
    assert status == 200, body
    assert greeting(mesh, outside, 9000) == "outside 9000"
    assert passed() == before + 2  # both captured by nft, then sent on by the sidecar


def test_a_non_mesh_server_on_port_15001_passes_through(mesh: Mesh, outside: str) -> None:
    assert greeting(mesh, outside, 15001) == "outside 15001"


def test_redis_benchmark_and_redis_cli_through_the_mesh(mesh: Mesh) -> None:
    inbound = (
        "meshlet_tcp_open_total",
        {"direction": "inbound", "service": "shop/redis"},
    )
    before = metric(mesh.metrics("redis"), inbound[0], **inbound[1])
    started = time.monotonic()
    done = mesh.lab.run(
        "web",
        "redis-benchmark", "-h", "redis.shop.svc.meshlet", "-p", "6379",
        "-n", "20000", "-c", "10", "-t", "set,get", "-q",
        uid=NOBODY, timeout=90,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, (done.stdout, done.stderr)
    rps = {
        m["op"]: float(m["rps"])
        for line in re.split(r"[\r\n]+", done.stdout)
        if (m := re.match(r"\s*(?P<op>SET|GET): (?P<rps>[\d.]+) requests per second", line))
    }
    print(f"redis-benchmark through two sidecars: {rps} ({elapsed:.1f}s)")
    assert set(rps) == {"SET", "GET"} and all(v > 0 for v in rps.values()), done.stdout
    assert metric(mesh.metrics("redis"), inbound[0], **inbound[1]) >= before + 10

    def cli(*args: str) -> str:
        out = mesh.lab.run(
            "web", "redis-cli", "-h", "redis", "-p", "6379", *args, uid=NOBODY, timeout=20
        )
        assert out.returncode == 0, (out.stdout, out.stderr)
        return out.stdout.strip()

    assert cli("set", "k", "v") == "OK"
    assert cli("get", "k") == "v"
    # redis sees its own sidecar as the client, never the caller's address
    clients = cli("client", "list")
    assert "addr=127.0.0.1:" in clients and mesh.address("web") not in clients


def test_sigterm_stops_everything_and_teardown_leaves_nothing(mesh: Mesh) -> None:
    procs = [mesh.cp, *mesh.apps.values(), *mesh.sidecars.values()]
    assert all(p.alive for p in procs), mesh.logs()
    token = (mesh.data / "admin-token").read_text().strip()

    def endpoints(key: str) -> list[str]:
        url = f"{mesh.api}/v1/services/{key}/endpoints"
        return [e["id"] for e in mesh.lab.http_json("cp", "GET", url, token=token)["items"]]

    assert sorted(endpoints("shop/orders")) == list(ORDERS)
    # sidecars first: each drains, deregisters from the control plane and exits 0
    for p in mesh.sidecars.values():
        p.signal(signal.SIGTERM)
    codes = {host: p.popen.wait(timeout=20) for host, p in mesh.sidecars.items()}
    assert codes == dict.fromkeys(CONTAINERS, 0), mesh.logs()
    for key in set(SERVICE_OF.values()):
        assert endpoints(key) == [], key
    names = {h.netns for h in mesh.lab.hosts.values()} | {mesh.lab.switch}
    assert names <= netns_names()
    mesh.lab.destroy()
    assert not mesh.lab.leftovers()
    assert not names & netns_names()
    assert not any(p.alive for p in procs)
