"""`make bench BENCH_ARGS=--lab`: the comparison's workloads across the lab's VXLAN
overlay, client in a container on node 1, server in a container on node 2, three variants
interleaved:

- ``direct``: the client and the apps on 127.0.0.1 inside the plain client container (the
  loopback reference, no overlay);
- ``direct-overlay``: a plain client container (no sidecar, no interception) dialling a
  plain server container's overlay address: veth → bridge → VXLAN → underlay → VXLAN →
  bridge → veth, no proxy;
- ``meshlet-overlay``: the app (uid 65534) dials the service's VIP; nft redirects it to the
  transparent outbound sidecar (SO_ORIGINAL_DST), which speaks mutual TLS across the
  overlay to the server container's inbound sidecar; metrics and access logs on.

The lab is built by `meshlet lab up --scenario bench` (its own prefix and run directory:
underlay, control plane, node helpers, the bench's services and VIPs); the containers are
built here with the lab's own recorded building blocks (``Lab.make_netns``, `meshlet node
attach`, `meshlet sidecar init`, ``Lab.spawn``), so `meshlet lab down` removes them too.
The load generators run in one process per client container (entered with setns, then
uid 65534 in the meshed one, so its connections are captured); wrk runs there via
``ip netns exec``. Proxy CPU is read from /proc/PID/stat of both sidecars, as the
loopback harness does.

For: measuring and returning the lab results document (``bench.lab_report`` renders it).
Must never: leave the lab up (``lab down`` in every way out, bounded in time), or send
traffic anywhere but loopback and the lab's own namespaces.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs
from bench.clients import MiB
from bench.lab_clients import NOBODY, NetnsWorker
from bench.runner import interleaved_runs
from bench.stats import parse_wrk, vcpu_per_krps_per_hop
from bench.topology import NGINX_CONF, PAGE
from bench.workloads import PATH_BY_NAME, WORKLOADS, Sizes, Workload
from meshlet.errors import MeshError
from node import lab_netns as nsio
from node import lab_state
from node.lab import Lab, meshlet_argv, wait_until
from node.lab_containers import _attached, intercept, sidecar_argv, sidecar_ready, start_sidecar
from node.lab_scenario import BENCH, SIDECAR_ADMIN_PORT, Layout, ServiceSpec

PREFIX = "mlt-blab"
RUN_DIR = Path("/run/meshlet/bench-lab")
UNDERLAY = "198.18.40.0/24"
VARIANTS = ("direct", "direct-overlay", "meshlet-overlay")
HOPS = 2
PATHS = ("bulk", "echo", "http", "httpl4", "grpc")
WORKLOAD_IDS = tuple(w.id for w in WORKLOADS if w.path in PATHS)
LAB_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 180.0
Say = Callable[[str], None]


# ---- the lab and its containers ------------------------------------------------------


def _lab_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    argv = meshlet_argv("lab", *args, "--run-dir", str(RUN_DIR))
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise procs.BenchError(f"`meshlet lab {args[0]}` took over {timeout:.0f} s") from e


def lab_down(say: Say, *, keep_logs: bool = False) -> None:
    """The lab's own `down`, bounded; says (never raises) what it left."""
    if not RUN_DIR.exists():
        return
    try:
        done = _lab_cli("down", *(["--keep-logs"] if keep_logs else []), timeout=DOWN_TIMEOUT_S)
    except procs.BenchError as e:
        say(f"   lab down: {e}; run `meshlet lab down --run-dir {RUN_DIR}`")
        return
    last = (done.stdout + done.stderr).strip().splitlines()
    say(f"   lab down: {last[-1] if last else done.returncode}")


@dataclasses.dataclass(slots=True, kw_only=True)
class Box:
    """One bench container: its namespace, overlay address and sidecar (if meshed)."""

    name: str
    netns: str
    node: str
    address: str
    mtu: int
    sidecar: int | None = None  # PID
    apps: list[int] = dataclasses.field(default_factory=list)


