"""Write a set of files so that a crash leaves either all of them or none.

Every file is written to a temporary name beside its target, fsynced, and only then
renamed into place; the directory is fsynced last. A failure before the renames
leaves the directory as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from meshlet.errors import InputError

SECRET = 0o600
PUBLIC = 0o644


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or tighten an existing one to 0700."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory: choose another path")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:  # permission denied, a parent that is a file, a read-only disk...
        raise InputError(f"cannot create or use directory {path}: {e.strerror}") from e


def write_files(
    directory: Path,
    files: Mapping[str, tuple[bytes, int]],
    *,
    remove: Iterable[str] = (),
) -> None:
    """Atomically install ``files`` (name → (content, mode)) and remove ``remove``."""
    for name in files:
        if (directory / name).is_dir():
            raise InputError(f"{directory / name} is a directory: move it away and run this again")
    staged: list[tuple[Path, Path]] = []
    try:
        for name, (content, mode) in files.items():
            target = directory / name
            tmp = directory / f".{name}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
    except OSError as e:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise InputError(f"cannot write to {directory}: {e.strerror}") from e
    for tmp, target in staged:
        os.replace(tmp, target)
    for name in remove:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_file(path: Path, *, what: str) -> bytes:
    """Read ``path``; a missing or unreadable file is an InputError naming it and ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise InputError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror}") from None
