"""Everything the comparison runs against, started once and left idle between runs:

- the apps: ``bench.backends`` (bulk, echo, gRPC) and nginx (its own config in the run's
  temp dir, on 127.0.0.1);
- meshlet: a control plane, one inbound sidecar per path (explicit mode, ``--app-protocol``
  as the path declares) and one outbound sidecar ``bench/client`` with an explicit
  upstream per path; mutual TLS between the sidecars, metrics and access logs on;
- HAProxy: the outbound and inbound hops from bench/haproxy/*.cfg.

``port(variant, path)`` is where a client dials; ``proxy_pids(variant, path)`` are the
processes whose CPU is that variant's proxy cost (both hops).

For: starting, checking and stopping that topology on 127.0.0.1.
Must never: leave a process behind (everything is stopped by PID in ``close``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import haproxy_config, haproxy_run
from bench.control_plane_suite import ControlPlaneProcess
from bench.procs import (
    BenchError,
    Proc,
    free_port,
    http_get,
    http_ok,
    port_open,
    wait_until,
)
from bench.workloads import PATHS

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type text/html;
    client_body_temp_path {tmp}/nginx-body;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location / {{ index index.html; }}
    }}
}}
"""
# The sidecar's breaker defaults to Envoy's 1,024 connections; the idle-connection
# workload holds 5,000, so both proxies get the same ceiling (HAProxy: maxconn 8000).
BREAKER = {"max_connections": 8000, "max_pending": 8000, "max_requests": 8000}
# A page the size of nginx's welcome page.
PAGE = (
    b"<!DOCTYPE html><html><head><title>bench</title></head><body>"
    + b"x" * 540
    + b"</body></html>\n"
)


