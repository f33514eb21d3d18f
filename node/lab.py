"""The lab's shell: one run directory, its journal, and the recorded way to create things.

For: ``Lab`` — the paths inside RUN_DIR (logs/, cp/, nodes/, certs/), the layout and
scenario the journal says the lab was built with, and the only functions that create
something: ``make_dir``, ``make_netns``, ``write_file``, ``spawn``. Each one writes its
journal record *before* creating a named thing (a directory, a namespace, a file), and
right after starting a process (its PID and start time are known only then), so
``lab down`` finds everything even when a command was killed halfway. Processes always
run inside a namespace the lab recorded, so even one started and not yet recorded is
found by ``lab down`` (it sweeps every process in those namespaces, by PID).

What other commands make for the lab (the node helper's bridge and VXLAN device, the veth
pair `meshlet node attach` names, `meshlet sidecar init`'s nft table) is recorded as soon as
their names are known; all of it lives in a namespace recorded before, and goes with it.

Must never: create anything without recording it first, or change the host's own network
namespace (every link, address, route and rule lives in a namespace the lab created).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshlet.errors import InputError, MeshError
from node import lab_netns as nsio
from node import lab_state
from node.lab_journal import Journal
from node.lab_scenario import CP_API_PORT, Layout, Scenario, scenario

DEFAULT_RUN_DIR = Path("/run/meshlet/lab")
NETNS_ETC = Path("/etc/netns")
T = TypeVar("T")


def meshlet_argv(*args: str) -> list[str]:
    """This very meshlet (same interpreter, same code) as a command."""
    return [sys.executable, "-m", "meshlet", *args]


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    failed: Callable[[], str | None] = lambda: None,
) -> T:
    """Poll ``check`` until it returns a value; ``failed`` names a reason to stop early
    (a process that exited). Raises MeshError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        reason = failed()
        if reason:
            raise MeshError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise MeshError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(interval)


class Lab:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.journal = Journal(run_dir)

    # ---- paths -------------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def cp_data(self) -> Path:
        return self.run_dir / "cp"

    @property
    def node_state(self) -> Path:
        return self.run_dir / "nodes"

    @property
    def certs(self) -> Path:
        return self.run_dir / "certs"

    @property
    def ca_bundle(self) -> Path:
        return self.cp_data / "ca" / "bundle.pem"

    @property
    def join_token(self) -> Path:
        return self.cp_data / "join-token"

    @property
    def admin_token(self) -> Path:
        return self.cp_data / "admin-token"

    # ---- what the journal says ---------------------------------------------------------

    def state(self) -> lab_state.LabState:
        return self.journal.state()

    @contextlib.contextmanager
    def changing(self, what: str) -> Iterator[None]:
        """The lock of a lab that exists (`scale`, `kill`, ...): a clear error when there is
        none, and nothing created in a directory that holds no lab."""
        self.settings()
        with self.journal.lock(what):
            yield

    def settings(self) -> dict[str, Any]:
        lab = self.state().lab
        if lab is None:
            flag = "" if self.run_dir == DEFAULT_RUN_DIR else f" --run-dir {self.run_dir}"
            raise InputError(
                f"no lab in {self.run_dir} (no journal there): start one with "
                f"`meshlet lab up{flag}`, or pass the --run-dir of the one you started"
            )
        return lab

    def layout(self) -> Layout:
        s = self.settings()
        return Layout(prefix=str(s["prefix"]), nodes=int(s["nodes"]), underlay=str(s["underlay"]))

    def scenario(self) -> Scenario:
        return scenario(str(self.settings()["scenario"]))

    # ---- creating things, recorded first -----------------------------------------------

    def make_dir(self, path: Path, *, mode: int = 0o755, only_if_empty: bool = False) -> None:
        """Create ``path`` if it is missing, recorded first. ``lab down`` removes it with
        what is inside, or (``only_if_empty``) only when nothing else is left in it."""
        if path.exists():
            return
        self.journal.add(
            "dir", lab_state.dir_id(str(path)), path=str(path), only_if_empty=only_if_empty
        )
        path.mkdir(mode=mode)
        os.chmod(path, mode)  # the umask does not narrow what we asked for

    def write_file(self, path: Path, text: str, *, mode: int = 0o644) -> None:
        self.journal.add("file", lab_state.file_id(str(path)), path=str(path))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        tmp.replace(path)

    def make_netns(self, name: str, role: str) -> None:
        from pyroute2 import NetNS

        if name in nsio.list_netns():
            raise MeshError(
                f"namespace {name} exists already: another lab uses prefix "
                f"{name.rsplit('-', 1)[0]!r}; take it down, or pass another --prefix"
            )
        self.journal.add("netns", lab_state.netns_id(name), name=name, role=role)
        with nsio.netlink(f"creating namespace {name}"):
            nsio.create_netns(name)
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def netns_etc_root(self) -> None:
        """/etc/netns, if missing (once, before containers are made in parallel)."""
        self.make_dir(NETNS_ETC, only_if_empty=True)

    def netns_etc(self, netns: str) -> Path:
        """/etc/netns/NS: files here replace /etc's inside the namespace for commands run
        with ``ip netns exec`` (how a container gets its own resolv.conf)."""
        d = NETNS_ETC / netns
        self.make_dir(d)
        return d

    def spawn(
        self,
        name: str,
        role: str,
        netns: str,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        stdin_data: bytes | None = None,
        env: dict[str, str] | None = None,
        **fields: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``netns`` (log: logs/NAME.log) and record its PID at once."""
        log = self.logs / f"{name}.log"
        popen = nsio.spawn(netns, argv, log=log, uid=uid, stdin_data=stdin_data, env=env)
        self.journal.add(
            "process",
            lab_state.process_id(name),
            name=name,
            role=role,
            netns=netns,
            pid=popen.pid,
            start=nsio.start_time(popen.pid, zombie_too=True),
            log=str(log),
            argv=list(argv),
            **fields,
        )
        return popen

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 10.0) -> Any:
        """The control plane's admin API, from inside its namespace, with the admin token."""
        layout = self.layout()
        try:
            token = self.admin_token.read_text().strip()
        except OSError as e:
            raise MeshError(
                f"the admin token {self.admin_token} cannot be read: {e.strerror}"
            ) from None
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        try:
            status, answer = nsio.request(
                layout.cp_netns,
                layout.cp_address,
                CP_API_PORT,
                method,
                path,
                body=data,
                headers=headers,
                timeout=timeout,
            )
        except OSError as e:
            raise MeshError(
                f"the control plane at {layout.api_url} (namespace {layout.cp_netns}) "
                f"cannot be reached: {e}; see `meshlet lab status`"
            ) from None
        if not 200 <= status < 300:
            raise MeshError(
                f"the control plane answered {status} to {method} {path}: {answer[:300]!r}"
            )
        return json.loads(answer) if answer else None

    def process_alive(self, record: dict[str, Any]) -> bool:
        return nsio.alive(int(record["pid"]), record.get("start"))

    def log_tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])[-600:]

    def exited(self, popen: subprocess.Popen[bytes], name: str) -> str | None:
        """For ``wait_until(failed=...)``: why the process is gone, or None if it runs."""
        if popen.poll() is None:
            return None
        log = self.logs / f"{name}.log"
        return f"{name} exited with {popen.returncode}: {self.log_tail(name)} (log: {log})"
