"""Fixtures of the label tests (defined in tests/support/labels.py, shared with the CLI tests)."""

from tests.support.labels import catalogue  # noqa: F401  (a fixture, found by pytest here)
