"""The nftables shell: applies the scripts sidecar/intercept.py decides, and reads back
what is installed.

Runs the ``nft`` binary (no shell), script on stdin; every call either succeeds or raises
MeshError carrying nft's own message and what to do. It must never decide rules (that is
intercept.py) and never touch any table but ``inet meshlet``: the only things it sends
are intercept.py's scripts and read-only ``list`` commands.

``netns`` runs the same command inside a named network namespace (``ip netns exec``),
for the lab and tests that set up containers as namespaces; ``None`` means the current
namespace (the init container's, which is the app's).
"""

from __future__ import annotations

import shutil
import subprocess

from meshlet.errors import MeshError, NotFoundError
from sidecar import intercept

NFT = "nft"
TIMEOUT_S = 10.0
NET_ADMIN_HINT = (
    "needs NET_ADMIN: run `meshlet sidecar init` in the container's network namespace "
    "with CAP_NET_ADMIN"
)
_PERMISSION_WORDS = ("Operation not permitted", "Permission denied")


def apply(script: str, *, netns: str | None = None, nft: str = NFT) -> None:
    """Run ``script`` with ``nft -f -`` as one transaction: all of it, or nothing."""
    _run([nft, "-f", "-"], stdin=script, netns=netns, nft=nft, doing="apply the ruleset")


def table_exists(*, netns: str | None = None, nft: str = NFT) -> bool:
    """Whether table ``inet meshlet`` is installed."""
    listing = _run(
        [nft, "list", "tables", intercept.FAMILY], netns=netns, nft=nft, doing="list tables"
    )
    wanted = f"table {intercept.FAMILY} {intercept.TABLE}"
    return any(line.strip() == wanted for line in listing.splitlines())


def list_table(*, netns: str | None = None, nft: str = NFT) -> str:
    """``nft list table inet meshlet``; NotFoundError if it is not installed."""
    if not table_exists(netns=netns, nft=nft):
        raise NotFoundError(
            f"table {intercept.FAMILY} {intercept.TABLE} is not installed "
            "(run `meshlet sidecar init`)"
        )
    return _run(
        [nft, "list", "table", intercept.FAMILY, intercept.TABLE],
        netns=netns,
        nft=nft,
        doing="list the table",
    )


def ensure(cfg: intercept.InterceptConfig, *, netns: str | None = None, nft: str = NFT) -> None:
    """Install the rules for ``cfg``, replacing any previous ones atomically."""
    apply(intercept.ruleset(cfg), netns=netns, nft=nft)


def remove(*, netns: str | None = None, nft: str = NFT) -> bool:
    """Delete table ``inet meshlet``; return whether it was there. Absent is fine."""
    existed = table_exists(netns=netns, nft=nft)
    apply(intercept.removal(), netns=netns, nft=nft)
    return existed


def _run(args: list[str], *, netns: str | None, nft: str, doing: str, stdin: str = "") -> str:
    if shutil.which(nft) is None:
        raise MeshError(
            f"cannot {doing}: `{nft}` was not found; install nftables "
            "(Debian: apt-get install nftables) in the image that runs `meshlet sidecar init`"
        )
    if netns is not None:
        args = ["ip", "netns", "exec", netns, *args]
    try:
        done = subprocess.run(
            args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except FileNotFoundError as e:  # `ip`, when netns is given
        raise MeshError(f"cannot {doing}: {e.filename or args[0]} was not found") from e
    except subprocess.TimeoutExpired as e:
        raise MeshError(f"cannot {doing}: `nft` did not finish within {TIMEOUT_S:g}s") from e
    if done.returncode != 0:
        raise MeshError(f"cannot {doing}: {_explain(done.stderr, done.returncode)}")
    return done.stdout


def _explain(stderr: str, code: int) -> str:
    """nft's message on one line, plus what to do about it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    message = "; ".join(dict.fromkeys(errors or lines)) or f"nft exited with status {code}"
    if any(word in stderr for word in _PERMISSION_WORDS):
        return f"nft: {message} ({NET_ADMIN_HINT})"
    return f"nft: {message} (see the script with `meshlet sidecar init --dry-run`)"
