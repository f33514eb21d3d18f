"""A small network lab made of Linux network namespaces, for tests that need a real kernel.

``Lab.create(["cp", "web", ...])`` builds a "switch" namespace holding a bridge (the
gateway, 198.18.10.1/24 by default) and one namespace per host, each joined to the bridge
by a veth pair (``eth0`` inside, 198.18.10.2, .3, ... in the order given), with ``lo`` up
and a default route via the gateway. Everything is created *inside* namespaces this lab
made (the veth pairs are born in the switch namespace with their peer already in the
host's), so the machine's own network and nftables are never touched. Namespace names
are ``mlt-<random>-<host>``.

``run`` / ``spawn`` execute commands inside a host (``ip netns exec``), optionally as an
unprivileged uid via ``setpriv``; ``http`` / ``wait_http`` speak HTTP from inside one
(nothing outside the lab can reach its addresses); ``etc_file`` writes
``/etc/netns/<ns>/<name>``, which ``ip netns exec`` bind-mounts over ``/etc/<name>`` (the
clean way to give a namespace its own resolv.conf). ``destroy`` kills what was spawned,
by PID, then anything else still inside the lab's namespaces, deletes the namespaces and
the /etc/netns files, and is safe to call twice. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "mlt-"
NOBODY = 65534
NETNS_ETC = Path("/etc/netns")
# Scripts that run as an unprivileged uid use the system interpreter: the venv's may sit
# under a directory only root can enter.
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
COMMAND_TIMEOUT_S = 20.0


def have_netns_tools() -> bool:
    """Root, and the binaries the lab needs."""
    return os.geteuid() == 0 and all(shutil.which(b) for b in ("ip", "setpriv"))


def netns_names() -> set[str]:
    """Every named network namespace on the machine (``ip netns list``)."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and done.returncode != 0:
        raise AssertionError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr}")
    return done


def as_uid(uid: int | None) -> list[str]:
    """The ``setpriv`` prefix that runs a command as ``uid`` (and its gid), no groups."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@dataclass(frozen=True, slots=True)
class Host:
    name: str  # the role, e.g. "web"
    netns: str  # the namespace, e.g. "mlt-1a2b3c-web"
    address: str  # its underlay address on eth0


@dataclass
class NsProcess:
    """A process started inside a namespace; ``ip netns exec`` and ``setpriv`` exec, so
    ``pid`` is the command's own PID."""

    name: str
    host: Host
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if not self.alive:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} in {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]


# Runs inside a namespace: one HTTP request, or polling until an expected status.
# argv: METHOD URL BODY_JSON_OR_EMPTY TOKEN_OR_EMPTY WANT_STATUS_OR_0 TIMEOUT_S
_HTTP = r"""
import json, sys, time, urllib.error, urllib.request
method, url, body, token, want, limit = sys.argv[1:7]
want, limit = int(want), float(limit)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
headers = {"Content-Type": "application/json"} if body else {}
if token:
    headers["Authorization"] = "Bearer " + token
deadline = time.monotonic() + limit
last = None
while True:
    req = urllib.request.Request(url, data=body.encode() or None, headers=headers, method=method)
    try:
        with opener.open(req, timeout=max(0.5, min(3.0, deadline - time.monotonic()))) as r:
            last = (r.status, r.read())
    except urllib.error.HTTPError as e:
        last = (e.code, e.read())
    except OSError as e:
        last = (0, str(e).encode())
    if not want or last[0] == want or time.monotonic() > deadline:
        break
    time.sleep(0.1)
print(json.dumps({"status": last[0], "body": last[1].decode("utf-8", "replace")}))
"""


