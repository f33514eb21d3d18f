"""`meshlet inject` / `meshlet uninject` as a user runs them: the installed console
script in a subprocess, its stdout (the YAML), stderr (the per-service report, or one
error line) and exit codes; --check, --in-place, stdin, and the project name."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data" / "compose"
MESHLET = str(Path(sys.executable).with_name("meshlet"))
APP = """\
# the shop
services:
  web:
    image: nginx  # the web
    ports:
      - "8080:80"

  db:
    image: postgres
    x-meshlet:
      inject: false
"""


def run(
    *args: str, cwd: Path, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROJECT_NAME"}
    return subprocess.run(
        [MESHLET, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **env},
    )


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    project = tmp_path / "shop"
    project.mkdir()
    path = project / "docker-compose.yml"
    path.write_text(APP)
    return path


def test_inject_prints_the_file_and_reports_each_service(shop: Path) -> None:
    done = run("inject", str(shop), cwd=shop.parent)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "web: injected",
        "db: skipped (x-meshlet.inject: false)",
        "meshlet-control-plane: added",
        "meshlet-node: added",
    ]
    assert "      - shop/web\n" in done.stdout  # the project: the file's directory name
    assert '    network_mode: "service:web-meshlet"\n' in done.stdout
    assert shop.read_text() == APP  # without --in-place, the file is left alone


def test_stdin_in_and_uninject_gives_the_same_bytes_back(shop: Path) -> None:
    injected = run("inject", "-", "--project", "store", cwd=shop.parent, stdin=APP)
    assert injected.returncode == 0, injected.stderr
    assert "      - store/web\n" in injected.stdout
    restored = run("uninject", "-", cwd=shop.parent, stdin=injected.stdout)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == APP
    assert restored.stderr.splitlines() == [
        "web: restored",
        "meshlet-control-plane: removed",
        "meshlet-node: removed",
    ]


def test_check_then_in_place_then_check_again(shop: Path) -> None:
    mode = 0o640
    shop.chmod(mode)
    check = run("inject", "--check", str(shop), cwd=shop.parent)
    assert check.returncode == 1
    assert f"{shop}: `meshlet inject` would change it" in check.stderr
    assert check.stdout.startswith(f"--- {shop}\n+++ {shop} (inject)\n")
    assert '+    network_mode: "service:web-meshlet"\n' in check.stdout
    assert shop.read_text() == APP

    written = run("inject", "--in-place", str(shop), cwd=shop.parent)
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert written.stderr.splitlines()[-1] == f"{shop}: written"
    assert stat.S_IMODE(shop.stat().st_mode) == mode
    assert [p.name for p in shop.parent.iterdir()] == ["docker-compose.yml"]  # no temp left

    again = run("inject", "--check", str(shop), cwd=shop.parent)
    assert again.returncode == 0, again.stdout
    assert again.stderr.splitlines()[-1] == f"{shop}: nothing to change"

    back = run("uninject", "-i", str(shop), cwd=shop.parent)
    assert back.returncode == 0, back.stderr
    assert shop.read_text() == APP
    assert run("uninject", "--check", str(shop), cwd=shop.parent).returncode == 0


def test_project_name_from_the_environment_or_refused_when_not_a_dns_label(tmp_path: Path) -> None:
    odd = tmp_path / "My_Shop"
    odd.mkdir()
    path = odd / "compose.yml"
    path.write_text(APP)
    refused = run("inject", str(path), cwd=odd)
    assert refused.returncode == 2
    assert refused.stderr == (
        "meshlet: error: project name 'my_shop' (from the directory name 'My_Shop') is not a "
        "DNS label, and it becomes the mesh namespace: pass --project NAME with lowercase "
        "letters, digits and '-'\n"
    )
    from_env = run("inject", str(path), cwd=odd, COMPOSE_PROJECT_NAME="shop-2")
    assert from_env.returncode == 0, from_env.stderr
    assert "      - shop-2/web\n" in from_env.stdout


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("malformed", "not valid YAML at line 4, column 4"),
        ("merge_moved_key", "service 'web': networks comes from a merge key (<<)"),
        ("network_mode", "service 'agent' already uses network_mode: host"),
        ("python_tag", "the tag !!python/object/apply:os.system is not allowed"),
        ("billion_laughs", "expand to more than 100000 values"),
        ("top_level_list", "the top level is a list, not a mapping with services:"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_the_file_alone(
    tmp_path: Path, name: str, message: str
) -> None:
    path = tmp_path / "demo" / "docker-compose.yml"
    path.parent.mkdir()
    original = (DATA / "bad" / f"{name}.yml").read_bytes()
    path.write_bytes(original)
    before = path.stat().st_mtime_ns
    done = run("inject", "--in-place", str(path), cwd=path.parent)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"meshlet: error: {path}")
    assert message in lines[0]
    assert path.read_bytes() == original and path.stat().st_mtime_ns == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["docker-compose.yml"]


def test_usage_mistakes_exit_2(shop: Path) -> None:
    both = run("inject", "--check", "--in-place", str(shop), cwd=shop.parent)
    assert both.returncode == 2
    assert both.stderr == "meshlet: error: --in-place and --check exclude each other: choose one\n"
    stdin = run("uninject", "--in-place", "-", cwd=shop.parent, stdin=APP)
    assert stdin.returncode == 2
    assert "--in-place needs a file, not - (stdin)" in stdin.stderr
    missing = run("inject", str(shop.parent / "nope.yml"), cwd=shop.parent)
    assert missing.returncode == 2
    assert (
        missing.stderr
        == f"meshlet: error: compose file {shop.parent / 'nope.yml'} does not exist\n"
    )
    bad_td = run("inject", "--trust-domain", "Mesh Local", str(shop), cwd=shop.parent)
    assert bad_td.returncode == 2 and "trust domain 'Mesh Local'" in bad_td.stderr