def _box(lab: Lab, layout: Layout, name: str, node: str, spec: ServiceSpec | None) -> Box:
    """A namespace attached to ``node``'s overlay; with ``spec``: interception and a
    transparent sidecar for that service (as `meshlet lab up` builds a replica)."""
    netns = f"{layout.prefix}-{name}"
    lab.make_netns(netns, f"bench container {name}")
    node_netns = layout.node_netns(node)
    attach = meshlet_argv(
        "node", "attach", "--netns", netns, "--service", spec.key if spec else f"bench/{name}",
        "--state-dir", str(lab.node_state), "--name", node, "--json",
    )  # fmt: skip
    out = nsio.check(nsio.run(node_netns, attach), f"attaching {netns} to {node}")
    attached = _attached(out, netns)
    host_if, container_if = str(attached.get("host_interface")), str(attached.get("interface"))
    lab.journal.add(
        "link", lab_state.link_id(node_netns, host_if), netns=node_netns, name=host_if,
        peer=f"{container_if} in {netns}",
    )  # fmt: skip
    address = str(attached["address"])
    box = Box(name=name, netns=netns, node=node, address=address, mtu=int(attached["mtu"]))
    if spec is not None:
        intercept(lab, netns)
        argv = sidecar_argv(lab, layout, spec, name, node, address)
        argv += ["--log-level", "warning"]
        box.sidecar = start_sidecar(lab, netns, name, argv).pid
    return box


def _apps(lab: Lab, box: Box, host: str, paths: tuple[str, ...]) -> None:
    """The bench's servers for ``paths`` in ``box``, listening on ``host``."""
    env = nsio.clean_env({"PYTHONPATH": str(procs.REPO)})
    port = {p: PATH_BY_NAME[p].mesh_port for p in paths}
    ports = [str(port.get(p, 0)) for p in ("bulk", "echo", "grpc")]
    if any(p != "0" for p in ports):
        argv = [sys.executable, "-m", "bench.lab_backends", host, *ports]
        box.apps.append(lab.spawn(f"app-{box.name}", "app", box.netns, argv, env=env).pid)
    web = [port[p] for p in ("http", "httpl4") if p in paths]  # nginx: per request, or as TCP
    if web:
        tmp = lab.run_dir / "bench" / box.name
        lab.make_dir(tmp.parent)
        lab.make_dir(tmp)
        (tmp / "www").mkdir(exist_ok=True)
        (tmp / "www" / "index.html").write_bytes(PAGE)
        conf = NGINX_CONF.format(tmp=tmp, port=web[0], user="user root;")
        listen = "".join(f"        listen {host}:{p} backlog=4096;\n" for p in web)
        conf = conf.replace(f"        listen 127.0.0.1:{web[0]} backlog=4096;\n", listen)
        if listen not in conf:  # NGINX_CONF changed shape: fail here, not with a wrong bench
            raise procs.BenchError("bench.topology.NGINX_CONF has no listen line to replace")
        (tmp / "nginx.conf").write_text(conf)
        nginx = procs.find_tool("nginx") or "nginx"
        argv = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "err.log")]
        box.apps.append(lab.spawn(f"nginx-{box.name}", "app", box.netns, argv).pid)


@dataclasses.dataclass(slots=True, kw_only=True)
class Bench:
    """The built lab: where each variant's client runs and dials, and whose CPU counts."""

    tools: dict[str, str]
    boxes: dict[str, Box]
    vips: dict[str, str]  # path → VIP
    direct: NetnsWorker
    mesh: NetnsWorker

    def target(self, variant: str, path: str) -> tuple[NetnsWorker, Box, str, int | None]:
        """The worker, the client's container, the host it dials and the uid it runs as."""
        if variant == "direct":
            return self.direct, self.boxes["cli-direct"], "127.0.0.1", None
        if variant == "direct-overlay":
            return self.direct, self.boxes["cli-direct"], self.boxes["srv-direct"].address, None
        if variant == "meshlet-overlay":
            return self.mesh, self.boxes["cli-mesh"], self.vips[path], NOBODY
        raise ValueError(variant)

    def proxies(self, variant: str, path: str) -> list[int]:
        if variant != "meshlet-overlay":
            return []
        return [p for p in (self.boxes["cli-mesh"].sidecar, self.boxes[f"srv-{path}"].sidecar) if p]

    def check_alive(self) -> None:
        for box in self.boxes.values():
            for pid in [*box.apps, *([box.sidecar] if box.sidecar else [])]:
                if not Path(f"/proc/{pid}").exists():
                    raise procs.BenchError(
                        f"a process of bench container {box.name} (PID {pid}) exited; "
                        f"logs in {RUN_DIR / 'logs'} (kept until the lab is taken down)"
                    )


def _clusters_ready(netns: str) -> bool | None:
    try:
        status, raw = nsio.request(
            netns, "127.0.0.1", SIDECAR_ADMIN_PORT, "GET", "/clusters", timeout=3
        )
    except OSError:
        return None
    if status != 200:
        return None
    have = {c["service"] for c in json.loads(raw)["clusters"] if c["endpoints"]}
    return True if all(f"bench/{p}" in have for p in PATHS) else None


