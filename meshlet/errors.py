"""The one error tree. Foreign errors are translated where they enter.

A user-facing error says what was wrong, with which input, and what to do. The CLI
prints ``str(error)`` as one line and exits with ``error.exit_code``.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error meshlet raises on purpose."""

    exit_code = 1


class InputError(MeshError):
    """The user's input (a flag, a file, a value) is wrong. Nothing was changed."""

    exit_code = 2


class NotFoundError(InputError):
    """A named thing (file, directory, service) does not exist."""


class ConflictError(MeshError):
    """The request is well formed but the current state refuses it. Nothing was changed."""


class CertificateError(MeshError):
    """A certificate or key could not be used (wrong type, unparseable, mismatched)."""

    exit_code = 2
