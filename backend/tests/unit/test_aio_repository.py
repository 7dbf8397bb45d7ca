"""AsyncTaskRepository on in-memory SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.async_face import (
    AsyncBoundToTheEngine,
    AsyncRepositoryContract,
    create_schema,
    open_session,
    runner,
)
from tests.repository_contract import _next_statement_fails
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.errors import TodoBackendError
from todo_backend.models import TaskCreate

__all__ = ["runner"]


class TestAsyncRepositoryOnSQLite(AsyncRepositoryContract):
    """The shared repository contract, on AsyncTaskRepository over aiosqlite."""

    @pytest.fixture
    def async_url(self, tmp_path: Path) -> str:
        """A fresh database file per test (a sync engine reaches it too, unlike memory)."""
        return f"sqlite:///{tmp_path / 'tasks.db'}"


class TestAsyncRepositoryBoundToTheEngineOnSQLite(
    AsyncBoundToTheEngine, TestAsyncRepositoryOnSQLite
):
    """The shared contract on aiosqlite, the async repositories bound to the engine."""


@pytest.fixture
def async_repo(runner: asyncio.Runner) -> Iterator[AsyncTaskRepository]:
    """An async repository on a fresh in-memory database."""
    engine = create_async_db_engine("sqlite://")
    runner.run(create_schema(engine))
    session, _ = runner.run(open_session(engine))
    yield AsyncTaskRepository(session)
    runner.run(session.close())
    runner.run(engine.dispose())


def test_atomic_is_an_async_context_manager(
    runner: asyncio.Runner, async_repo: AsyncTaskRepository
) -> None:
    """``async with repo.atomic()`` commits together, or rolls back every call of the block."""

    async def rolled_back_block() -> None:
        async with async_repo.atomic():
            await async_repo.create("alice", TaskCreate(title="rolled back"))
            raise LookupError

    async def scenario() -> list[str]:
        async with async_repo.atomic() as block:
            assert block is async_repo
            await async_repo.create("alice", TaskCreate(title="one"))
            await async_repo.create("alice", TaskCreate(title="two"))
        with pytest.raises(LookupError):
            await rolled_back_block()
        return [task.title for task in await async_repo.list("alice")]

    assert runner.run(scenario()) == ["two", "one"]


def test_a_caught_failure_fails_the_async_block(
    runner: asyncio.Runner, async_repo: AsyncTaskRepository
) -> None:
    """A failed call inside ``async with atomic()`` rolls the block back even if caught."""

    async def block_with_a_caught_failure() -> None:
        async with async_repo.atomic():
            await async_repo.create("alice", TaskCreate(title="lost"))
            with contextlib.suppress(Exception), _next_statement_fails(_engine(async_repo)):
                await async_repo.count("alice")

    async def scenario() -> int:
        with pytest.raises(TodoBackendError, match="rolled back"):
            await block_with_a_caught_failure()
        return await async_repo.count("alice")

    assert runner.run(scenario()) == 0


def test_argument_errors_match_the_sync_repository(
    runner: asyncio.Runner, async_repo: AsyncTaskRepository
) -> None:
    """Wrong argument types raise the same TypeErrors as TaskRepository, before any SQL."""
    for bad in ("1", 1.0, True):
        with pytest.raises(TypeError, match="task_id"):
            runner.run(async_repo.get("alice", bad))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="limit"):
        runner.run(async_repo.list("alice", limit="5"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="complete"):
        runner.run(async_repo.count("alice", complete="yes"))  # type: ignore[arg-type]


def test_concurrent_coroutines_with_their_own_sessions(
    runner: asyncio.Runner, tmp_path: Path
) -> None:
    """Coroutines running at once, each on its own session, all store their tasks."""
    engine = create_async_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}")

    async def one(user: str) -> None:
        async for session in get_async_session(engine):
            await AsyncTaskRepository(session).create(user, TaskCreate(title="t"))

    async def scenario() -> list[int]:
        await create_schema(engine)
        await asyncio.gather(*(one(f"user{i % 5}") for i in range(50)))
        async for session in get_async_session(engine):
            repo = AsyncTaskRepository(session)
            return [await repo.count(f"user{i}") for i in range(5)]
        return []

    try:
        assert runner.run(scenario()) == [10] * 5
    finally:
        runner.run(engine.dispose())


def _engine(repo: AsyncTaskRepository) -> Engine:
    return repo._session.sync_session.get_bind()  # type: ignore[return-value,union-attr]


def test_tasks_started_inside_an_engine_bound_block_are_refused_clearly(
    runner: asyncio.Runner,
) -> None:
    """gather() inside a block: an overlapping call is refused, and the block fails whole."""
    engine = create_async_db_engine("sqlite://")
    runner.run(create_schema(engine))
    repo = AsyncTaskRepository(engine)
    results: list[object] = []

    async def gathered() -> None:
        async with repo.atomic():
            children = (repo.create("alice", TaskCreate(title="child")) for _ in "ab")
            results.extend(await asyncio.gather(*children, return_exceptions=True))

    try:
        with pytest.raises(TodoBackendError, match="rolled back"):
            runner.run(gathered())
        refused = [r for r in results if isinstance(r, TodoBackendError)]
        assert len(refused) == 1
        assert "one at a time" in str(refused[0])
        assert runner.run(repo.list("alice")) == []
    finally:
        runner.run(engine.dispose())