def build(lab: Lab, tools: dict[str, str], say: Say) -> Bench:
    layout = lab.layout()
    node1, node2 = layout.node_names[0], layout.node_names[1]
    specs = {s.name: s for s in BENCH.services}
    vips = {str(e["name"]): str(e["vip"]) for e in lab.state().of_kind("service") if e.get("vip")}
    boxes: dict[str, Box] = {}
    with lab.changing("bench"):
        lab.netns_etc_root()
        for p in PATHS:
            boxes[f"srv-{p}"] = _box(lab, layout, f"srv-{p}", node2, specs[p])
            _apps(lab, boxes[f"srv-{p}"], "127.0.0.1", (p,))
        boxes["srv-direct"] = _box(lab, layout, "srv-direct", node2, None)
        _apps(lab, boxes["srv-direct"], "0.0.0.0", PATHS)
        boxes["cli-mesh"] = _box(lab, layout, "cli-mesh", node1, specs["client"])
        _apps(lab, boxes["cli-mesh"], "127.0.0.1", ("echo",))  # the client's own app
        boxes["cli-direct"] = _box(lab, layout, "cli-direct", node1, None)
        _apps(lab, boxes["cli-direct"], "127.0.0.1", PATHS)  # the loopback reference
    direct = NetnsWorker(boxes["cli-direct"].netns, None)
    mesh = NetnsWorker(boxes["cli-mesh"].netns, NOBODY)
    bench = Bench(tools=tools, boxes=boxes, vips=vips, direct=direct, mesh=mesh)
    try:
        for p in PATHS:
            port = PATH_BY_NAME[p].mesh_port
            for host in ("127.0.0.1", boxes["srv-direct"].address):
                direct.call("wait_port", host, timeout=90, port=port, timeout_s=60)
        for box in boxes.values():
            if box.sidecar:
                wait_until(
                    functools.partial(sidecar_ready, box.netns),
                    timeout=90,
                    what=f"the sidecar of bench container {box.name} becoming ready",
                    interval=0.25,
                )
        wait_until(
            lambda: _clusters_ready(boxes["cli-mesh"].netns),
            timeout=60,
            what="the client sidecar learning every bench service's endpoint",
            interval=0.25,
        )
    except BaseException:
        direct.close()
        mesh.close()
        raise
    return bench


# ---- the runs ------------------------------------------------------------------------


def run_once(bench: Bench, wl: Workload, variant: str, sizes: Sizes) -> dict[str, float]:
    """One run of one workload against one variant, with both sidecars' CPU."""
    path = PATH_BY_NAME[wl.path]
    worker, box, host, uid = bench.target(variant, wl.path)
    port = path.mesh_port  # every app listens on its service's port
    proxies = bench.proxies(variant, wl.path)
    cpu0 = [procs.cpu_s(p) for p in proxies]
    t0 = time.perf_counter()
    if wl.kind == "bulk":
        fig = worker.call("bulk", host, port=port, nbytes=sizes.bulk_mib * MiB)
    elif wl.kind == "pingpong":
        fig = worker.call("pingpong", host, port=port, rounds=sizes.pingpong_rounds)
    elif wl.kind == "churn":
        fig = worker.call(
            "churn", host, port=port, seconds=sizes.seconds, concurrency=wl.connections
        )
    elif wl.kind == "grpc":
        fig = worker.call(
            "grpc", host, port=port, seconds=sizes.seconds, concurrency=wl.connections
        )
    elif wl.kind == "wrk":
        fig = _wrk(bench.tools["wrk"], box.netns, uid, f"http://{host}:{port}/", wl, sizes)
    else:
        raise ValueError(wl.kind)
    wall = time.perf_counter() - t0
    bench.check_alive()
    if proxies:
        cpu = sum(procs.cpu_s(p) - c for p, c in zip(proxies, cpu0, strict=True))
        fig["proxy_cpu_s"] = cpu
        fig["proxy_vcpu"] = cpu / wall
        if wl.kind == "bulk":
            fig["proxy_cpu_s_per_gb"] = cpu / (2 * sizes.bulk_mib * MiB / 1e9)
        else:
            fig["vcpu_per_krps_per_hop"] = vcpu_per_krps_per_hop(
                cpu, wall, fig.get("requests", 0.0), HOPS
            )
    fig["wall_s"] = wall
    return fig


