"""L7 in transparent mode, in network namespaces: an app that knows nothing about the mesh
dials `orders:8080` (declared `http`) or `orders:8081` (declared without a protocol:
detected), nft hands the connection to the web sidecar, SO_ORIGINAL_DST names the
service port, and the sidecar proxies per request.

The lab (tests/netns_helpers.py, namespaces named ``mlt-dt…``): ``cp`` (the control
plane), ``web`` (an echo app as its own app, and the client, uid 65534, stdlib only) and
``orders-0``/``orders-1`` (real aiohttp backends), each container with `meshlet sidecar
init` rules and `meshlet sidecar run --mode transparent`, on 198.18.31.0/24.

What the app notices: its requests on ONE keep-alive connection are answered by both
replicas in turn (round robin per request: L7, not a relayed connection) with
``x-meshlet-attempts``, on the declared port and on the detected one alike."""

from __future__ import annotations

import collections
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from l7_helpers import BACKEND_APP
from netns_helpers import (
    NOBODY,
    PREFIX,
    SYSTEM_PYTHON,
    Lab,
    NsProcess,
    _sh,
    have_netns_tools,
)
from sidecar_helpers import ECHO_APP, metric

ROOT = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "detect-transparent.test"
SUBNET = "198.18.31.0/24"
ORDERS = ("orders-0", "orders-1")
HOSTS = ("cp", "web", *ORDERS)
SERVICE_OF = {"web": "shop/web", **{o: "shop/orders" for o in ORDERS}}
RESOLVER = "198.18.31.53"  # in every resolv.conf; no namespace has it: only nft → sidecar DNS
ADMIN = "http://127.0.0.1:15000"
DETECTIONS = "meshlet_sidecar_protocol_detections_total"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not have_netns_tools() or not shutil.which("nft") or not Path(SYSTEM_PYTHON).exists(),
        reason="needs root, ip, nft and setpriv",
    ),
]

# Runs as the app (uid 65534, stdlib only). argv: NAME PORT COUNT TAG. COUNT requests on
# one http.client connection; per answer: status, x-meshlet-attempts, replica, local port.
CLIENT = r"""
import http.client, json, socket, sys
name, port, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
address = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
conn = http.client.HTTPConnection(name, port, timeout=10)
answers = []
for i in range(count):
    conn.request("GET", f"/detect/{i}", headers={"x-tag": tag})
    r = conn.getresponse()
    body = json.loads(r.read())
    answers.append([r.status, r.getheader("x-meshlet-attempts"), body["replica"],
                    conn.sock.getsockname()[1]])
conn.close()
print(json.dumps({"address": address, "answers": answers}))
"""


def dt_lab(names: tuple[str, ...]) -> Lab:
    """``Lab.create`` with namespaces named ``mlt-dt<hex>-<host>`` (so they are told
    apart from other tests' labs); everything made is removed on failure."""
    net = ipaddress.IPv4Network(SUBNET)
    addresses = list(net.hosts())
    tag = "dt" + secrets.token_hex(2)
    lab = Lab(tag=tag, switch=f"{PREFIX}{tag}-sw", subnet=net, gateway=str(addresses[0]))
    try:
        lab._add_netns(lab.switch)
        sw = lab.switch
        _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", sw, "addr", "add", f"{lab.gateway}/{net.prefixlen}", "dev", "br0")
        _sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            lab._add_host(name, str(addresses[i + 1]), f"v{i}")
    except BaseException:
        lab.destroy()
        raise
    return lab


