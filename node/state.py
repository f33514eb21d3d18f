"""The node helper's files in its state directory (default /run/meshlet/node).

For: `meshlet node run` (writes ``NAME.json`` once the overlay is up) and `meshlet node
attach` / `detach` (read it; keep ``NAME.leases.json`` under ``NAME.lock``), and the lab,
which waits for ``NAME.json`` with the helper's pid in it.

``NAME.json``: ``{"pid", "name", "subnet", "gateway", "bridge", "vxlan", "vtep_mac", "mtu",
"underlay_address", "vni", "port"}``, replaced atomically (written beside, then renamed).

Must never: write a file in place, or leave a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from certs.files import PUBLIC, write_files
from meshlet.errors import InputError, NotFoundError

DEFAULT_DIR = Path("/run/meshlet/node")
SUFFIX = ".json"
LEASES_SUFFIX = ".leases.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    pid: int
    name: str
    subnet: str
    gateway: str
    bridge: str
    vxlan: str
    vtep_mac: str
    mtu: int
    underlay_address: str
    vni: int
    port: int


def info_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}{SUFFIX}"


def leases_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}{LEASES_SUFFIX}"


def ensure_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the state directory {state_dir}: {e.strerror}") from e


def write_info(state_dir: Path, info: NodeInfo) -> None:
    ensure_dir(state_dir)
    raw = orjson.dumps(asdict(info), option=orjson.OPT_INDENT_2)
    write_files(state_dir, {info_path(state_dir, info.name).name: (raw, PUBLIC)})


def remove_info(state_dir: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        info_path(state_dir, name).unlink()


def node_names(state_dir: Path) -> list[str]:
    """Names of the nodes that wrote a NAME.json here."""
    if not state_dir.is_dir():
        return []
    return sorted(
        p.name.removesuffix(SUFFIX)
        for p in state_dir.glob(f"*{SUFFIX}")
        if not p.name.endswith(LEASES_SUFFIX) and not p.name.startswith(".")
    )


def read_info(state_dir: Path, name: str | None) -> NodeInfo:
    """The node's NAME.json; without a name, the only node in ``state_dir``."""
    if name is None:
        names = node_names(state_dir)
        if not names:
            raise NotFoundError(
                f"no node in {state_dir}: start `meshlet node run` first (or pass the "
                "--state-dir it uses)"
            )
        if len(names) > 1:
            raise InputError(
                f"{state_dir} holds several nodes ({', '.join(names)}): pass --name NODE"
            )
        name = names[0]
    path = info_path(state_dir, name)
    try:
        data = orjson.loads(path.read_bytes())
        return NodeInfo(**{k: data[k] for k in NodeInfo.__dataclass_fields__})
    except FileNotFoundError:
        raise NotFoundError(
            f"{path} does not exist: start `meshlet node run --name {name}` first (or pass "
            "the --state-dir it uses)"
        ) from None
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is damaged ({e!r}): restart `meshlet node run`") from None


@contextlib.contextmanager
def locked(state_dir: Path, name: str) -> Iterator[None]:
    """Hold NAME.lock: one attach or detach at a time per node."""
    ensure_dir(state_dir)
    fd = os.open(state_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
