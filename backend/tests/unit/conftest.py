"""Unit tests run on in-memory SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine


@pytest.fixture
def engine(sqlite_engine: Engine) -> Engine:
    """The unit suites' database: in-memory SQLite."""
    return sqlite_engine
