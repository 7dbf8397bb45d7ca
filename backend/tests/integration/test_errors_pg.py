"""Database errors on PostgreSQL reach repository callers as the package's errors, on both faces.

A deadlock between two ``atomic()`` blocks and a read-only database are real; other
SQLSTATEs come from a trigger that raises the code a task's title names, so each
passes through the real server and drivers (psycopg2, psycopg 3) as translate sees it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.integration.databases import fresh_database
from todo_backend import (
    DatabaseConflictError,
    DatabaseStatementError,
    DatabaseUnavailableError,
    Settings,
    TaskCreate,
    TaskRepository,
    TaskUpdate,
    TodoBackendError,
    create_db_engine,
)
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.models import Task

ALICE = "alice"
_LIVENESS = 60.0  # seconds; only a bound on a hung test, never a measured time

# Raises the SQLSTATE after "raise " in a new task's title, with a DETAIL line.
_RAISING_TRIGGER = (
    """
    CREATE FUNCTION raise_from_title() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.title LIKE 'raise %' THEN
            RAISE EXCEPTION 'simulated failure' USING
                ERRCODE = substr(NEW.title, 7), DETAIL = 'detail-sentinel';
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER raise_from_title BEFORE INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION raise_from_title()
    """,
)

_BY_CODE = [
    ("40001", DatabaseConflictError),
    ("40P01", DatabaseConflictError),
    ("25006", DatabaseUnavailableError),
    ("53100", DatabaseUnavailableError),
    ("53200", DatabaseUnavailableError),
    ("23514", DatabaseStatementError),
    ("42501", DatabaseStatementError),
    ("XX000", DatabaseStatementError),
]


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def raising_engine(module_engine: Engine) -> Engine:
    """The module's engine, its tasks table carrying the SQLSTATE-raising trigger."""
    with module_engine.begin() as conn:
        for statement in _RAISING_TRIGGER:
            conn.execute(text(statement))
    return module_engine


@pytest.fixture(scope="module")
def read_only_url(admin_url: URL) -> Iterator[URL]:
    """A database whose transactions are read-only by default, with the tasks table."""
    with fresh_database(admin_url, settings={"default_transaction_read_only": "on"}) as url:
        setup = create_engine(url)
        try:
            with setup.begin() as conn:
                conn.execute(text("SET TRANSACTION READ WRITE"))
                SQLModel.metadata.create_all(conn, tables=[Task.__table__])  # type: ignore[attr-defined]
        finally:
            setup.dispose()
        yield url


def _check_translated(error: BaseException, kind: type[TodoBackendError]) -> None:
    """The error is exactly *kind*, caused by the driver's error, and hides parameters."""
    assert type(error) is kind
    assert isinstance(error.__cause__, DBAPIError)
    assert "param-sentinel" not in str(error)
    assert "detail-sentinel" not in str(error)


@pytest.mark.parametrize(("code", "kind"), _BY_CODE)
def test_sync_sqlstates_become_package_errors(
    raising_engine: Engine, code: str, kind: type[TodoBackendError]
) -> None:
    """Each SQLSTATE a write meets reaches the sync caller as its package error, SQLSTATE kept."""
    with Session(raising_engine) as session, pytest.raises(TodoBackendError) as raised:
        TaskRepository(session).create(
            ALICE, TaskCreate(title=f"raise {code}", description="param-sentinel")
        )
    _check_translated(raised.value, kind)
    if kind is not DatabaseUnavailableError:
        assert raised.value.sqlstate == code  # type: ignore[attr-defined]
        assert code in str(raised.value)


@pytest.mark.parametrize(("code", "kind"), _BY_CODE)
def test_async_sqlstates_become_package_errors(
    raising_engine: Engine, scratch_url: URL, code: str, kind: type[TodoBackendError]
) -> None:
    """Each SQLSTATE a write meets reaches the async caller as its package error, SQLSTATE kept."""

    async def create() -> None:
        engine = create_async_db_engine(_url_text(scratch_url))
        try:
            async with AsyncSession(engine) as session:
                await AsyncTaskRepository(session).create(
                    ALICE, TaskCreate(title=f"raise {code}", description="param-sentinel")
                )
        finally:
            await engine.dispose()

    with pytest.raises(TodoBackendError) as raised:
        asyncio.run(create())
    _check_translated(raised.value, kind)
    if kind is not DatabaseUnavailableError:
        assert raised.value.sqlstate == code  # type: ignore[attr-defined]


