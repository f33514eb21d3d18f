"""Process plumbing for the comparison: free ports, /proc readings (CPU seconds, RSS),
readiness waits, stopping by PID, the tools the run needs (installed with apt-get when
missing) and the versions and machine facts the results record.

For: the small I/O every part of the runner shares.
Must never: signal a process it was not handed (by PID), or wait without a deadline.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REPO = Path(__file__).resolve().parent.parent

# binary → the Debian package that brings it
TOOLS = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk"}


class BenchError(Exception):
    """A run cannot go on; the message says what is wrong and what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def http_ok(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def http_get(url: str) -> bytes:
    with _DIRECT.open(url, timeout=5) as r:
        return bytes(r.read())


def wait_until(what: str, check: Callable[[], bool], timeout: float, alive: Any = None) -> None:
    """Poll ``check`` until true; fail naming ``what`` (and the log tail of ``alive``, a
    Proc that must stay up meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive.alive:
            raise BenchError(f"{alive.name} exited while waiting for {what}:\n{alive.tail()}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            if check():
                return
        time.sleep(0.05)
    tail = f"\n{alive.tail()}" if alive is not None else ""
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Proc:
    """One child process, its output in a log file, stopped by its PID."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.args, self.log, self.env = name, args, log, env
        self.popen = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )

    def restart(self) -> None:
        """Stop it (by PID) and start a fresh process with the same arguments."""
        self.stop()
        self.popen = self._spawn()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it) for thousands of idle connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_tools() -> dict[str, str]:
    """The binaries the comparison drives; missing ones are installed with apt-get."""
    missing = [TOOLS[t] for t in TOOLS if find_tool(t) is None]
    if missing:
        cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", *missing]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(
                f"the comparison needs {', '.join(missing)}; install them with "
                f"`sudo apt-get install -y {' '.join(missing)}` and run `make bench` again"
            )
        print(f"bench: installing {' '.join(missing)} (apt-get install -y)", flush=True)
        done = subprocess.run(
            cmd,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if done.returncode != 0:
            raise BenchError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}); install "
                f"{', '.join(missing)} by hand and run `make bench` again:\n{done.stderr[-1500:]}"
            )
    found = {t: find_tool(t) for t in TOOLS}
    absent = [t for t, p in found.items() if p is None]
    if absent:
        raise BenchError(f"{', '.join(absent)} still not found after installing")
    return {t: str(p) for t, p in found.items()}


def _first_line(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_info(tools: dict[str, str]) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    haproxy = _first_line([tools["haproxy"], "-v"])
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
        "versions": {
            "python": sys.version.split()[0],
            "openssl": ssl.OPENSSL_VERSION,
            "haproxy": re.sub(r" - https?://\S+", "", haproxy),
            "nginx": _first_line([tools["nginx"], "-v"]),
            "wrk": _first_line([tools["wrk"], "-v"]).split(" Copyright")[0],
            "uvloop": _pkg_version("uvloop"),
            "grpcio": _pkg_version("grpcio"),
            "meshlet": f"{rev}{' (with uncommitted changes)' if dirty else ''}",
        },
    }