@dataclass
class Mesh:
    lab: Lab
    tmp: Path
    procs: dict[str, NsProcess]
    vip: str  # shop/orders

    def metrics(self, host: str) -> str:
        status, text = self.lab.http(host, "GET", ADMIN + "/stats/prometheus")
        assert status == 200, text
        return str(text)

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.tail(1500)}" for n, p in self.procs.items())

    def requests(self, port: int, count: int) -> dict[str, Any]:
        tag = uuid.uuid4().hex[:8]
        done = self.lab.python("web", CLIENT, "orders", str(port), str(count), tag, uid=NOBODY)
        assert done.returncode == 0, f"{done.stderr}\n{self.logs()}"
        return dict(json.loads(done.stdout))


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def spawn_sidecar(lab: Lab, tmp: Path, data: Path, host: str, app_port: int) -> NsProcess:
    cp = lab.hosts["cp"].address
    done = lab.run(
        host,
        sys.executable, "-m", "meshlet", "sidecar", "init",
        "--outbound-port", "15001", "--inbound-port", "15006", "--dns", "127.0.0.53:53",
        "--proxy-uid", "0",
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    return lab.spawn(
        host,
        f"sidecar-{host}",
        sys.executable, "-m", "meshlet", "sidecar", "run",
        "--service", SERVICE_OF[host],
        "--control-plane", f"{cp}:15010", "--control-plane-mtls", f"{cp}:15012",
        "--ca-bundle", str(data / "ca" / "bundle.pem"),
        "--join-token", str(data / "join-token"),
        "--cert-dir", str(tmp / f"certs-{host}"),
        "--app-port", str(app_port),
        "--mode", "transparent",
        "--inbound", "0.0.0.0:15006",
        "--address", lab.hosts[host].address,
        "--dns", "127.0.0.53:53",
        "--admin", "127.0.0.1:15000",
        "--endpoint-id", host,
        "--drain-timeout", "1s",
        log=tmp / f"sidecar-{host}.log", cwd=ROOT, env=clean_env(),
    )  # fmt: skip


def build_mesh(tmp: Path) -> Mesh:
    lab = dt_lab(HOSTS)
    data = tmp / "cp"
    procs: dict[str, NsProcess] = {}
    try:
        for host in HOSTS:
            lab.etc_file(host, "resolv.conf", f"nameserver {RESOLVER}\noptions timeout:2\n")
        ip = lab.hosts["cp"].address
        api = f"http://{ip}:15080"
        procs["cp"] = lab.spawn(
            "cp", "control-plane",
            sys.executable, "-m", "meshlet", "control-plane", "run",
            "--data-dir", str(data),
            "--api", f"{ip}:15080", "--grpc", f"{ip}:15010", "--grpc-mtls", f"{ip}:15012",
            "--trust-domain", TRUST_DOMAIN,
            log=tmp / "control-plane.log", cwd=ROOT, env=clean_env(),
        )  # fmt: skip
        status, body = lab.http("cp", "GET", f"{api}/readyz", want=200, timeout=40)
        assert status == 200, (status, body, procs["cp"].tail())
        token = (data / "admin-token").read_text().strip()
        orders = {
            "ports": [{"port": 8080, "protocol": "http"}, {"port": 8081}],
            "policy": {"balancing": {"algorithm": "round_robin"}},
        }
        svc = lab.http_json("cp", "PUT", f"{api}/v1/services/shop/orders", orders, token=token)
        assert [p["protocol"] for p in svc["ports"]] == ["http", "auto"], svc
        lab.http_json(
            "cp", "PUT", f"{api}/v1/services/shop/web", {"ports": [{"port": 8080}]}, token=token
        )
        for o in ORDERS:  # aiohttp lives in the venv: these run as root, exempt from capture
            procs[o] = lab.spawn(
                o, f"app-{o}", sys.executable, "-c", BACKEND_APP, o, "127.0.0.1", "8080",
                log=tmp / f"app-{o}.log",
            )  # fmt: skip
        procs["web"] = lab.spawn(
            "web", "app-web", SYSTEM_PYTHON, "-c", ECHO_APP, "web", "127.0.0.1", "8080",
            log=tmp / "app-web.log", uid=NOBODY,
        )  # fmt: skip
        for name in ("web", *ORDERS):
            procs[name].wait_for_output("ready", timeout=30)
        for host in ("web", *ORDERS):
            procs[f"sidecar-{host}"] = spawn_sidecar(lab, tmp, data, host, 8080)
        mesh = Mesh(lab, tmp, procs, svc["vip"])
        for host in ("web", *ORDERS):
            status, body = lab.http(host, "GET", ADMIN + "/ready", want=200, timeout=60)
            assert status == 200, f"sidecar in {host} not ready: {body}\n{mesh.logs()}"
        deadline = time.monotonic() + 30
        while True:
            clusters = lab.http_json("web", "GET", ADMIN + "/clusters")["clusters"]
            healthy = collections.Counter(
                c["service"] for c in clusters for e in c["endpoints"] if e["health"] == "healthy"
            )
            if healthy["shop/orders"] == len(ORDERS):
                break
            assert time.monotonic() < deadline, f"web never saw both replicas\n{mesh.logs()}"
            time.sleep(0.2)
    except BaseException:
        lab.destroy()
        raise
    return mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = build_mesh(tmp_path_factory.mktemp("detect-transparent"))
    try:
        yield m
    finally:
        m.lab.destroy()
    assert not m.lab.leftovers(), m.lab.leftovers()


def assert_balanced_per_request(mesh: Mesh, result: dict[str, Any], count: int) -> None:
    assert result["address"] == mesh.vip  # the app dialled the VIP it was given by DNS
    answers = result["answers"]
    assert [(status, attempts) for status, attempts, _, _ in answers] == [(200, "1")] * count
    assert len({port for _, _, _, port in answers}) == 1, answers  # one connection ...
    replicas = [replica for _, _, replica, _ in answers]
    assert collections.Counter(replicas) == dict.fromkeys(ORDERS, count // 2), replicas
    assert all(a != b for a, b in itertools.pairwise(replicas))  # ... in turn


def requests_total(text: str, direction: str) -> float:
    """``meshlet_request_total`` for shop/orders in one direction, over every route."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("meshlet_request_total{")
        and f'direction="{direction}"' in line
        and 'service="shop/orders"' in line
    )


def test_a_port_declared_http_is_balanced_per_request_in_transparent_mode(mesh: Mesh) -> None:
    count = 20
    before = {h: requests_total(mesh.metrics(h), "inbound") for h in ORDERS}
    before["web"] = requests_total(mesh.metrics("web"), "outbound")
    result = mesh.requests(8080, count)
    assert_balanced_per_request(mesh, result, count)
    assert requests_total(mesh.metrics("web"), "outbound") == before["web"] + count
    for o in ORDERS:  # each replica's sidecar took its half, request by request
        assert requests_total(mesh.metrics(o), "inbound") == before[o] + count // 2, o


def test_an_undeclared_port_is_detected_as_http1_in_transparent_mode(mesh: Mesh) -> None:
    count = 20

    def detected(outcome: str) -> float:
        return float(
            metric(mesh.metrics("web"), DETECTIONS, service="shop/orders", outcome=outcome)
        )

    before = {o: detected(o) for o in ("http1", "tcp", "timeout")}
    result = mesh.requests(8081, count)
    assert_balanced_per_request(mesh, result, count)
    assert detected("http1") == before["http1"] + 1  # one connection, detected once
    assert (detected("tcp"), detected("timeout")) == (before["tcp"], before["timeout"])
