"""The shared repository contract, run against AsyncTaskRepository.

The contract is written as plain calls; :class:`AwaitedRepository` awaits each call
of an :class:`AsyncTaskRepository` on the test's own event loop, so the very same
tests check the async face. :class:`AsyncRepositoryContract` swaps the contract's
fixtures for async ones; a suite subclasses it and provides ``async_url``: the URL
of a database whose ``tasks`` table is empty or missing, which a sync engine can
reach too (raw SQL checks of the schema use one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.repository_contract import CutShort, RepositoryContract, once_at
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import create_db_engine
from todo_backend.models import Task

_T = TypeVar("_T")


class AwaitedRepository:
    """A blocking view of an AsyncTaskRepository: each method call is awaited to its end."""

    def __init__(self, repo: AsyncTaskRepository, runner: asyncio.Runner) -> None:
        self.repo = repo
        self._runner = runner

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.repo, name)
        return lambda *args, **kwargs: self._runner.run(method(*args, **kwargs))

    @contextmanager
    def atomic(self) -> Iterator[AwaitedRepository]:
        """``async with repo.atomic()`` entered and left on the runner's loop."""
        block = self.repo.atomic()
        self._runner.run(block.__aenter__())
        try:
            yield self
        except BaseException as err:
            if not self._runner.run(block.__aexit__(type(err), err, err.__traceback__)):
                raise
        else:
            self._runner.run(block.__aexit__(None, None, None))


class AwaitedSession:
    """A blocking view of an AsyncSession, for the contract's few direct session uses."""

    def __init__(self, session: AsyncSession, runner: asyncio.Runner) -> None:
        self.session = session
        self._runner = runner

    def __contains__(self, item: object) -> bool:
        return item in self.session

    def in_transaction(self) -> bool:
        """Whether the session has a transaction open."""
        return self.session.in_transaction()

    def execute(self, statement: Any) -> Any:
        """Await the session's exec (SQLModel's name for execute)."""
        return self._runner.run(self.session.exec(statement))

    def add(self, instance: object) -> None:
        """AsyncSession.add (no I/O)."""
        self.session.add(instance)

    def commit(self) -> None:
        """Await AsyncSession.commit."""
        self._runner.run(self.session.commit())

    def rollback(self) -> None:
        """Await AsyncSession.rollback."""
        self._runner.run(self.session.rollback())

    def close(self) -> None:
        """Await AsyncSession.close."""
        self._runner.run(self.session.close())


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tasks table through *engine* when missing (like init_db)."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all, tables=[Task.__table__])  # type: ignore[attr-defined]


async def open_session(engine: AsyncEngine) -> tuple[AsyncSession, AsyncIterator[AsyncSession]]:
    """Open a session through get_async_session, as FastAPI would; return it and its generator."""
    sessions = get_async_session(engine)
    return await anext(sessions), sessions


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """An event loop for the test, closed afterwards."""
    with asyncio.Runner() as loop:
        yield loop


class AsyncRepositoryContract(RepositoryContract):
    """The shared contract with AsyncTaskRepository behind the ``repo`` fixtures."""

    @pytest.fixture
    def async_engine(self, runner: asyncio.Runner, async_url: str) -> Iterator[AsyncEngine]:
        """The package's async engine on ``async_url``, schema present."""
        engine = create_async_db_engine(async_url)
        runner.run(create_schema(engine))
        yield engine
        runner.run(engine.dispose())

    @pytest.fixture
    def raw_engine(self, async_engine: AsyncEngine, async_url: str) -> Iterator[Engine]:
        """A sync engine on the same database (schema made), for raw SQL in the contract."""
        engine = create_db_engine(async_url)
        yield engine
        engine.dispose()

    @pytest.fixture
    def engine(self, async_engine: AsyncEngine) -> Engine:
        """The async engine's sync core: where the contract listens for statements."""
        return async_engine.sync_engine

    @pytest.fixture
    def session(
        self, runner: asyncio.Runner, async_engine: AsyncEngine
    ) -> Iterator[AwaitedSession]:
        """An async session opened through get_async_session."""
        session, sessions = runner.run(open_session(async_engine))
        yield AwaitedSession(session, runner)
        runner.run(_finish(sessions))

    @pytest.fixture
    def repo_on(self, runner: asyncio.Runner) -> Callable[[AwaitedSession], AwaitedRepository]:
        """Make an async repository on a given session."""
        return lambda session: AwaitedRepository(AsyncTaskRepository(session.session), runner)

    @pytest.fixture
    def repo(
        self,
        session: AwaitedSession,
        repo_on: Callable[[AwaitedSession], AwaitedRepository],
    ) -> AwaitedRepository:
        """An async repository on the test's session."""
        return repo_on(session)

    @pytest.fixture
    def open_repo(
        self, runner: asyncio.Runner, async_engine: AsyncEngine
    ) -> Callable[[], AwaitedRepository]:
        """Make an async repository on a fresh session."""

        def make() -> AwaitedRepository:
            session, _ = runner.run(open_session(async_engine))
            return AwaitedRepository(AsyncTaskRepository(session), runner)

        return make

    @pytest.fixture
    def repo_in_outer_transaction(
        self, runner: asyncio.Runner, async_engine: AsyncEngine
    ) -> Callable[[], AbstractContextManager[AwaitedRepository]]:
        """Make an async repository on a session bound to a rolled-back AsyncConnection."""

        @contextmanager
        def bound() -> Iterator[AwaitedRepository]:
            conn, outer = runner.run(_begin(async_engine))
            session = AsyncSession(
                bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
            try:
                yield AwaitedRepository(AsyncTaskRepository(session), runner)
            finally:
                runner.run(_close_all(session.close(), outer.rollback(), conn.close()))

        return bound

    @pytest.fixture
    def cut_short(self, engine: Engine) -> CutShort:
        """Cancel an awaited call at an event: the cancellation lands at the driver's next await."""
        return CutShort(
            asyncio.CancelledError, lambda event_name: once_at(engine, event_name, _cancel_task)
        )


class AsyncBoundToTheEngine:
    """Mixed into an async contract suite: repositories bound to the async engine."""

    @pytest.fixture
    def repo(self, runner: asyncio.Runner, async_engine: AsyncEngine) -> AwaitedRepository:
        """An async repository bound to the suite's engine."""
        return AwaitedRepository(AsyncTaskRepository(async_engine), runner)

    @pytest.fixture
    def open_repo(
        self, runner: asyncio.Runner, async_engine: AsyncEngine
    ) -> Callable[[], AwaitedRepository]:
        """Make another async repository bound to the suite's engine."""
        return lambda: AwaitedRepository(AsyncTaskRepository(async_engine), runner)


def _cancel_task() -> None:
    task = asyncio.current_task()  # the call's task: the greenlet runs inside it
    assert task is not None
    task.cancel()


async def _finish(sessions: AsyncIterator[AsyncSession]) -> None:
    async for _ in sessions:  # runs get_async_session to its end, closing the session
        pass


async def _begin(engine: AsyncEngine) -> tuple[AsyncConnection, AsyncTransaction]:
    conn = await engine.connect()
    return conn, await conn.begin()


async def _close_all(*steps: Awaitable[Any]) -> None:
    for step in steps:
        await step
