"""Shared test setup.

This directory has no ``__init__.py``; pytest puts it on ``sys.path`` for this conftest,
so test modules in every subfolder can ``import certs_helpers``.
"""

from hypothesis import settings

# Property tests check correctness, not speed: on a shared 2-core CI machine an example can
# take seconds, which is not a failure (speed is measured in `make bench`).
settings.register_profile("meshlet", deadline=None)
settings.load_profile("meshlet")
