"""The shop example, injected, on a real Docker engine with docker-compose (issue 7).

What a user does and sees: build the image (compose/build-base.sh, build-image.sh),
`meshlet inject docker-compose.yml > injected.yml`, `docker-compose -f injected.yml up
-d`; then calls by name succeed over mTLS (the caller's SPIFFE identity is in the callee
sidecar's access log), the mesh refuses a caller payment-service does not allow, a
plaintext connection to a sidecar's inbound port gets no answer, three replicas of
order-service share the calls behind an unchanged VIP, and `docker-compose down -v`
leaves no container, network, volume or overlay link behind.

The engine is the test's own: a dockerd on /run/meshlet-test-docker.sock with its own
data root (kept between runs: it is the image cache) and exec root, no iptables, no
default bridge, address pools in 198.18.0.0/16. The machine's own engine, if any, is
never used. The dockerd is stopped by its PID at the end, after the project is removed,
even when a step fails. Needs root; installs docker.io, docker-compose, debootstrap and
zstd from Debian when missing. The first run builds the base image (about a minute);
later runs reuse it and the meshlet image (cached by a hash of the wheels).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "compose" / "examples"
MESHLET = Path(sys.executable).with_name("meshlet")
SOCK = "/run/meshlet-test-docker.sock"
DATA_ROOT = "/var/lib/meshlet-test-docker"
EXEC_ROOT = "/run/meshlet-test-docker"
PIDFILE = "/run/meshlet-test-docker.pid"
PROJECT = "shop"  # the example's directory name: compose's project, the mesh namespace
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose"}
PACKAGES |= {"debootstrap": "debootstrap", "zstd": "zstd"}


def run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc


def wait_for(what: str, probe: Callable[[], object], timeout: float, every: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def ensure_packages() -> None:
    missing = sorted({pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, timeout=300)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        timeout=600,
    )


def overlay_links() -> set[str]:
    """Links in this (the host's) network namespace that a node helper would make."""
    out = run(["ip", "-d", "-o", "link", "show"], timeout=10).stdout
    names = set()
    for line in out.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if name.startswith("mesh") or " vxlan id " in line:
            names.add(name)
    return names


@dataclass
class Engine:
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check).stdout

    def project_objects(self, project: str) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={project}"
        lists = {
            "containers": ["ps", "-aq", "--filter", label],
            "networks": ["network", "ls", "-q", "--filter", label],
            "volumes": ["volume", "ls", "-q", "--filter", label],
        }
        return {kind: self.docker(*args).split() for kind, args in lists.items()}

    def remove_project(self, project: str) -> None:
        """Whatever a failed run left of the project on this engine."""
        objs = self.project_objects(project)
        if objs["containers"]:
            self.docker("rm", "-f", "-v", *objs["containers"], timeout=120, check=False)
        if objs["networks"]:
            self.docker("network", "rm", *objs["networks"], check=False)
        if objs["volumes"]:
            self.docker("volume", "rm", "-f", *objs["volumes"], check=False)


