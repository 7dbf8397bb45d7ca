"""Fixtures shared by the unit and integration suites, and the no-skip rule of CI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from tests.fix_servers import in_ci
from tests.repository_contract import CutShort, once_at
from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.repository import TaskRepository


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true, a run that skipped any test fails: a skip must never look green."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not in_ci() or exitstatus != pytest.ExitCode.OK:
        return
    skipped = len(reporter.stats.get("skipped", []))
    if skipped:
        reporter.write_line(f"CI=true: {skipped} skipped test(s) fail the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture
def raw_engine(engine: Engine) -> Engine:
    """A sync engine on the suite's database, for raw SQL against the schema itself."""
    return engine


class Interrupted(BaseException):
    """A KeyboardInterrupt stand-in: a BaseException, but one that cannot stop pytest itself."""


def _interrupt() -> None:
    raise Interrupted


@pytest.fixture
def cut_short(engine: Engine) -> CutShort:
    """Cut a sync call short: the next event of a name on ``engine`` raises :class:`Interrupted`."""
    return CutShort(Interrupted, lambda event_name: once_at(engine, event_name, _interrupt))
