"""The lab's hands inside network namespaces: sockets, HTTP, sysctls, commands and the
processes it starts, plus the facts `lab status`/`lab down` need (which namespaces exist,
which PIDs are still the processes we started, which PIDs live in a namespace).

For: ``socket_in`` (a socket created inside a namespace by a short-lived thread that
entered it with setns(2): the socket keeps that namespace wherever it is used, so the
lab reaches 127.0.0.1:15000 of a container from the host without a helper process),
``request`` (HTTP/1.1), ``write_sysctl``, ``run``/``spawn`` (``ip netns exec``, which
also bind-mounts /etc/netns/NS/resolv.conf), ``start_time``/``alive`` (PID + start time
from /proc/PID/stat, so a recycled PID is never mistaken for ours), ``pids_in`` (every
process whose network namespace is this one, from /proc/*/ns/net), namespace create and
delete (pyroute2: netlink, no `ip` process), ``netlink`` (pyroute2's errors → MeshError).

Must never: change the calling thread's namespace (only throwaway threads enter one),
kill anything by name, or leave a started process without returning its PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshlet.errors import MeshError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 30.0
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that first enters namespace ``name``; return its result.
    The thread ends afterwards, so no thread of this process stays in another namespace."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            failure.append(MeshError(f"namespace {name} cannot be opened: {e.strerror}"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(MeshError(f"cannot enter namespace {name}: {os.strerror(err)}"))
                return
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)
        finally:
            os.close(fd)

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def socket_in(name: str, family: int = socket.AF_INET) -> socket.socket:
    return in_netns(name, lambda: socket.socket(family, socket.SOCK_STREAM))


class _Conn(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        sock = socket_in(self._netns)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


def request(
    netns: str,
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request from inside ``netns`` → (status, body). Raises OSError when the
    server cannot be reached."""
    conn = _Conn(netns, host, port, timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    except http.client.HTTPException as e:
        raise OSError(errno.EPROTO, f"bad HTTP answer from {host}:{port}: {e!r}") from None
    finally:
        conn.close()


def write_sysctl(netns: str, key: str, value: str) -> None:
    """``net.*`` sysctls are per namespace: /proc/sys/net as seen from inside it."""
    path = Path("/proc/sys") / key.replace(".", "/")
    in_netns(netns, lambda: path.write_text(value))


# ---- namespaces ------------------------------------------------------------------------


def list_netns() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def create_netns(name: str) -> None:
    from pyroute2 import netns

    netns.create(name)


def delete_netns(name: str) -> None:
    from pyroute2 import netns

    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


def _ns_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in(name: str) -> list[int]:
    """Every live process whose network namespace is ``name`` (``ip netns pids``)."""
    want = _ns_key(netns_path(name))
    if want is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _ns_key(entry / "ns" / "net") == want:
            pids.append(int(entry.name))
    return pids


# ---- processes -------------------------------------------------------------------------


def start_time(pid: int, *, zombie_too: bool = False) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone (or a
    zombie, unless ``zombie_too``: a child that died at once still has its start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or (fields[0] in ("Z", "X") and not zombie_too):
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """Still the process we started: same PID, same start time, not a zombie. Without a
    recorded start time nothing is ever taken for ours."""
    return started is not None and start_time(pid) == started


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without proxy settings (gRPC and urllib would obey them)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra or {})
    return env


def as_uid(uid: int | None) -> list[str]:
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def netns_argv(netns: str, argv: Sequence[str], uid: int | None = None) -> list[str]:
    return ["ip", "netns", "exec", netns, *as_uid(uid), *argv]


def run(
    netns: str,
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion inside ``netns``; bounded by ``timeout``."""
    try:
        return subprocess.run(
            netns_argv(netns, argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else clean_env(),
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        raise MeshError(
            f"`{' '.join(argv[:4])} ...` in namespace {netns} did not finish in {timeout:.0f}s"
        ) from None


def check(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise MeshError(f"{what} failed (exit {done.returncode}): {last[-1] if last else ''}")
    return done.stdout


def spawn(
    netns: str,
    argv: Sequence[str],
    *,
    log: Path,
    uid: int | None = None,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived process inside ``netns`` in its own session (a Ctrl-C meant for
    the `meshlet lab` command does not reach it). ``ip netns exec`` and ``setpriv`` exec,
    so the returned PID is the command's own. ``stdin_data`` is written then closed (how
    an app's source reaches the system interpreter: ``python3 -``)."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            netns_argv(netns, argv, uid),
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd="/",
            env=dict(env) if env is not None else clean_env(),
            start_new_session=True,
        )
    if stdin_data is not None:
        assert popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            popen.stdin.write(stdin_data)
        popen.stdin.close()
    return popen


def nft_tables(netns: str) -> set[str]:
    """``family name`` of every nft table in ``netns`` (empty when nft cannot tell)."""
    try:
        done = run(netns, ["nft", "list", "tables"], timeout=10)
    except MeshError:
        return set()
    return {
        " ".join(line.split()[1:3])
        for line in done.stdout.splitlines()
        if line.startswith("table ")
    }


def links_in(netns: str) -> set[str]:
    from pyroute2 import NetNS

    try:
        with NetNS(netns) as ns:
            return {str(link.get("ifname")) for link in ns.link("dump")}
    except OSError:
        return set()


@contextlib.contextmanager
def netlink(what: str) -> Iterator[None]:
    """Translate pyroute2's errors where they enter: one MeshError naming what failed."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except (NetlinkError, OSError) as e:
        raise MeshError(f"{what}: {e}") from e


def describe_exit(popen: subprocess.Popen[bytes], log: Path) -> str:
    tail = ""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").strip().splitlines()
        tail = lines[-1] if lines else ""
    return f"exited with {popen.returncode}: {tail[-300:]} (log: {log})"


def signal_process(pid: int, started: int | None, sig: int) -> bool:
    """Signal ``pid`` if it is still the process started at ``started``; True if sent."""
    if not alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(popen: subprocess.Popen[Any] | None) -> None:
    """Collect a child we started (no zombie left while this command still runs)."""
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0)
