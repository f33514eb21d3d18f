"""Shared test setup.

This directory has no ``__init__.py``; pytest puts it on ``sys.path`` for this conftest,
so test modules in every subfolder can ``import certs_helpers``.
"""
