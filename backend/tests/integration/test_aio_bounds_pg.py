"""Bounded waits on the async face: the same bounds, the same DatabaseTimeoutError.

The async engine sets the statement, lock and idle-in-transaction bounds in a
transaction's first statement's own message too (psycopg 3 with client-side binding),
so they hold directly and through PgBouncer in transaction mode. Targets and helpers are those of
test_bounds_pg.py: the server under test directly, or a throwaway cluster behind
PgBouncer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.async_face import open_session, runner
from tests.integration.test_bounds_pg import (
    ALICE,
    LONG,
    PAST_TINY,
    TINY,
    Target,
    _locked_row,
    _titles,
    idle_target,
    made,
    target,
)
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.config import Settings
from todo_backend.errors import DatabaseTimeoutError
from todo_backend.models import TaskCreate, TaskUpdate

__all__ = ["idle_target", "made", "runner", "target"]  # fixtures


@pytest.fixture
def async_made(runner: asyncio.Runner) -> Iterator[list[AsyncEngine]]:
    """Async engines a test makes, disposed afterwards on the test's loop."""
    engines: list[AsyncEngine] = []
    yield engines
    for engine in engines:
        runner.run(engine.dispose())


def _engine(target: Target, made: list[AsyncEngine], **bounds: float) -> AsyncEngine:
    settings = Settings(
        database_url=target.url.render_as_string(hide_password=False),
        **bounds,  # type: ignore[arg-type]
    )
    engine = create_async_db_engine(settings)
    made.append(engine)
    return engine


def test_a_locked_row_raises_the_lock_bound(
    target: Target, made: list[Engine], async_made: list[AsyncEngine], runner: asyncio.Runner
) -> None:
    """An awaited update of a row another transaction holds fails at DB_LOCK_TIMEOUT."""
    engine = _engine(target, async_made, lock_timeout=TINY, statement_timeout=LONG)

    async def create() -> int:
        session, _ = await open_session(engine)
        task = await AsyncTaskRepository(session).create(ALICE, TaskCreate(title="before"))
        return task.id or 0

    async def update(task_id: int) -> None:
        session, _ = await open_session(engine)
        await AsyncTaskRepository(session).update(ALICE, task_id, TaskUpdate(title="after"))

    task_id = runner.run(create())
    with _locked_row(target, made, task_id), pytest.raises(DatabaseTimeoutError) as caught:
        runner.run(update(task_id))
    assert caught.value.bound == "DB_LOCK_TIMEOUT"
    assert _titles(target, made) == ["before"]
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_any_statement_carries_the_statement_bound(
    target: Target, async_made: list[AsyncEngine], runner: asyncio.Runner
) -> None:
    """A statement of the async engine still running at DB_STATEMENT_TIMEOUT is cancelled."""
    engine = _engine(target, async_made, statement_timeout=TINY)

    async def sleep() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": PAST_TINY})

    with pytest.raises(Exception, match="statement timeout"):
        runner.run(sleep())


def test_an_idle_atomic_block_raises_the_idle_bound(
    idle_target: Target, made: list[Engine], async_made: list[AsyncEngine], runner: asyncio.Runner
) -> None:
    """An async block idle past DB_IDLE_IN_TRANSACTION_TIMEOUT stores nothing of itself."""
    engine = _engine(idle_target, async_made, idle_in_transaction_timeout=TINY)

    async def stalled_block() -> None:
        session, _ = await open_session(engine)
        repo = AsyncTaskRepository(session)
        async with repo.atomic():
            await repo.create(ALICE, TaskCreate(title="first"))
            await asyncio.sleep(PAST_TINY)  # a slow upstream call inside the block
            await repo.create(ALICE, TaskCreate(title="second"))

    with pytest.raises(DatabaseTimeoutError) as caught:
        runner.run(stalled_block())
    assert caught.value.bound == "DB_IDLE_IN_TRANSACTION_TIMEOUT"
    assert _titles(idle_target, made) == []


def test_an_async_block_idle_before_its_commit_stores_nothing(
    idle_target: Target, made: list[Engine], async_made: list[AsyncEngine], runner: asyncio.Runner
) -> None:
    """An async block that stalls after its last statement fails at COMMIT with the idle bound."""
    engine = _engine(idle_target, async_made, idle_in_transaction_timeout=TINY)

    async def stalled_block() -> None:
        session, _ = await open_session(engine)
        repo = AsyncTaskRepository(session)
        try:
            async with repo.atomic():
                await repo.create(ALICE, TaskCreate(title="only"))
                await asyncio.sleep(PAST_TINY)
        finally:
            await session.close()

    with pytest.raises(DatabaseTimeoutError) as caught:
        runner.run(stalled_block())
    assert caught.value.bound == "DB_IDLE_IN_TRANSACTION_TIMEOUT"
    assert _titles(idle_target, made) == []
