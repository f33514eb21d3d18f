"""`meshlet inject` and `meshlet uninject`: read a compose file (or stdin), run
compose/inject.py on it, and write the result to stdout or back to the file.

For: the dispatcher in meshlet/cli.py. The per-service report goes to stderr, the YAML
to stdout. ``--in-place`` writes a temporary file beside the target, fsyncs it and
renames it over the target (same mode), so the file is either old or new, never half;
``--check`` writes nothing and exits 1 when the file would change (the diff on stdout).
Must never: decide anything about the YAML, or write when the input was refused.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
import sys
import tempfile
from pathlib import Path

import click

from meshlet.errors import InputError

STDIN = "-"


def _read(file: str) -> str:
    data: bytes
    if file == STDIN:
        data = sys.stdin.buffer.read()
    else:
        path = Path(file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"compose file {file} does not exist") from None
        except IsADirectoryError:
            raise InputError(f"{file} is a directory: name the compose file in it") from None
        except OSError as e:
            raise InputError(f"compose file {file} cannot be read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{file}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def _write_in_place(file: str, text: str) -> None:
    target = Path(file).resolve()
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"cannot write {file}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot write {file}: {e.strerror}") from None
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _modes(file: str, in_place: bool, check: bool) -> None:
    if in_place and check:
        raise InputError("--in-place and --check exclude each other: choose one")
    if in_place and file == STDIN:
        raise InputError("--in-place needs a file, not - (stdin): name the compose file")


def _finish(command: str, file: str, before: str, after: str, in_place: bool, check: bool) -> int:
    """Write or compare the result; the exit code (1: --check found a change)."""
    changed = after != before
    if check:
        if not changed:
            click.echo(f"{file}: nothing to change", err=True)
            return 0
        name = "stdin" if file == STDIN else file
        diff = difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=name,
            tofile=f"{name} ({command})",
        )
        sys.stdout.writelines(diff)
        click.echo(f"{file}: `meshlet {command}` would change it", err=True)
        return 1
    if in_place:
        if changed:
            _write_in_place(file, after)
            click.echo(f"{file}: written", err=True)
        else:
            click.echo(f"{file}: nothing to change", err=True)
        return 0
    click.echo(after, nl=False)
    return 0


def _project(file: str, given: str | None) -> str:
    from compose.inject_rules import check_project, project_name

    if given is not None:
        return check_project(given, origin="--project")
    env = os.environ.get("COMPOSE_PROJECT_NAME")
    if env:
        return check_project(project_name(env), origin="from COMPOSE_PROJECT_NAME")
    directory = (Path.cwd() if file == STDIN else Path(file).resolve().parent).name
    return check_project(project_name(directory), origin=f"from the directory name {directory!r}")


@click.command("inject")
@click.argument("file", metavar="FILE|-")
@click.option("--in-place", "-i", is_flag=True, help="Rewrite FILE instead of printing.")
@click.option("--check", is_flag=True, help="Exit 1 (and print the diff) if FILE would change.")
@click.option(
    "--project",
    metavar="NAME",
    help="The compose project name, which is the mesh namespace. Default: "
    "$COMPOSE_PROJECT_NAME, else FILE's directory name (as docker-compose does).",
)
@click.option("--image", default="meshlet:latest", show_default=True, help="The meshlet image.")
@click.option("--trust-domain", default="mesh.local", show_default=True)
@click.option(
    "--admin",
    default="127.0.0.1:15000",
    show_default=True,
    metavar="ADDR:PORT",
    help="Each sidecar's admin listener, inside its container (0.0.0.0:15000 opens it to "
    "the container's networks).",
)
@click.option("--no-node", is_flag=True, help="Do not add the node helper (meshlet-node).")
def inject(
    file: str,
    in_place: bool,
    check: bool,
    project: str | None,
    image: str,
    trust_domain: str,
    admin: str,
    no_node: bool,
) -> int:
    """Add a meshlet sidecar to every service of a docker compose file.

    Writes the new file to stdout (or FILE with --in-place) and one line per service to
    stderr. Running it again changes nothing; `meshlet uninject` takes it all out. Per
    service, an `x-meshlet:` block sets inject, ports, protocol, exclude-ports,
    identity, labels and replicas.
    """
    from certs.spiffe import validate_trust_domain
    from compose.inject import inject as run_inject
    from compose.inject_build import Settings
    from meshlet.addresses import parse_hostport

    _modes(file, in_place, check)
    parse_hostport(admin, what="--admin")
    if not image.strip() or any(c.isspace() for c in image):
        raise InputError(f"--image {image!r} is not an image name, like meshlet:latest")
    settings = Settings(
        project=_project(file, project),
        image=image,
        trust_domain=validate_trust_domain(trust_domain),
        admin=admin,
        node=not no_node,
    )
    text = _read(file)
    result = run_inject(text, source=file, settings=settings)
    for line in result.report:
        click.echo(line, err=True)
    return _finish("inject", file, text, result.text, in_place, check)


@click.command("uninject")
@click.argument("file", metavar="FILE|-")
@click.option("--in-place", "-i", is_flag=True, help="Rewrite FILE instead of printing.")
@click.option("--check", is_flag=True, help="Exit 1 (and print the diff) if FILE would change.")
def uninject(file: str, in_place: bool, check: bool) -> int:
    """Take meshlet out of a compose file: the services as they were before inject."""
    from compose.inject import uninject as run_uninject

    _modes(file, in_place, check)
    text = _read(file)
    result = run_uninject(text, source=file)
    for line in result.report:
        click.echo(line, err=True)
    return _finish("uninject", file, text, result.text, in_place, check)