def _wrk(
    wrk: str, netns: str, uid: int | None, url: str, wl: Workload, sizes: Sizes
) -> dict[str, float]:
    threads = 1 if wl.connections == 1 else 2
    argv = [wrk, f"-t{threads}", f"-c{wl.connections}", f"-d{max(1, round(sizes.seconds))}s"]
    argv += ["--timeout", "10s", "--latency", url]
    done = subprocess.run(
        nsio.netns_argv(netns, argv, uid),
        capture_output=True,
        text=True,
        timeout=sizes.seconds + 60,
        check=False,
        env=nsio.clean_env(),
        cwd="/",
    )
    if done.returncode != 0:
        raise procs.BenchError(
            f"wrk in {netns} failed ({done.returncode}): {done.stderr or done.stdout}"
        )
    return parse_wrk(done.stdout)


def run_workload(bench: Bench, wl: Workload, sizes: Sizes, say: Say) -> dict[str, Any]:
    return interleaved_runs(
        wl, VARIANTS, sizes, lambda variant, sz: run_once(bench, wl, variant, sz), say
    )


def _say(text: str) -> None:
    print(text, flush=True)


def run(
    sizes: Sizes, *, quick: bool, only: tuple[str, ...] = (), say: Say = _say
) -> dict[str, Any]:
    """Up, build, measure, down — the lab is taken down in every way out."""
    if os.geteuid() != 0:
        raise procs.BenchError("--lab needs root (the lab creates network namespaces): use sudo")
    unknown = [w for w in only if w not in WORKLOAD_IDS]
    if unknown:
        raise procs.BenchError(
            f"--workload {', '.join(unknown)}: not run across the lab (it runs "
            f"{', '.join(WORKLOAD_IDS)})"
        )
    tools = procs.ensure_tools()
    nofile = procs.raise_nofile()
    info = procs.machine_info(tools)
    selected = [w for w in WORKLOADS if w.id in WORKLOAD_IDS and (not only or w.id in only)]
    phases: dict[str, float] = {}
    notes: list[str] = []
    if quick:
        notes.append(
            f"--quick: bulk {sizes.bulk_mib} MiB each way (not 1 GiB), {sizes.seconds:g} s "
            f"per wrk/gRPC/churn run, {sizes.pingpong_rounds} ping-pong rounds"
        )
    results: dict[str, Any] = {
        "lab": True,
        "quick": quick,
        "machine": info,
        "sizes": dataclasses.asdict(sizes),
        "variants": list(VARIANTS),
        "hops": HOPS,
        "rlimit_nofile": nofile,
        "notes": notes,
        "phases_s": phases,
        "workloads": [],
    }
    say(
        f"== across the lab's overlay: {', '.join(VARIANTS)}; {sizes.runs} runs each, "
        f"interleaved; load average {info['loadavg_start'][0]:.2f} on {info['cores']} cores"
    )
    lab_down(say)  # a lab left by an earlier, killed run of this very bench
    bench: Bench | None = None
    finished = False
    try:
        t0 = time.perf_counter()
        done = _lab_cli(
            "up", "--nodes", "2", "--scenario", "bench", "--prefix", PREFIX,
            "--underlay", UNDERLAY, timeout=LAB_TIMEOUT_S,
        )  # fmt: skip
        if done.returncode != 0:
            raise procs.BenchError(
                f"`meshlet lab up --scenario bench` failed: {done.stderr.strip()}"
            )
        lab = Lab(RUN_DIR)
        bench = build(lab, tools, say)
        phases["start"] = time.perf_counter() - t0
        layout = lab.layout()
        results["lab_info"] = {
            "prefix": layout.prefix,
            "nodes": layout.nodes,
            "underlay": layout.underlay,
            "vips": bench.vips,
            "containers": {
                b.name: {"node": b.node, "address": b.address, "meshed": b.sidecar is not None}
                for b in bench.boxes.values()
            },
            "overlay_mtu": bench.boxes["cli-mesh"].mtu,
        }
        say(
            f"   lab up with {len(bench.boxes)} bench containers in {phases['start']:.1f} s "
            f"(overlay MTU {bench.boxes['cli-mesh'].mtu})"
        )
        for wl in selected:
            t1 = time.perf_counter()
            results["workloads"].append(run_workload(bench, wl, sizes, say))
            phases[wl.id] = time.perf_counter() - t1
        finished = True
    except MeshError as e:  # the lab's own errors (a sidecar never ready, a failed attach)
        raise procs.BenchError(f"--lab: {e} (logs: {RUN_DIR / 'logs'})") from e
    finally:
        if bench is not None:
            bench.direct.close()
            bench.mesh.close()
        t2 = time.perf_counter()
        lab_down(say, keep_logs=not finished)  # a failed run keeps RUN_DIR/logs for a look
        phases["down"] = time.perf_counter() - t2
    info["loadavg_end"] = os.getloadavg()
    say("   seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    return results
