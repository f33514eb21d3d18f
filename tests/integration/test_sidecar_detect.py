"""Protocol detection on ports nobody declared, through real sidecars in explicit mode on
127.0.0.x: a real control plane; `shop/orders` (two aiohttp replicas), `shop/redis`
(Debian's redis-server), `shop/greeter` (an app that speaks first: a greeting, then an
echo; port 7000 undeclared, 7001 declared `tcp`) and `shop/grpc` (a grpcio health
server), every port but 7001 declared without a protocol; and the `shop/web` sidecar
with one local upstream port per service port, run with `--detect-timeout 300ms`.

What a user notices: HTTP/1.1 on an undeclared port is balanced per request (one
keep-alive connection reaches both replicas), redis-cli and a gRPC client work as if
the mesh were not there, a server-speaks-first app answers after the detect timeout
(and at once where declared `tcp`), and the detection metrics say what was decided."""

from __future__ import annotations

import asyncio
import collections
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from control_plane_helpers import ControlPlaneProcess
from l7_helpers import backend_app, wait_for
from sidecar_helpers import Proc, Sidecar, echo_app, free_port, metric

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("redis-server", "redis-cli")),
        reason="needs redis-server and redis-cli (Debian: redis-server, redis-tools)",
    ),
]

DETECT_TIMEOUT_S = 0.3
DETECTIONS = "meshlet_sidecar_protocol_detections_total"
DETECT_SECONDS = "meshlet_sidecar_protocol_detection_seconds"

GRPC_APP = textwrap.dedent(
    """
    import sys
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("shop.Grpc", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
    """
)


@dataclass
class Mesh:
    tmp: Path
    cp: ControlPlaneProcess
    web: Sidecar
    local: dict[str, int]  # "service:port" → the web sidecar's local port for it
    apps: dict[str, Proc] = field(default_factory=dict)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)

    def detections(self, service: str, outcome: str) -> float:
        return float(metric(self.web.metrics(), DETECTIONS, service=service, outcome=outcome))

    def requests(self, service: str) -> float:
        """Outbound requests the web sidecar proxied for ``service``, over every route."""
        return sum(
            float(line.rpartition(" ")[2])
            for line in self.web.metrics().splitlines()
            if line.startswith("meshlet_request_total{")
            and 'direction="outbound"' in line
            and f'service="{service}"' in line
        )

    def logs(self) -> str:
        procs = [self.web, *self.sidecars.values(), *self.apps.values()]
        return "\n".join(f"--- {p.log.name} ---\n{p.output()[-1500:]}" for p in procs)


def started(proc: Proc, text: str = "ready", timeout: float = 20.0) -> Proc:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        assert proc.alive and time.monotonic() < deadline, proc.output()
        time.sleep(0.05)
    return proc