@dataclass
class Lab:
    tag: str
    switch: str
    subnet: ipaddress.IPv4Network
    gateway: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[NsProcess] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # namespaces, in creation order
    etc_dirs: list[Path] = field(default_factory=list)
    made_netns_etc: bool = False

    # ---- building and tearing down -----------------------------------------------------

    @classmethod
    def create(cls, names: Sequence[str], *, subnet: str = "198.18.10.0/24") -> Lab:
        """The switch plus one host per name; on any failure, everything made is removed."""
        net = ipaddress.IPv4Network(subnet)
        if not net.subnet_of(ipaddress.IPv4Network("198.18.0.0/15")):
            raise ValueError(f"{subnet}: the lab uses 198.18.0.0/15 only")
        addresses = list(net.hosts())
        if len(names) + 1 >= len(addresses):
            raise ValueError(f"{subnet} is too small for {len(names)} hosts")
        tag = secrets.token_hex(3)
        lab = cls(
            tag=tag,
            switch=f"{PREFIX}{tag}-sw",
            subnet=net,
            gateway=str(addresses[0]),
        )
        try:
            lab._add_netns(lab.switch)
            _sh("ip", "-n", lab.switch, "link", "add", "br0", "type", "bridge")
            _sh(
                "ip",
                "-n",
                lab.switch,
                "addr",
                "add",
                f"{lab.gateway}/{net.prefixlen}",
                "dev",
                "br0",
            )
            _sh("ip", "-n", lab.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                lab._add_host(name, str(addresses[i + 1]), f"v{i}")
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _add_netns(self, netns: str) -> None:
        _sh("ip", "netns", "add", netns)
        self.created.append(netns)
        _sh("ip", "-n", netns, "link", "set", "lo", "up")

    def _add_host(self, name: str, address: str, port: str) -> None:
        if len(name) > 20 or not name.replace("-", "").isalnum():
            raise ValueError(f"host name {name!r}: letters, digits and '-', at most 20")
        netns = f"{PREFIX}{self.tag}-{name}"
        self._add_netns(netns)
        sw = self.switch
        _sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)  # fmt: skip
        _sh("ip", "-n", sw, "link", "set", port, "master", "br0")
        _sh("ip", "-n", sw, "link", "set", port, "up")
        _sh("ip", "-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _sh("ip", "-n", netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", netns, "route", "add", "default", "via", self.gateway, "dev", "eth0")
        self.hosts[name] = Host(name, netns, address)

    def destroy(self, grace_s: float = 3.0) -> None:
        """SIGTERM what was spawned, SIGKILL what is left after ``grace_s``, kill anything
        else still inside the lab's namespaces (by PID), delete the namespaces and the
        /etc/netns files. Idempotent."""
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            p.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
        existing = netns_names()
        for netns in self.created:
            if netns not in existing:
                continue
            for pid in self.pids(netns):  # children of what we spawned, if any
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for netns in reversed(self.created):
            if netns in existing:
                _sh("ip", "netns", "del", netns, check=False)
        for d in self.etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.etc_dirs.clear()
        if self.made_netns_etc:
            with contextlib.suppress(OSError):  # only if empty: others may use it too
                NETNS_ETC.rmdir()
            self.made_netns_etc = False

    def leftovers(self) -> list[str]:
        """What ``destroy`` should have removed and did not (empty when clean)."""
        left = [f"namespace {n}" for n in sorted(set(self.created) & netns_names())]
        left += [f"process {p.name} (pid {p.pid})" for p in self.procs if p.alive]
        left += [f"file {d}" for d in self.etc_dirs if d.exists()]
        left += [f"file {d}" for d in NETNS_ETC.glob(f"{PREFIX}{self.tag}-*")]
        return left

    @staticmethod
    def pids(netns: str) -> list[int]:
        done = _sh("ip", "netns", "pids", netns, check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    # ---- inside a host -----------------------------------------------------------------

    def etc_file(self, host: str, name: str, text: str) -> Path:
        """Write /etc/netns/NS/NAME: commands run in the host see it as /etc/NAME."""
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(mode=0o755)
            self.made_netns_etc = True
        d = NETNS_ETC / self.hosts[host].netns
        if d not in self.etc_dirs:
            d.mkdir(mode=0o755, exist_ok=True)
            self.etc_dirs.append(d)
        path = d / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def argv(self, host: str, *args: str, uid: int | None = None) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].netns, *as_uid(uid), *args]

    def run(
        self,
        host: str,
        *args: str,
        uid: int | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        input: str | None = None,
        cwd: str | Path = "/",
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside ``host`` (bounded by ``timeout``)."""
        return subprocess.run(
            self.argv(host, *args, uid=uid),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )

    def python(
        self, host: str, script: str, *args: str, uid: int | None = None, timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a stdlib-only script with the system interpreter inside ``host``."""
        return self.run(host, SYSTEM_PYTHON, "-c", script, *args, uid=uid, timeout=timeout)

    def spawn(
        self,
        host: str,
        name: str,
        *args: str,
        log: Path,
        uid: int | None = None,
        cwd: str | Path = "/",
        env: dict[str, str] | None = None,
    ) -> NsProcess:
        """Start a long-lived process inside ``host``; ``destroy`` stops it by PID."""
        with log.open("ab") as out:
            popen = subprocess.Popen(
                self.argv(host, *args, uid=uid),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=cwd,
                env=env,
            )
        proc = NsProcess(name, self.hosts[host], popen, log)
        self.procs.append(proc)
        return proc

    def http(
        self,
        host: str,
        method: str,
        url: str,
        body: Any = None,
        *,
        token: str | None = None,
        want: int = 0,
        timeout: float = 10.0,
        uid: int | None = None,
    ) -> tuple[int, str]:
        """One HTTP request from inside ``host`` → (status, body); status 0 if it could
        not connect. With ``want``, poll until that status or ``timeout``."""
        done = self.python(
            host,
            _HTTP,
            method,
            url,
            json.dumps(body) if body is not None else "",
            token or "",
            str(want),
            str(timeout),
            uid=uid,
            timeout=timeout + 10,
        )
        if done.returncode != 0:
            raise AssertionError(f"http {method} {url} in {host}: {done.stderr}")
        answer = json.loads(done.stdout)
        return int(answer["status"]), str(answer["body"])

    def http_json(self, host: str, method: str, url: str, body: Any = None, **kw: Any) -> Any:
        status, text = self.http(host, method, url, body, **kw)
        assert 200 <= status < 300, (method, url, status, text)
        return json.loads(text)


@contextlib.contextmanager
def lab(names: Sequence[str], *, subnet: str = "198.18.10.0/24") -> Iterator[Lab]:
    """``Lab.create`` … ``destroy`` around a block, failing the block if anything is left."""
    built = Lab.create(names, subnet=subnet)
    try:
        yield built
    finally:
        built.destroy()
    assert not built.leftovers(), built.leftovers()
