"""The async engine as an ordinary SQLAlchemy/SQLModel engine, directly and through PgBouncer.

test_engine_compat_pg.py for ``create_async_db_engine`` (psycopg 3), written as async
code uses it: ``AsyncSession``, ``AsyncConnection``, ``stream()``. The same targets:
the server under test, or a throwaway cluster behind PgBouncer.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.async_face import runner
from tests.integration.test_aio_bounds_pg import _engine, async_made
from tests.integration.test_bounds_pg import ALICE, PAST_TINY, TINY, Target, _titles, made, target
from tests.integration.test_engine_compat_pg import (
    _INSERT_ROW,
    BEFORE_ANY_QUERY,
    BOUNDS,
    SHOWN,
    rows,
)
from todo_backend.aio import AsyncTaskRepository
from todo_backend.models import Task, TaskCreate, utc_now

__all__ = ["async_made", "made", "runner", "target"]  # fixtures


@pytest.fixture
def compat(target: Target, async_made: list[AsyncEngine]) -> AsyncEngine:
    """The package's async engine on the target, with bounds the tests can recognise."""
    return _engine(target, async_made, **BOUNDS)


async def shown(conn: AsyncConnection) -> dict[str, str]:
    """The three bounds as the server applies them to the current transaction."""
    return {name: str((await conn.execute(text(f"SHOW {name}"))).scalar_one()) for name in SHOWN}