def start_mesh(tmp: Path) -> Mesh:
    cp = ControlPlaneProcess(tmp / "cp", "--trust-domain", "detect.test")
    upstreams = {
        "shop/orders:8080": free_port(),
        "shop/redis:6379": free_port(),
        "shop/greeter:7000": free_port(),
        "shop/greeter:7001": free_port(),
        "shop/grpc:9090": free_port(),
        "shop/grpc:9091": free_port(),
    }
    flags: list[str] = []
    for target, port in upstreams.items():
        flags += ["--upstream", f"{target}=127.0.0.1:{port}"]
    web_port = free_port()
    web = Sidecar(
        cp,
        tmp,
        "shop/web",
        web_port,
        extra=(*flags, "--detect-timeout", f"{int(DETECT_TIMEOUT_S * 1000)}ms"),
        name="web",
    )
    mesh = Mesh(tmp, cp, web, upstreams)
    try:
        cp.start()
        specs = {
            "shop/orders": {
                "ports": [{"port": 8080}],
                "policy": {"balancing": {"algorithm": "round_robin"}},
            },
            "shop/redis": {"ports": [{"port": 6379}]},
            "shop/greeter": {"ports": [{"port": 7000}, {"port": 7001, "protocol": "tcp"}]},
            "shop/grpc": {"ports": [{"port": 9090}, {"port": 9091, "protocol": "http"}]},
            "shop/web": {"ports": [{"port": 80}]},
        }
        for key, spec in specs.items():
            answer = cp.call("PUT", f"/v1/services/{key}", spec)
            assert answer.status in (200, 201), answer
        declared = {p["port"]: p["protocol"] for p in answer_ports(cp, "shop/greeter")}
        assert declared == {7000: "auto", 7001: "tcp"}  # no protocol given: auto
        app_ports: dict[str, int] = {}
        replicas = {
            "orders-0": ("shop/orders", "127.0.0.2"),
            "orders-1": ("shop/orders", "127.0.0.3"),
            "redis": ("shop/redis", "127.0.0.4"),
            "greeter": ("shop/greeter", "127.0.0.5"),
            "grpc": ("shop/grpc", "127.0.0.6"),
        }
        for name in replicas:
            port = app_ports[name] = free_port()
            if name.startswith("orders"):
                mesh.apps[name] = backend_app(name, "127.0.0.1", port, tmp)
            elif name == "redis":
                mesh.apps[name] = Proc(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
                    tmp / "app-redis.log",
                ).start()  # fmt: skip
                started(mesh.apps[name], "Ready to accept")
            elif name == "greeter":
                mesh.apps[name] = echo_app(name, "127.0.0.1", port, tmp)
            else:
                grpc_app = Proc([sys.executable, "-c", GRPC_APP, str(port)], tmp / "app-grpc.log")
                mesh.apps[name] = started(grpc_app.start())
        for name, (service, address) in replicas.items():
            sidecar = Sidecar(cp, tmp, service, app_ports[name], address=address, name=name)
            mesh.sidecars[name] = sidecar.start()
        mesh.apps["web"] = echo_app("web", "127.0.0.1", web_port, tmp)  # /ready asks for it
        web.start()
        for sc in [*mesh.sidecars.values(), web]:
            sc.wait_ready(timeout=90)  # a loaded machine starts Python slowly
        want = collections.Counter(service for service, _ in replicas.values())

        def web_sees_everyone() -> bool:
            clusters = web.json("/clusters")["clusters"]
            seen = collections.Counter(c["service"] for c in clusters for _ in c["endpoints"])
            return all(seen[s] == n for s, n in want.items())

        wait_for(web_sees_everyone, "the web sidecar lists every endpoint", timeout=40)
    except BaseException:
        stop_mesh(mesh)
        raise
    return mesh


def answer_ports(cp: ControlPlaneProcess, key: str) -> list[dict[str, object]]:
    answer = cp.call("GET", f"/v1/services/{key}")
    assert answer.status == 200, answer
    return list(answer.data["ports"])


def stop_mesh(mesh: Mesh) -> None:
    for p in [mesh.web, *mesh.sidecars.values(), *mesh.apps.values()]:
        p.kill()
    mesh.cp.kill()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = start_mesh(tmp_path_factory.mktemp("detect"))
    try:
        yield m
    finally:
        stop_mesh(m)


def test_http1_on_an_undeclared_port_is_balanced_per_request(mesh: Mesh) -> None:
    before = mesh.detections("shop/orders", "http1")
    opened: list[int] = []

    async def go() -> list[tuple[int, str | None, str]]:
        async def on_create(*_: object) -> None:
            opened.append(1)

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create)
        connector = aiohttp.TCPConnector(limit=1)
        out = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(
            connector=connector, trace_configs=[trace], timeout=timeout
        ) as session:
            for i in range(20):
                url = f"http://127.0.0.1:{mesh.local['shop/orders:8080']}/orders/{i}"
                async with session.get(url) as r:
                    out.append(
                        (r.status, r.headers.get("x-meshlet-attempts"), (await r.json())["replica"])
                    )
        return out

    answers = asyncio.run(go())
    assert len(opened) == 1  # one keep-alive connection carried all 20 requests ...
    assert [(status, attempts) for status, attempts, _ in answers] == [(200, "1")] * 20
    # ... and each request was balanced on its own: that is L7, not a relayed connection
    assert collections.Counter(r for _, _, r in answers) == {"orders-0": 10, "orders-1": 10}
    assert mesh.detections("shop/orders", "http1") == before + 1


