"""Run real sidecars and tiny apps for tests: processes on 127.0.0.x, killed by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from control_plane_helpers import ControlPlaneProcess

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, timeout: float = 3.0) -> int:
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with _DIRECT.open(req, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


ECHO_APP = textwrap.dedent(
    """
    import asyncio, sys
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    async def handle(reader, writer):
        print("conn", flush=True)
        writer.write(f"hello from {name}\\n".encode())
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
    async def main():
        server = await asyncio.start_server(handle, host, port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())
    """
)


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def echo_app(name: str, host: str, port: int, tmp: Path) -> Proc:
    app = Proc(
        [sys.executable, "-c", ECHO_APP, name, host, str(port)], tmp / f"app-{name}.log"
    ).start()
    deadline = time.monotonic() + 10
    while "ready" not in app.output():
        assert app.alive and time.monotonic() < deadline, app.output()
        time.sleep(0.02)
    return app


class Sidecar(Proc):
    def __init__(
        self,
        cp: ControlPlaneProcess,
        tmp: Path,
        service: str,
        app_port: int | None,  # None: outbound only (no --app-port)
        *,
        address: str = "127.0.0.1",
        extra: tuple[str, ...] = (),
        name: str = "",
        protocol: str | None = None,
    ) -> None:
        self.name = name or f"{service.replace('/', '-')}-{address}"
        if protocol is not None:  # the app's port, declared (default: detected)
            extra = (*extra, "--app-protocol", protocol)
        self.admin_port = free_port()
        self.inbound_port = free_port(address)
        self.address = address
        self.cert_dir = tmp / f"certs-{self.name}"
        self.cp, self.service, self.app_port, self.extra = cp, service, app_port, extra
        super().__init__([], tmp / f"sidecar-{self.name}.log")

    def start(self) -> Sidecar:
        cp = self.cp
        self.args = [
            sys.executable,
            "-m",
            "meshlet",
            "sidecar",
            "run",
            "--service",
            self.service,
            "--control-plane",
            cp.info["grpc"],
            "--control-plane-mtls",
            cp.info["grpc_mtls"],
            "--ca-bundle",
            str(cp.data_dir / "ca" / "bundle.pem"),
            "--join-token",
            str(cp.data_dir / "join-token"),
            "--cert-dir",
            str(self.cert_dir),
            *(() if self.app_port is None else ("--app-port", str(self.app_port))),
            "--mode",
            "explicit",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
            "--inbound",
            f"{self.address}:{self.inbound_port}",
            "--address",
            self.address,
            "--endpoint-id",
            self.name,
            "--drain-timeout",
            "3s",
            *self.extra,
        ]
        super().start()
        return self

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 30.0) -> Sidecar:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.alive, f"sidecar {self.name} exited:\n{self.output()[-3000:]}"
            with contextlib.suppress(OSError):
                last = http_get(self.admin + "/ready", timeout=2)
                if last[0] == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"sidecar {self.name} not ready: {last}\n{self.output()[-3000:]}")

    def json(self, path: str) -> Any:
        status, body = http_get(self.admin + path)
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> str:
        return http_get(self.admin + "/stats/prometheus")[1].decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric_name == name and got == want:
            return float(value)
    return 0.0


def exchange(
    port: int, payload: bytes = b"ping\n", host: str = "127.0.0.1", timeout: float = 5.0
) -> tuple[str, bytes]:
    """Connect through a local upstream port; return (greeting, echo of payload)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        rest = f.read()
    return greeting, rest
