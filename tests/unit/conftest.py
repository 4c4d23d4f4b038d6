"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def path(tmp_path):
    """A buffer file's path in the test's own folder (not created)."""
    return str(tmp_path / "buffer.db")
