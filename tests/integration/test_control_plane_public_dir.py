"""`meshlet control-plane run --public-dir DIR`: what compose sidecars mount instead of the
data dir. DIR holds the trust bundle and the join token, kept current through a root
rotation, and never a key or the admin token."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess

pytestmark = pytest.mark.integration

EXPECTED = {"bundle.pem", "join-token"}


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess(tmp_path / "data", "--public-dir", str(tmp_path / "public"))
    try:
        yield proc.start()
    finally:
        proc.kill()


def names(public: Path) -> set[str]:
    return {p.name for p in public.iterdir()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def rotate_root(cp: ControlPlaneProcess, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlet",
            "certs",
            "rotate",
            "root",
            "--dir",
            str(cp.data_dir / "ca"),
            "--control-plane",
            cp.base,
            "--token-file",
            str(cp.token_file),
            "--step",
            step,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_public_dir_has_the_bundle_and_join_token_and_follows_a_root_rotation(
    cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    public = tmp_path / "public"
    assert names(public) == EXPECTED  # written before the control plane says it serves
    bundle = (public / "bundle.pem").read_bytes()
    assert bundle == (cp.data_dir / "ca" / "bundle.pem").read_bytes()
    assert bundle.count(b"BEGIN CERTIFICATE") == 1 and b"PRIVATE KEY" not in bundle
    token = (public / "join-token").read_text()
    assert token.strip() == (cp.data_dir / "join-token").read_text().strip()
    assert mode(public / "bundle.pem") == 0o644
    assert mode(public / "join-token") == 0o640

    added = rotate_root(cp, "add")
    assert added.returncode == 0, added.stderr
    deadline = time.monotonic() + 30
    while (public / "bundle.pem").read_bytes() == bundle:  # the CA dir is polled every 2 s
        assert names(public) == EXPECTED, "only the two public files, even mid-rotation"
        assert time.monotonic() < deadline, "the public bundle did not follow the rotation"
        time.sleep(0.2)
    rotated = (public / "bundle.pem").read_bytes()
    assert rotated.count(b"BEGIN CERTIFICATE") == 2  # old and new root, both trusted
    assert rotated == (cp.data_dir / "ca" / "bundle.pem").read_bytes()
    assert (public / "join-token").read_text() == token
    assert names(public) == EXPECTED
    assert not [p for p in public.rglob("*") if "key" in p.name or "admin" in p.name]


def test_restart_rewrites_the_public_dir(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    public = tmp_path / "public"
    (public / "bundle.pem").write_bytes(b"stale\n")
    cp.kill()
    cp.start()
    assert (public / "bundle.pem").read_bytes() == (cp.data_dir / "ca" / "bundle.pem").read_bytes()
    assert names(public) == EXPECTED
