"""Shared pytest fixtures.

The keepstore fixtures live in ``keepstore_fixture.py`` (see its docstring):
``keepstore_factory``, ``keepstore``, ``keepstore_signed``, ``keepstores3``.
"""

from keepstore_fixture import keepstore, keepstore_factory, keepstore_signed, keepstores3  # noqa: F401