class Topology:
    def __init__(self, tmp: Path, tools: dict[str, str]) -> None:
        self.tmp = tmp
        self.tools = tools
        self.procs: list[Proc] = []
        self.cp: ControlPlaneProcess | None = None
        self.app_ports: dict[str, int] = {}  # app name → port
        self.mesh_local: dict[str, int] = {}  # path → the client sidecar's local port
        self.inbound: dict[str, Proc] = {}  # path → its inbound sidecar
        self.client_sidecar: Proc | None = None
        self.client_admin = 0
        self.admins: dict[str, int] = {}  # path → its inbound sidecar's admin port
        self.haproxy: dict[str, Proc] = {}
        self.ha_env: dict[str, str] = {}

    # ---- where to dial, and whose CPU counts ----------------------------------------

    def port(self, variant: str, path: str) -> int:
        app = next(p.app for p in PATHS if p.name == path)
        if variant == "direct":
            return self.app_ports[app]
        if variant == "meshlet":
            return self.mesh_local[path]
        if variant == "haproxy":
            return int(self.ha_env[haproxy_config.env_name("outbound", path)])
        raise ValueError(variant)

    def proxies(self, variant: str, path: str) -> list[Proc]:
        if variant == "meshlet":
            assert self.client_sidecar is not None
            return [self.client_sidecar, self.inbound[path]]
        if variant == "haproxy":
            return [self.haproxy["outbound"], self.haproxy["inbound"]]
        return []

    def restart(self, variant: str, path: str) -> None:
        """Fresh processes for both hops of ``variant`` on ``path``, ready for traffic:
        each memory round starts from them, as the first does."""
        for proc in self.proxies(variant, path):
            proc.restart()
        if variant == "meshlet":
            self._wait_sidecars([path, "client"])
            return
        for hop in haproxy_config.HOPS:
            port = int(self.ha_env[haproxy_config.env_name(hop, path)])
            wait_until(f"HAProxy {hop} on {port}", functools.partial(port_open, port), 30)

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive:
                raise BenchError(f"{p.name} exited (code {p.popen.returncode}):\n{p.tail()}")

    # ---- start ------------------------------------------------------------------------

    def start(self) -> None:
        wait_apps = self._apps()  # the apps boot while the proxies start
        self._haproxy()
        self._meshlet(wait_apps)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, self.tmp / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def _apps(self) -> Callable[[], None]:
        for app in ("bulk", "echo", "grpc", "nginx"):
            self.app_ports[app] = free_port()
        backends = self._spawn(
            "backends",
            [
                sys.executable,
                "-m",
                "bench.backends",
                *(str(self.app_ports[a]) for a in ("bulk", "echo", "grpc")),
            ],
        )
        www = self.tmp / "www"
        www.mkdir()
        (www / "index.html").write_bytes(PAGE)
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=self.tmp,
                port=self.app_ports["nginx"],
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        nginx = self._spawn(
            "nginx",
            [
                self.tools["nginx"],
                "-p",
                str(self.tmp),
                "-c",
                str(conf),
                "-e",
                str(self.tmp / "nginx-error.log"),
            ],
        )

        def wait() -> None:
            wait_until("the bench apps", lambda: "ready" in backends.tail(), 60, backends)
            wait_until("nginx", lambda: port_open(self.app_ports["nginx"]), 30, nginx)

        return wait

    def _haproxy(self) -> None:
        certs = self.tmp / "haproxy-certs"
        haproxy_run.write_certs(certs)
        cfgs = haproxy_run.write_configs()
        env = {haproxy_config.CERTS_ENV: str(certs)}
        for p in PATHS:
            env[haproxy_config.env_name("outbound", p.name)] = str(free_port())
            env[haproxy_config.env_name("inbound", p.name)] = str(free_port())
            env[haproxy_config.env_name("app", p.name)] = str(self.app_ports[p.app])
        self.ha_env = env
        for hop in haproxy_config.HOPS:
            haproxy_run.check(self.tools["haproxy"], cfgs[hop], env)
        for hop in haproxy_config.HOPS:
            proc = Proc(
                f"haproxy-{hop}",
                [self.tools["haproxy"], "-db", "-f", str(cfgs[hop])],
                self.tmp / f"haproxy-{hop}.log",
                {**os.environ, **env},
            )
            self.procs.append(proc)
            self.haproxy[hop] = proc
        for p in PATHS:
            for hop in haproxy_config.HOPS:
                port = int(env[haproxy_config.env_name(hop, p.name)])
                wait_until(f"HAProxy {hop} on {port}", functools.partial(port_open, port), 30)

    def _meshlet(self, wait_apps: Callable[[], None]) -> None:
        cp = ControlPlaneProcess(self.tmp / "cp")
        self.cp = cp.__enter__()
        auth = {"Authorization": f"Bearer {cp.token}", "Content-Type": "application/json"}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def put(service: str, ports: list[dict[str, object]]) -> None:
            body = {"ports": ports, "policy": {"circuit_breaker": BREAKER}}
            req = urllib.request.Request(
                f"{cp.api}/v1/services/bench/{service}",
                data=json.dumps(body).encode(),
                headers=auth,
                method="PUT",
            )
            with opener.open(req, timeout=10) as r:
                if r.status not in (200, 201):
                    raise BenchError(f"PUT service bench/{service}: {r.status}")

        for p in PATHS:
            put(p.name, [{"port": p.mesh_port, "protocol": p.mesh_protocol}])
        put("client", [{"port": 80}])
        admins = self.admins
        for p in PATHS:
            app_protocol = {"tcp": "tcp", "http": "http", "grpc": "grpc"}[p.mesh_protocol]
            proc, admins[p.name] = self._sidecar(
                p.name, self.app_ports[p.app], ["--app-protocol", app_protocol]
            )
            self.inbound[p.name] = proc
        upstreams: list[str] = []
        for p in PATHS:
            self.mesh_local[p.name] = free_port()
            upstreams += [
                "--upstream",
                f"bench/{p.name}:{p.mesh_port}=127.0.0.1:{self.mesh_local[p.name]}",
            ]
        self.client_sidecar, self.client_admin = self._sidecar(
            "client", self.app_ports["echo"], upstreams
        )
        wait_apps()
        self._wait_sidecars([*self.inbound, "client"])

    def _wait_sidecars(self, names: list[str]) -> None:
        """``names`` (paths, or "client") ready, and the client sidecar knowing every
        path's endpoint."""
        for name in names:
            proc = self.client_sidecar if name == "client" else self.inbound[name]
            admin = self.client_admin if name == "client" else self.admins[name]
            assert proc is not None
            wait_until(
                f"sidecar bench/{name} ready",
                functools.partial(http_ok, f"http://127.0.0.1:{admin}/ready"),
                90,
                proc,
            )

        def knows_all() -> bool:
            raw = http_get(f"http://127.0.0.1:{self.client_admin}/clusters")
            have = {c["service"] for c in json.loads(raw)["clusters"] if c["endpoints"]}
            return all(f"bench/{p.name}" in have for p in PATHS)

        wait_until("the client sidecar to know every path's endpoint", knows_all, 60)

    def _sidecar(self, name: str, app_port: int, extra: list[str]) -> tuple[Proc, int]:
        assert self.cp is not None
        cp = self.cp
        admin = free_port()
        args = [
            sys.executable,
            "-m",
            "meshlet",
            "sidecar",
            "run",
            "--service",
            f"bench/{name}",
            "--control-plane",
            cp.grpc,
            "--control-plane-mtls",
            cp.grpc_mtls,
            "--ca-bundle",
            str(cp.data_dir / "ca" / "bundle.pem"),
            "--join-token",
            str(cp.data_dir / "join-token"),
            "--cert-dir",
            str(self.tmp / f"sidecar-certs-{name}"),
            "--app-port",
            str(app_port),
            "--mode",
            "explicit",
            "--admin",
            f"127.0.0.1:{admin}",
            "--inbound",
            f"127.0.0.1:{free_port()}",
            "--address",
            "127.0.0.1",
            "--endpoint-id",
            f"bench-{name}",
            "--access-log",
            str(self.tmp / f"access-{name}.log"),
            "--log-level",
            "warning",
            *extra,
        ]
        return self._spawn(f"sidecar-{name}", args), admin

    # ---- stop -------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.cp is not None:
            self.cp.__exit__(None, None, None)
            self.cp = None
