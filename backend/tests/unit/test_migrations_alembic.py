"""pytest-alembic's built-in migration tests on SQLite, beside the project's own.

Single head, upgrade from base to head step by step, every downgrade back to base
after an upgrade, and the models matching what the migrations create (as alembic's
autogenerate compares them), each on a fresh SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.config import Config
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine

from todo_backend import migrate
from todo_backend.db import create_db_engine

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]


@pytest.fixture
def alembic_config() -> Config:
    """The package's own alembic config: its scripts, its env.py, no ini file."""
    return migrate.alembic_config()


@pytest.fixture
def alembic_engine(tmp_path: Path) -> Iterator[Engine]:
    """The package's engine on a new SQLite file, which env.py migrates."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'alembic.db'}")
    yield engine
    engine.dispose()