def stop_pid(pid: int, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    assert os.geteuid() == 0, "this test starts its own dockerd: run it as root"
    ensure_packages()
    # A dockerd this test started earlier and never stopped (the run was killed): ours.
    with contextlib.suppress(OSError, ValueError):
        old = int(Path(PIDFILE).read_text())
        if SOCK in Path(f"/proc/{old}/cmdline").read_bytes().decode(errors="replace"):
            stop_pid(old)
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    args = [
        "dockerd",
        "--host", f"unix://{SOCK}",
        "--data-root", DATA_ROOT,
        "--exec-root", EXEC_ROOT,
        "--pidfile", PIDFILE,
        "--containerd-namespace", "meshlet-test",
        "--containerd-plugins-namespace", "meshlet-test-plugins",
        "--iptables=false",
        "--ip-masq=false",
        "--bridge=none",  # no docker0: compose makes its own networks
        "--default-address-pool", "base=198.18.0.0/16,size=24",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCK}", "COMPOSE_HTTP_TIMEOUT": "180"}
    eng = Engine(env=env, proc=proc, log=log)
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"dockerd exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            return run(["docker", "version"], env=env, timeout=10, check=False).returncode == 0

        wait_for("dockerd to answer", answers, timeout=90, every=0.5)
        eng.remove_project(PROJECT)
        yield eng
    finally:
        with contextlib.suppress(Exception):
            eng.remove_project(PROJECT)
        stop_pid(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its containerd, if dockerd had to be killed
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """meshlet:latest, built on the local base (both cached between runs)."""
    started = time.monotonic()
    run([str(ROOT / "compose" / "build-image.sh")], env=engine.env, timeout=900)
    print(f"image ready in {time.monotonic() - started:.1f} s")
    return "meshlet:latest"


def test_the_image_runs_meshlet_as_an_unprivileged_user_with_nft_and_ip(
    engine: Engine, image: str
) -> None:
    out = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
        "meshlet --version && id -u && nft --version && ip -V",
    )  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "meshlet, version 0.1.0"
    assert lines[1] == "1337"
    assert lines[2].startswith("nftables v") and lines[3].startswith("ip utility")


@dataclass
class Stack:
    engine: Engine
    dir: Path

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        proc = run(
            ["docker-compose", "-f", "injected.yml", *args],
            env=self.engine.env,
            cwd=self.dir,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            logs = self.compose("logs", "--tail", "15", "--no-color", timeout=60, check=False)
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {proc.returncode}\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}\n--- logs\n{logs[-8000:]}"
            )
        return proc.stdout

    def wait(
        self, what: str, probe: Callable[[], object], timeout: float, every: float = 1
    ) -> object:
        """wait_for, with the project's recent logs when it times out."""
        try:
            return wait_for(what, probe, timeout, every)
        except AssertionError as e:
            logs = self.compose("logs", "--tail", "15", "--no-color", timeout=60, check=False)
            raise AssertionError(f"{e}\n--- logs\n{logs[-12000:]}") from None

    def inject(self) -> None:
        proc = run([str(MESHLET), "inject", "docker-compose.yml"], cwd=self.dir, timeout=60)
        (self.dir / "injected.yml").write_text(proc.stdout)

    def containers(self, service: str) -> list[str]:
        return self.engine.docker(
            "ps", "-q",
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip

    def exec_in(self, service: str, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        (cid, *_) = self.containers(service) or [f"<no container for {service}>"]
        proc = run(["docker", "exec", cid, *cmd], env=self.engine.env, timeout=timeout, check=check)
        return proc.stdout + proc.stderr if not check else proc.stdout

    def calls(
        self, service: str, url: str, count: int
    ) -> tuple[list[dict[str, object]], Counter[str]]:
        out = self.exec_in(
            service, "python", "/apps/client.py", url, "--count", str(count), "--every", "0",
            timeout=30 + count * 6,
        )  # fmt: skip
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        summary = Counter(lines[-1]["summary"])
        return lines[:-1], summary

    def sidecar_containers(self, app_service: str) -> list[str]:
        """The sidecars of ``app_service`` and of its replicas: compose services named
        ``<app_service>[-N]-meshlet``."""
        out = self.engine.docker(
            "ps", "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}',
            "--filter", f"label=com.docker.compose.project={PROJECT}",
        )  # fmt: skip
        pattern = re.compile(rf"{re.escape(app_service)}(-\d+)?-meshlet")
        return [
            cid
            for cid, svc in (line.split() for line in out.splitlines())
            if pattern.fullmatch(svc)
        ]


@pytest.fixture
def shop(engine: Engine, image: str, tmp_path: Path) -> Iterator[Stack]:
    """The shop example, copied (so that injected.yml stays out of the repository)."""
    shutil.copytree(EXAMPLES / "apps", tmp_path / "apps")
    shutil.copytree(EXAMPLES / PROJECT, tmp_path / PROJECT)
    for path in (tmp_path / "apps").iterdir():
        path.chmod(0o644)
    stack = Stack(engine=engine, dir=tmp_path / PROJECT)
    links_before = overlay_links()
    try:
        yield stack
    finally:
        if (stack.dir / "injected.yml").exists():
            stack.compose("down", "-v", "-t", "2", timeout=180, check=False)
        engine.remove_project(PROJECT)
        for name in overlay_links() - links_before:  # a node helper that did not clean up
            run(["ip", "link", "del", name], timeout=10, check=False)


def test_the_injected_shop_on_docker(shop: Stack) -> None:
    started = time.monotonic()
    links_before = overlay_links()
    shop.inject()
    shop.compose("up", "-d", timeout=420)
    up_s = time.monotonic() - started

    # the split and payment-service's allowed callers are applied by a one-shot service
    def config_applied() -> bool:
        out = shop.engine.docker(
            "ps", "-a", "--format", "{{.Status}}",
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", "label=com.docker.compose.service=mesh-config",
        )  # fmt: skip
        assert "Exited (0" in out or "Up" in out, f"mesh-config failed: {out}"
        return "Exited (0" in out

    shop.wait("mesh-config to apply mesh.yaml", config_applied, timeout=180)

    # 1. by name, three hops: user-service → order-service (HTTP) → payment-service (gRPC)
    front = "http://user-service:8080/users/ada/orders"

    def front_answers() -> bool:
        lines, _ = shop.calls("user-service", front, 1)
        return lines[0].get("status") == 200

    shop.wait("user-service to answer through the mesh", front_answers, timeout=120, every=2)
    lines, _ = shop.calls("user-service", front, 10)
    assert [line.get("status") for line in lines] == [200] * 10, lines
    for line in lines:
        body = line["body"]
        assert isinstance(body, dict)
        assert body["orders"]["service"] == "order-service"
        assert body["orders"]["payment"]["paid"] is True  # the gRPC hop answered

    # …over mTLS: order-service's sidecar saw user-service's SPIFFE identity
    caller = f"/ns/{PROJECT}/sa/user-service"
    seen = []
    for cid in shop.sidecar_containers("order-service"):
        for text in shop.engine.docker("logs", cid, timeout=30).splitlines():
            if text.startswith("{") and '"direction":"inbound"' in text.replace(" ", ""):
                seen.append(json.loads(text).get("source_identity") or "")
    assert seen and all(s.startswith("spiffe://") and s.endswith(caller) for s in seen), seen[:5]

    # 1b. shopper has no port: its outbound-only sidecar calls user-service by name over
    #     mTLS as shopper's own identity, and registers no endpoint
    (shopper_sidecar,) = shop.sidecar_containers("shopper")

    def shopper_served() -> bool:
        logs = shop.engine.docker("logs", shop.containers("shopper")[0], timeout=30)
        return '"status": 200' in logs

    shop.wait("shopper's calls to be answered", shopper_served, timeout=120, every=2)
    shopper_id = f"/ns/{PROJECT}/sa/shopper"

    def user_service_saw_shopper() -> bool:
        (cid,) = shop.sidecar_containers("user-service")
        lines = shop.engine.docker("logs", cid, timeout=30).splitlines()
        return any(t.startswith("{") and shopper_id in t and '"inbound"' in t for t in lines)

    shop.wait("user-service's sidecar to log shopper's identity", user_service_saw_shopper,
              timeout=30, every=2)  # fmt: skip
    dump = json.loads(
        shop.engine.docker("exec", shopper_sidecar, "python3", "-c", CONFIG_DUMP, timeout=30)
    )
    assert dump["sidecar"]["outbound_only"] is True, dump["sidecar"]
    assert f"{PROJECT}/shopper" not in dump["endpoints"], sorted(dump["endpoints"])
    assert f"{PROJECT}/user-service" in dump["endpoints"], sorted(dump["endpoints"])

    # 2. payment-service allows only order-service: user-service is refused
    refused = shop.exec_in(
        "user-service", "python", "-c", GRPC_CALL, "payment-service:50051", check=False
    )
    assert "StatusCode." in refused and "paid" not in refused, refused

    # 3. plaintext to a sidecar's inbound port: no HTTP answer (it speaks mTLS only),
    #    and the app's own port is not reachable from the network at all
    (sidecar, *_) = shop.sidecar_containers("order-service")
    nets = json.loads(
        shop.engine.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", sidecar)
    )
    net, info = next(iter(nets.items()))
    probe = shop.engine.docker(
        "run", "--rm", "--network", net, "--entrypoint", "python", "meshlet:latest",
        "-c", PLAINTEXT_PROBE, info["IPAddress"],
        timeout=60,
    )  # fmt: skip
    result = json.loads(probe)
    assert result["app_port"] == "refused", result
    assert "HTTP/" not in result["inbound_reply"], result

    # 3b. a sidecar sees the bundle and the join token, never the CA's keys or admin token
    mounts = json.loads(shop.engine.docker("inspect", "-f", "{{json .Mounts}}", sidecar))
    assert [(m["Name"].rsplit("_", 1)[-1], m["Destination"], m["RW"]) for m in mounts] == [
        ("meshlet-public", "/var/lib/meshlet-public", False)
    ], mounts
    seen_files = shop.engine.docker(
        "exec", sidecar, "python", "-c", SIDECAR_FILES, timeout=30
    )  # fmt: skip
    files = json.loads(seen_files)
    assert files["public"] == ["bundle.pem", "join-token"], files
    assert files["keys"] == [], files

    # 4. three replicas of order-service v1 share the calls; the VIP stays
    vip_before = shop.exec_in("user-service", "getent", "hosts", "order-service").split()[0]
    assert vip_before.startswith("198.19."), vip_before
    compose_file = shop.dir / "docker-compose.yml"
    text = compose_file.read_text()
    marker = "      labels: {version: v1}\n"
    assert marker in text
    compose_file.write_text(text.replace(marker, marker + "      replicas: 3\n", 1))
    shop.inject()
    shop.compose("up", "-d", timeout=420)

    def three_v1_replicas() -> Counter[str] | None:
        _, summary = shop.calls("user-service", "http://order-service:8080/orders?user=bo", 30)
        v1 = [k for k in summary if k.startswith("v1/")]
        return summary if len(v1) == 3 else None

    shop.wait("calls to reach 3 replicas of order-service v1", three_v1_replicas, timeout=120)
    lines, summary = shop.calls("user-service", "http://order-service:8080/orders?user=bo", 100)
    assert [line.get("status") for line in lines] == [200] * 100, [
        line for line in lines if line.get("status") != 200
    ][:3]
    v1 = {k: n for k, n in summary.items() if k.startswith("v1/")}
    v2 = sum(n for k, n in summary.items() if k.startswith("v2/"))
    assert len(v1) == 3 and min(v1.values()) >= 10, summary  # spread over all three
    assert 1 <= v2 <= 30, summary  # the 90/10 split still holds
    vip_after = shop.exec_in("user-service", "getent", "hosts", "order-service").split()[0]
    assert vip_after == vip_before

    # 5. down -v leaves nothing: no container, network or volume; no overlay link
    shop.compose("down", "-v", "-t", "5", timeout=180)
    assert shop.engine.project_objects(PROJECT) == {"containers": [], "networks": [], "volumes": []}
    assert overlay_links() - links_before == set()
    print(f"up in {up_s:.1f} s; whole lifecycle {time.monotonic() - started:.1f} s; {summary}")


# A gRPC call to argv[1] from inside a container; prints the outcome.
GRPC_CALL = """
import os, sys
os.environ["GRPC_DNS_RESOLVER"] = "native"
import grpc
from google.protobuf import struct_pb2 as s
with grpc.insecure_channel(sys.argv[1]) as ch:
    f = ch.unary_unary("/shop.Payments/Status", request_serializer=s.Struct.SerializeToString,
                       response_deserializer=s.Struct.FromString)
    try:
        print(dict(f(s.Struct(), timeout=5).items()))
    except grpc.RpcError as e:
        print(e.code(), e.details())
"""

# From a container outside the mesh, to a sidecar's address (argv[1]): plaintext HTTP to
# the inbound port 15006, and a connect to the app's port 8080.
PLAINTEXT_PROBE = """
import json, socket, sys
ip = sys.argv[1]
out = {}
s = socket.create_connection((ip, 15006), timeout=5)
s.sendall(b"GET /orders HTTP/1.1\\r\\nHost: order-service\\r\\n\\r\\n")
try:
    out["inbound_reply"] = s.recv(4096).decode("latin-1")
except OSError as e:
    out["inbound_reply"] = repr(e)
try:
    socket.create_connection((ip, 8080), timeout=5).close()
    out["app_port"] = "open"
except ConnectionRefusedError:
    out["app_port"] = "refused"
except OSError as e:
    out["app_port"] = repr(e)
print(json.dumps(out))
"""

# Run in a sidecar: what it can list in the public dir, and every key or token file it can
# find anywhere a control plane keeps its data (the CA's and the admin token must be absent).
CONFIG_DUMP = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://127.0.0.1:15000/config_dump', timeout=5).read().decode())"
)
SIDECAR_FILES = """
import json, os
keys = []
for top in ("/var/lib/meshlet", "/var/lib/meshlet-control-plane", "/var/lib/meshlet-public"):
    for root, _, names in os.walk(top):
        keys += [os.path.join(root, n) for n in names
                 if n in ("root-key.pem", "ca-key.pem", "admin-token")]
print(json.dumps({"public": sorted(os.listdir("/var/lib/meshlet-public")), "keys": keys}))
"""
