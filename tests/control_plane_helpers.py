"""Run the real control-plane process for integration tests, and talk to its admin API.

``ControlPlaneProcess(data_dir).start()`` runs ``python -m meshlet control-plane run``
on 127.0.0.1 port 0, waits for DATA_DIR/control-plane.json (written by this very PID)
and for /readyz; ``stop()`` sends SIGTERM and returns the exit code; ``kill()`` is the
bounded cleanup every fixture finalizer calls. ``call()`` is plain urllib, independent
of the CLI's client, so the server is checked on its own terms.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any, NamedTuple

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Answer(NamedTuple):
    status: int
    headers: Message
    data: Any

    @property
    def index(self) -> int:
        return int(self.headers["X-Mesh-Index"])


def call(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    timeout: float = 10.0,
) -> Answer:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with _DIRECT.open(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as e:
        with e:
            raw, status, hdrs = e.read(), e.code, e.headers
    return Answer(status, hdrs, json.loads(raw) if raw else None)


class ControlPlaneProcess:
    def __init__(self, data_dir: Path, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.stderr_path = data_dir.parent / f"{data_dir.name}-stderr.log"
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://{self.info['api']}"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def token_file(self) -> Path:
        return self.data_dir / "admin-token"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def start(self) -> ControlPlaneProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshlet",
                    "control-plane",
                    "run",
                    "--data-dir",
                    str(self.data_dir),
                    "--api",
                    "127.0.0.1:0",
                    "--grpc",
                    "127.0.0.1:0",
                    "--grpc-mtls",
                    "127.0.0.1:0",
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        info_path = self.data_dir / "control-plane.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"control plane exited with {self.proc.returncode} before serving:\n"
                    + self.stderr()[-3000:]
                )
            with contextlib.suppress(FileNotFoundError, ValueError):
                info = json.loads(info_path.read_text())
                if info.get("pid") == self.proc.pid:  # not a file left by a killed process
                    self.info = info
                    with contextlib.suppress(OSError):
                        if call(self.base, "GET", "/readyz", timeout=2).status == 200:
                            return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(
            f"control plane not ready in {START_TIMEOUT_S}s:\n{self.stderr()[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Signal the process and return its exit code (it must exit within ``timeout``)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"control plane ignored signal {sig} for {timeout}s") from None

    def kill(self) -> None:
        """Finalizer: SIGKILL by PID if still running, with a bounded wait."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Answer:
        kwargs.setdefault("token", self.token)
        return call(self.base, method, path, body, **kwargs)

    def revision(self) -> int:
        return self.call("GET", "/v1/services").index
