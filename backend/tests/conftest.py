"""Fixtures shared by the unit and integration suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.repository import TaskRepository


@pytest.fixture
def sqlite_engine() -> Iterator[Engine]:
    """A fresh in-memory SQLite database with the schema, disposed afterwards."""
    engine = create_db_engine("sqlite://")
    init_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on the suite's ``engine`` fixture, opened the way the API will."""
    yield from get_session(engine)


@pytest.fixture
def repo(session: Session) -> TaskRepository:
    """A repository on the suite's session."""
    return TaskRepository(session)
