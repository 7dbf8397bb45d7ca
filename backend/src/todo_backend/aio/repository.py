"""AsyncTaskRepository: :class:`~todo_backend.TaskRepository` for async code, awaited.

The same calls, arguments, results, errors and round trips: every rule, statement
and decision comes from :mod:`todo_backend.repository_core`; this module only
awaits the I/O it asks for on an :class:`~sqlalchemy.ext.asyncio.AsyncSession`. A
statement is sent by the sync repository's own :func:`run_statement`, run in
SQLAlchemy's greenlet bridge (``greenlet_spawn``, as ``AsyncSession.run_sync`` runs
it) in one switch, the way SQLAlchemy's asyncio layer runs all of its sync core.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn

from todo_backend import repository_core as core
from todo_backend.direct import direct_statement
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import run_statement

__all__ = ["AsyncTaskRepository"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class AsyncTaskRepository:
    """Create, read, update and delete one user's tasks, on an async engine or session.

    The contract of :class:`~todo_backend.TaskRepository`, each method awaited and
    :meth:`atomic` used as ``async with``: user scoping, validation before any SQL,
    one statement and one round trip per single-task call, a read retried once on a
    dropped connection, a write never retried, the same errors. Bound to an
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, a call borrows a pooled connection
    for its statement and an :meth:`atomic` block opens a session of its own for its
    duration (what :func:`~todo_backend.fastapi.repository_dependency` gives each
    request); such a repository may be shared by concurrent tasks, each ``atomic()``
    block belonging to the task that opened it. A repository bound to a session
    serves one task at a time, like the ``AsyncSession``.
    """

    def __init__(self, session_or_engine: AsyncSession | AsyncEngine) -> None:
        self._session: AsyncSession | None
        if isinstance(session_or_engine, AsyncEngine):
            self._session = None
            self._engine: AsyncEngine | None = session_or_engine
        else:
            self._session = session_or_engine
            bind = session_or_engine.bind
            self._engine = bind if isinstance(bind, AsyncEngine) else None
        self._sync_engine = None if self._engine is None else self._engine.sync_engine
        self._pooled = self._engine is not None

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[AsyncTaskRepository]:
        """Run the calls inside ``async with repo.atomic():`` in one transaction.

        All apply, or none; nested blocks and other repositories on the same session
        join the outer block, and the block fails as a whole (a failed call or a
        nested block that raised, even if caught; no savepoints), exactly as
        :meth:`TaskRepository.atomic`. A repository bound to an engine opens a session
        for its outermost block and closes it after; the block belongs to the task that
        opened it (and to tasks it starts inside the block, whose calls must not
        overlap: an overlapping one raises :class:`TodoBackendError`), so other tasks
        sharing the repository stay out of it. A call cancelled inside the block
        (``asyncio.wait_for``, ``Task.cancel``, a request whose client went away)
        fails it the same way: the caller sees the ``CancelledError`` (or
        ``wait_for``'s ``TimeoutError``), later calls in the block and its end raise
        :class:`TodoBackendError`, and nothing of the block is stored. A failed
        ROLLBACK is added as a note to the caller's own exception, never raised in
        its place. A block cancelled during its COMMIT may have been committed.
        """
        session = self._current()
        if session is not None:
            async with self._block(session):
                yield self
            return
        async with AsyncSession(self._engine, expire_on_commit=False) as session:
            with core.in_block(self, session):
                async with self._block(session):
                    yield self

    @asynccontextmanager
    async def _block(self, session: AsyncSession) -> AsyncIterator[None]:
        block = core.Block(session.sync_session)
        try:
            yield
        except BaseException as err:
            await self._drive(block.end(err))
            raise
        await self._drive(block.end(None))

    async def create(self, user_id: str, data: TaskCreate) -> Task:
        """Insert a task for *user_id*; return it with id and both timestamps set."""
        return await self._execute(core.create_call, user_id, data)

    async def create_many(self, user_id: str, items: Sequence[TaskCreate]) -> builtins.list[Task]:
        """Insert all *items* for *user_id* atomically, in batches; return them in order."""
        dialect = self._dialect()
        plan = core.checked(self._state(), core.create_many_calls, user_id, items, dialect)
        batches = await self._drive(plan)
        numbers = range(len(batches))
        if not batches.atomic:
            return batches.tasks([await self._execute(batches.call, n) for n in numbers])
        async with self.atomic():
            return batches.tasks([await self._execute(batches.call, n) for n in numbers])

    async def get(self, user_id: str, task_id: int) -> Task | None:
        """Return the task *task_id* if *user_id* owns it, else None."""
        return await self._execute(core.get_call, user_id, task_id)

    async def list(
        self,
        user_id: str,
        *,
        complete: bool | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> builtins.list[Task]:
        """Return up to *limit* of the user's tasks, newest first; page with *before_id*."""
        return await self._execute(core.list_call, user_id, complete, limit, before_id)

    async def update(self, user_id: str, task_id: int, data: TaskUpdate) -> Task | None:
        """Apply the fields set explicitly in *data*; return the task, or None if not owned."""
        return await self._execute(core.update_call, user_id, task_id, data)

    async def delete(self, user_id: str, task_id: int) -> bool:
        """Delete task *task_id* if *user_id* owns it; return whether a row was deleted."""
        return await self._execute(core.delete_call, user_id, task_id)

    async def count(
        self, user_id: str, *, complete: bool | None = None, limit: int | None = None
    ) -> int:
        """Count the user's tasks, optionally only complete or only pending ones.

        With *limit*, the answer is at most *limit* ("*limit* or more" when it equals
        it), and the count reads at most *limit* index entries, whatever the user owns.
        """
        return await self._execute(core.count_call, user_id, complete, limit)

    # -- execution: the awaited I/O of repository_core's policy -----------------------

    def _current(self) -> AsyncSession | None:
        """Return the session calls use now: the bound one, or this task's open block's."""
        session: AsyncSession | None = (
            self._session if self._session is not None else core.block_session(self)
        )
        return session

    def _state(self) -> core.SessionState:
        # The policy inspects the session's state through its sync face; I/O is awaited.
        session = self._current()
        return core.NO_SESSION if session is None else session.sync_session

    def _dialect(self) -> Dialect:
        if self._sync_engine is not None:
            return self._sync_engine.dialect
        return self._open_session().sync_session.get_bind().dialect

    def _open_session(self) -> AsyncSession:
        session = self._current()
        if session is None:  # pragma: no cover - the policy commits only in a session
            raise RuntimeError("a commit or rollback needs a session")
        return session

    async def _execute(self, plan: core.Plan[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with core.one_call_at_a_time(self):
            return await self._drive(
                core.execute(self._state(), self._pooled, plan, *args, **kwargs)
            )

    async def _drive(self, steps: core.Steps[_T]) -> _T:
        driver = core.Driver(steps)
        for step in driver:
            try:
                driver.done(await self._perform(step))
            except BaseException as err:  # noqa: BLE001 - the policy decides, cancellation too
                driver.failed(err)
        return driver.result

    async def _perform(self, step: core.Step | core.Run) -> Any:
        if step is core.Step.COMMIT:
            return await self._open_session().commit()
        if step is core.Step.ROLLBACK:
            return await self._open_session().rollback()
        engine = self._sync_engine
        if step.pooled and engine is not None:
            # The hot path, awaited (todo_backend.direct): a pooled call needs no session.
            call = step.call
            direct = direct_statement(engine, call.stmt)
            if direct is not None and isinstance(call.params, dict):
                return call.consume(*await direct.run_async(engine, call.params))
        # Otherwise the whole statement (checkout, execute, check-in) in one greenlet,
        # as AsyncSession.run_sync runs it.
        current = self._current()
        session = None if current is None else current.sync_session
        return await greenlet_spawn(run_statement, session, step, engine)