def test_sync_write_to_read_only_database_is_unavailable(read_only_url: URL) -> None:
    """A write to a read-only database is DatabaseUnavailableError saying so; reads still work."""
    engine = create_db_engine(_url_text(read_only_url))
    try:
        with Session(engine) as session:
            repo = TaskRepository(session)
            with pytest.raises(DatabaseUnavailableError, match="read-only") as raised:
                repo.create(ALICE, TaskCreate(title="t", description="param-sentinel"))
            assert repo.count(ALICE) == 0
    finally:
        engine.dispose()
    _check_translated(raised.value, DatabaseUnavailableError)


def test_async_write_to_read_only_database_is_unavailable(read_only_url: URL) -> None:
    """The async face reports a write to a read-only database as DatabaseUnavailableError."""

    async def create() -> None:
        engine = create_async_db_engine(_url_text(read_only_url))
        try:
            async with AsyncSession(engine) as session:
                await AsyncTaskRepository(session).create(ALICE, TaskCreate(title="t"))
        finally:
            await engine.dispose()

    with pytest.raises(DatabaseUnavailableError, match="read-only") as raised:
        asyncio.run(create())
    _check_translated(raised.value, DatabaseUnavailableError)


def _two_tasks(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        repo = TaskRepository(session)
        first = repo.create(ALICE, TaskCreate(title="first")).id
        second = repo.create(ALICE, TaskCreate(title="second")).id
    assert first is not None
    assert second is not None
    return first, second


def _deadlock_settings(url: URL) -> Settings:
    # The lock bound well above the server's deadlock_timeout (1 s by default): the
    # deadlock detector, not DB_LOCK_TIMEOUT, ends the wait.
    return Settings(database_url=_url_text(url), lock_timeout=120, statement_timeout=120)


def test_sync_deadlock_between_atomic_blocks_is_a_conflict(
    engine: Engine, scratch_url: URL
) -> None:
    """Two blocks updating two tasks in opposite order: one commits, one is a conflict."""
    first, second = _two_tasks(engine)
    locked = threading.Barrier(2, timeout=_LIVENESS)
    outcomes: dict[str, BaseException | None] = {}
    deadlock_engine = create_db_engine(_deadlock_settings(scratch_url))

    def block(name: str, ids: tuple[int, int]) -> None:
        try:
            with Session(deadlock_engine) as session:
                repo = TaskRepository(session)
                with repo.atomic():
                    repo.update(ALICE, ids[0], TaskUpdate(title=name))
                    locked.wait()
                    repo.update(ALICE, ids[1], TaskUpdate(title=name))
            outcomes[name] = None
        except BaseException as err:  # noqa: BLE001 - recorded and checked below
            outcomes[name] = err

    threads = [
        threading.Thread(target=block, args=("a", (first, second))),
        threading.Thread(target=block, args=("b", (second, first))),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(_LIVENESS)
    finally:
        deadlock_engine.dispose()
    errors = [err for err in outcomes.values() if err is not None]
    assert len(outcomes) == 2
    assert len(errors) == 1, outcomes
    assert isinstance(errors[0], DatabaseConflictError), repr(errors[0])
    assert errors[0].sqlstate == "40P01"
    _check_translated(errors[0], DatabaseConflictError)
    winner = next(name for name, err in outcomes.items() if err is None)
    with Session(engine) as session:
        titles = {task.title for task in TaskRepository(session).list(ALICE)}
    assert titles == {winner}


def test_async_deadlock_between_atomic_blocks_is_a_conflict(
    engine: Engine, scratch_url: URL
) -> None:
    """On the async face too, one of two crossing blocks commits and one is a conflict."""
    first, second = _two_tasks(engine)

    async def both() -> tuple[BaseException | None, BaseException | None]:
        async_engine = create_async_db_engine(_deadlock_settings(scratch_url))
        locked = asyncio.Barrier(2)

        async def block(name: str, ids: tuple[int, int]) -> None:
            async with AsyncSession(async_engine) as session:
                repo = AsyncTaskRepository(session)
                async with repo.atomic():
                    await repo.update(ALICE, ids[0], TaskUpdate(title=name))
                    await locked.wait()
                    await repo.update(ALICE, ids[1], TaskUpdate(title=name))

        try:
            return await asyncio.wait_for(
                asyncio.gather(
                    block("a", (first, second)),
                    block("b", (second, first)),
                    return_exceptions=True,
                ),
                _LIVENESS,
            )
        finally:
            await async_engine.dispose()

    outcomes = asyncio.run(both())
    errors = [err for err in outcomes if err is not None]
    assert len(errors) == 1, outcomes
    assert isinstance(errors[0], DatabaseConflictError), repr(errors[0])
    assert errors[0].sqlstate == "40P01"
    _check_translated(errors[0], DatabaseConflictError)