def test_curl_on_an_undeclared_port_reuses_one_connection_across_replicas(mesh: Mesh) -> None:
    base = f"http://127.0.0.1:{mesh.local['shop/orders:8080']}"
    out = subprocess.run(
        ["curl", "-sS", "-v", "--http1.1", "--max-time", "10", "--noproxy", "*",
         *(f"{base}/curl/{i}" for i in range(4))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Re-using existing connection") == 3
    assert (
        out.stdout.count('"replica": "orders-0"') == out.stdout.count('"replica": "orders-1"') == 2
    )


def test_redis_cli_on_an_undeclared_port_works_unchanged(mesh: Mesh) -> None:
    before = mesh.detections("shop/redis", "tcp")
    port = str(mesh.local["shop/redis:6379"])

    def cli(*args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", port, *args],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr, mesh.logs())
        return done.stdout.strip()

    assert cli("PING") == "PONG"
    assert cli("SET", "detect:key", "through the mesh") == "OK"
    assert cli("GET", "detect:key") == "through the mesh"
    # many commands on one connection, pipelined
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", port],
        input="INCR detect:counter\n" * 200,
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "200"
    assert mesh.detections("shop/redis", "tcp") == before + 4  # RESP is not HTTP: at once
    assert mesh.detections("shop/redis", "timeout") == 0


def read_greeting(
    port: int, payload: bytes, *, half_close_first: bool = False
) -> tuple[str, bytes]:
    """Connect, (optionally send ``payload`` and half-close at once), read the greeting,
    then the echo until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if half_close_first:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        if not half_close_first:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        return greeting, f.read()


def test_a_server_speaks_first_app_answers_after_the_detect_timeout(mesh: Mesh) -> None:
    before = {o: mesh.detections("shop/greeter", o) for o in ("timeout", "tcp", "http1")}
    for i in range(3):
        assert read_greeting(mesh.local["shop/greeter:7000"], b"ping %d\n" % i) == (
            "hello from greeter",
            b"ping %d\n" % i,
        )
    assert mesh.detections("shop/greeter", "timeout") == before["timeout"] + 3
    text = mesh.web.metrics()
    # every one of those waited out the timeout: the histogram shows where the time went
    assert metric(text, f"{DETECT_SECONDS}_bucket", le="0.2") < metric(
        text, f"{DETECT_SECONDS}_bucket", le="0.5"
    )
    # A client that sends at once and half-closes is TCP (or HTTP) without any waiting:
    # "GET" and EOF can never become a request line.
    assert read_greeting(mesh.local["shop/greeter:7000"], b"GET", half_close_first=True) == (
        "hello from greeter",
        b"GET",
    )
    assert mesh.detections("shop/greeter", "tcp") == before["tcp"] + 1
    assert mesh.detections("shop/greeter", "http1") == before["http1"]


def test_a_port_declared_tcp_is_never_peeked(mesh: Mesh) -> None:
    text = mesh.web.metrics()
    peeked = sum(
        metric(text, DETECTIONS, service="shop/greeter", outcome=o)
        for o in ("http1", "h2", "tcp", "timeout")
    )
    count = metric(text, f"{DETECT_SECONDS}_count")
    for i in range(3):
        assert read_greeting(mesh.local["shop/greeter:7001"], b"opaque %d\n" % i) == (
            "hello from greeter",
            b"opaque %d\n" % i,
        )
    text = mesh.web.metrics()
    assert peeked == sum(
        metric(text, DETECTIONS, service="shop/greeter", outcome=o)
        for o in ("http1", "h2", "tcp", "timeout")
    )
    assert metric(text, f"{DETECT_SECONDS}_count") == count


def health_checks(port: int) -> None:
    """Three gRPC health checks on one connection, and one for an unknown service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            answer = stub.Check(health_pb2.HealthCheckRequest(service="shop.Grpc"), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nothing"), timeout=10)
        assert e.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_grpc_client_on_an_undeclared_port_is_detected_as_h2(mesh: Mesh) -> None:
    before = mesh.detections("shop/grpc", "h2"), mesh.requests("shop/grpc")
    health_checks(mesh.local["shop/grpc:9090"])
    assert mesh.detections("shop/grpc", "h2") == before[0] + 1  # one connection ...
    assert mesh.requests("shop/grpc") == before[1] + 4  # ... proxied call by call


def test_h2c_on_a_port_declared_http_goes_to_the_http2_proxy(mesh: Mesh) -> None:
    before = {o: mesh.detections("shop/grpc", o) for o in ("h2", "http1", "timeout")}
    requests = mesh.requests("shop/grpc")
    health_checks(mesh.local["shop/grpc:9091"])  # the preface, not an HTTP/1.1 request
    after = {o: mesh.detections("shop/grpc", o) for o in ("h2", "http1", "timeout")}
    assert after == {**before, "h2": before["h2"] + 1}
    assert mesh.requests("shop/grpc") == requests + 4