def test_begin_nested_recovers_from_an_integrity_error(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """After an IntegrityError in a savepoint the transaction goes on, still bounded."""

    async def scenario() -> None:
        async with AsyncSession(compat, expire_on_commit=False) as session:
            first = Task(user_id=ALICE, title="first")
            session.add(first)
            await session.commit()
        async with AsyncSession(compat) as session:
            with pytest.raises(IntegrityError):  # noqa: PT012
                async with session.begin_nested():
                    session.add(Task(id=first.id, user_id=ALICE, title="duplicate"))
                    await session.flush()
            assert await shown(await session.connection()) == SHOWN
            session.add(Task(user_id=ALICE, title="second"))
            await session.commit()

    runner.run(scenario())
    assert sorted(_titles(target, made)) == ["first", "second"]


def test_the_create_savepoint_fixture_pattern_runs_repository_calls(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """A test session joined to an outer transaction recovers from errors and leaves nothing."""

    async def scenario() -> None:
        async with compat.connect() as connection:
            outer = await connection.begin()
            session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint")
            repo = AsyncTaskRepository(session)
            kept = await repo.create(ALICE, TaskCreate(title="kept"))
            session.add(Task(id=kept.id, user_id=ALICE, title="duplicate"))
            with pytest.raises(IntegrityError):
                await session.flush()
            await session.rollback()
            await repo.create(ALICE, TaskCreate(title="after"))
            assert [t.title for t in await repo.list(ALICE)] == ["after", "kept"]
            assert await shown(await session.connection()) == SHOWN
            await session.close()
            await outer.rollback()

    runner.run(scenario())
    assert _titles(target, made) == []


def test_an_orm_flush_of_several_changed_rows(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """Changing several loaded rows and committing updates all of them (an executemany)."""

    async def scenario() -> None:
        async with AsyncSession(compat) as session:
            repo = AsyncTaskRepository(session)
            for title in ("a", "b", "c"):
                await repo.create(ALICE, TaskCreate(title=title))
        async with AsyncSession(compat) as session:
            for task in await session.exec(select(Task).where(col(Task.user_id) == ALICE)):
                task.title = task.title.upper()
            await session.commit()

    runner.run(scenario())
    assert sorted(_titles(target, made)) == ["A", "B", "C"]


def test_executemany_of_a_text_statement(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """execute(text(...), [params, ...]) runs first in a transaction and later, bounded."""

    async def scenario() -> None:
        async with compat.begin() as conn:
            await conn.execute(_INSERT_ROW, rows("a", "b"))
            assert await shown(conn) == SHOWN
            await conn.execute(_INSERT_ROW, rows("c", "d"))

    runner.run(scenario())
    assert sorted(_titles(target, made)) == ["a", "b", "c", "d"]


def test_a_bulk_orm_insert(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """session.exec(insert(Task), params=[...]) stores every row (a bulk ORM insert)."""
    now = utc_now()
    values = [
        {
            "user_id": ALICE,
            "title": f"t{i}",
            "complete": False,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(5)
    ]

    async def scenario() -> None:
        async with AsyncSession(compat) as session:
            await session.exec(insert(Task), params=values)
            await session.commit()

    runner.run(scenario())
    assert sorted(_titles(target, made)) == [f"t{i}" for i in range(5)]


def test_stream_results_returns_every_row(compat: AsyncEngine, runner: asyncio.Runner) -> None:
    """AsyncConnection.stream() fetches the rows in batches as the caller asks for them."""

    async def scenario() -> list[str]:
        async with AsyncSession(compat) as session:
            await AsyncTaskRepository(session).create_many(
                ALICE, [TaskCreate(title=f"t{i}") for i in range(7)]
            )
        async with compat.connect() as conn:
            streaming = await conn.execution_options(yield_per=2)
            result = await streaming.stream(
                text("SELECT title FROM tasks WHERE user_id = :u ORDER BY id"), {"u": ALICE}
            )
            return [title async for title in result.scalars()]

    assert runner.run(scenario()) == [f"t{i}" for i in range(7)]


def test_stream_results_is_bounded(
    target: Target, async_made: list[AsyncEngine], runner: asyncio.Runner
) -> None:
    """A streamed statement first in its transaction still runs under the statement bound."""
    engine = _engine(target, async_made, statement_timeout=TINY)

    async def scenario() -> None:
        async with engine.connect() as conn:
            result = await conn.stream(text("SELECT pg_sleep(:s)"), {"s": PAST_TINY})
            await result.all()

    with pytest.raises(DBAPIError, match="statement timeout"):
        runner.run(scenario())


def test_vacuum_and_create_index_concurrently_in_autocommit(
    compat: AsyncEngine, runner: asyncio.Runner
) -> None:
    """Statements that refuse a transaction block run on an autocommit connection."""

    async def scenario() -> None:
        async with compat.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text("VACUUM tasks"))
            await auto.execute(text("CREATE INDEX CONCURRENTLY compat_title ON tasks (title)"))
            await auto.execute(text("DROP INDEX CONCURRENTLY compat_title"))

    runner.run(scenario())


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_a_callers_set_local_stands(
    compat: AsyncEngine, runner: asyncio.Runner, first: bool
) -> None:
    """A caller's SET LOCAL holds for the rest of its transaction, first statement or not."""

    async def scenario() -> dict[str, str]:
        async with compat.begin() as conn:
            if not first:
                await conn.execute(text("SELECT 1"))
            await conn.execute(text("SET LOCAL statement_timeout = '5s'"))
            await conn.execute(text("SELECT 1"))
            return await shown(conn)

    assert runner.run(scenario()) == {**SHOWN, "statement_timeout": "5s"}


def test_the_bounds_hold_for_a_callers_whole_transaction(
    compat: AsyncEngine, runner: asyncio.Runner
) -> None:
    """Every statement of a caller's transaction runs under the engine's bounds."""

    async def scenario() -> list[dict[str, str]]:
        async with compat.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await conn.execute(text("SELECT 2"))
            later = await shown(conn)
            async with conn.begin_nested():
                return [later, await shown(conn)]

    assert runner.run(scenario()) == [SHOWN, SHOWN]


@pytest.mark.parametrize("where", ["first", "later", "savepoint"])
def test_the_statement_bound_fires_on_a_callers_raw_statement(
    target: Target, async_made: list[AsyncEngine], runner: asyncio.Runner, where: str
) -> None:
    """A raw pg_sleep past DB_STATEMENT_TIMEOUT is cancelled wherever it sits in a transaction."""
    engine = _engine(target, async_made, statement_timeout=TINY)

    async def scenario() -> None:
        async with engine.connect() as conn:
            if where == "later":
                await conn.execute(text("SELECT 1"))
            if where == "savepoint":
                await conn.begin_nested()
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": PAST_TINY})

    with pytest.raises(DBAPIError, match="statement timeout"):
        runner.run(scenario())


@pytest.mark.parametrize(("statement", "name", "value"), BEFORE_ANY_QUERY)
def test_set_transaction_as_the_first_statement(
    compat: AsyncEngine, runner: asyncio.Runner, statement: str, name: str, value: str
) -> None:
    """SET TRANSACTION opens a caller's transaction as anywhere; the next statement is bounded."""

    async def scenario() -> tuple[dict[str, str], str]:
        async with compat.begin() as conn:
            await conn.execute(text(statement))
            bounds = await shown(conn)
            return bounds, (await conn.execute(text(f"SHOW {name}"))).scalar_one()

    assert runner.run(scenario()) == (SHOWN, value)


def test_a_transaction_imports_an_exported_snapshot(
    compat: AsyncEngine, target: Target, made: list[Engine], runner: asyncio.Runner
) -> None:
    """SET TRANSACTION SNAPSHOT after SET TRANSACTION ISOLATION LEVEL sees the exporter's data."""
    exporter = create_engine(target.direct)
    made.append(exporter)

    async def scenario(snapshot: str) -> dict[str, str]:
        async with compat.begin() as conn:
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            await conn.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            return await shown(conn)

    with exporter.connect() as source:
        source.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
        snapshot = source.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        assert runner.run(scenario(snapshot)) == SHOWN
        source.execute(text("ROLLBACK"))


def test_a_commented_rollback_to_savepoint_sends_the_bounds_again(
    compat: AsyncEngine, runner: asyncio.Runner
) -> None:
    """A comment before ROLLBACK TO SAVEPOINT hides nothing: the bounds it undid come back."""

    async def scenario() -> dict[str, str]:
        async with compat.begin() as conn:
            await conn.execute(text("SAVEPOINT s1"))
            await conn.execute(text("SELECT 1"))
            await conn.execute(text("/* undo */ ROLLBACK TO SAVEPOINT s1"))
            return await shown(conn)

    assert runner.run(scenario()) == SHOWN
