"""pytest-alembic's built-in migration tests on PostgreSQL, beside the project's own.

Single head, upgrade from base to head step by step, every downgrade back to base
after an upgrade, and the models matching what the migrations create (as alembic's
autogenerate compares them), each on the module's scratch database, emptied first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.config import Config
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

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
def alembic_engine(scratch_url: URL) -> Iterator[Engine]:
    """The package's engine on the scratch database with an empty public schema."""
    admin = create_engine(scratch_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    admin.dispose()
    engine = create_db_engine(scratch_url.render_as_string(hide_password=False))
    yield engine
    engine.dispose()
