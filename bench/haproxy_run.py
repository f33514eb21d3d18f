"""Run the HAProxy side of the comparison: its certificates, its two configs (kept in
bench/haproxy/ so anyone can check the fight), and its two processes.

For: the I/O around ``bench.haproxy_config``.
Must never: change the configuration's content (that is ``haproxy_config``'s job).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from bench import haproxy_config

REPO_DIR = Path(__file__).parent / "haproxy"


def write_certs(d: Path) -> None:
    """A mesh CA (root → issuer, ECDSA P-256, built by certs.pki) and SPIFFE leaves for
    the two HAProxy hops: ``bundle.pem`` and ``haproxy-{outbound,inbound}.pem`` (chain
    and key in one file, as HAProxy's ``crt`` wants)."""
    from certs import pki
    from certs.spiffe import SpiffeId

    now = dt.datetime.now(dt.UTC)
    root_key, issuer_key = pki.new_key(), pki.new_key()
    root = pki.build_root(root_key, trust_domain="bench.local", now=now)
    issuer = pki.build_issuer(issuer_key, root=root, root_key=root_key, now=now)
    d.mkdir(parents=True, exist_ok=True)
    (d / "bundle.pem").write_bytes(pki.dump_certs([root]))
    for hop in haproxy_config.HOPS:
        key = pki.new_key()
        sid = SpiffeId.for_workload("bench.local", "bench", f"haproxy-{hop}")
        leaf = pki.build_leaf(
            key.public_key(), spiffe_id=sid, issuer=issuer, issuer_key=issuer_key, now=now
        )
        pem = pki.dump_certs([leaf.cert, issuer]) + pki.dump_key(key)
        path = d / f"haproxy-{hop}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)


def write_configs(out_dir: Path = REPO_DIR) -> dict[str, Path]:
    """Render both hops' configs into ``out_dir`` (rewritten only when they changed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for hop in haproxy_config.HOPS:
        path = out_dir / f"{hop}.cfg"
        text = haproxy_config.render(hop)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths[hop] = path
    return paths


def check(binary: str, cfg: Path, env: Mapping[str, str]) -> str:
    """``haproxy -c -f cfg``: the config is valid (raises with HAProxy's words if not)."""
    done = subprocess.run(
        [binary, "-c", "-f", str(cfg)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"haproxy -c -f {cfg} refused it:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def start(binary: str, cfg: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """HAProxy in the foreground (``-db``: one process, no master), logging to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [binary, "-db", "-f", str(cfg)],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
