"""Fixtures shared by the unit and integration suites."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

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


@pytest.fixture
def repo_on() -> Callable[[Session], TaskRepository]:
    """Make a repository on a given session."""
    return TaskRepository


@pytest.fixture
def open_repo(engine: Engine) -> Callable[[], TaskRepository]:
    """Make a repository on a fresh session of the suite's engine."""
    return lambda: TaskRepository(next(get_session(engine)))


@pytest.fixture
def repo_in_outer_transaction(
    engine: Engine,
) -> Callable[[], AbstractContextManager[TaskRepository]]:
    """Make a repository on a session bound to a Connection whose transaction is rolled back."""

    @contextmanager
    def bound() -> Iterator[TaskRepository]:
        with engine.connect() as conn:
            outer = conn.begin()
            with Session(
                bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            ) as session:
                yield TaskRepository(session)
            outer.rollback()

    return bound
