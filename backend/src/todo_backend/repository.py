"""User-scoped access to tasks: the only way the application reads or writes them.

Every statement carries the owner condition, so no call can read, change or delete
another user's task. Each single-task operation is ONE statement and, on a warm
connection, ONE network round trip: it runs in autocommit (no BEGIN/COMMIT round
trips), writes use ``RETURNING`` instead of a refresh, and the statements are built
once at import so SQLAlchemy compiles each shape only once. Work that must be atomic
goes through :meth:`TaskRepository.atomic`.

The per-call CPU path is kept short as well: outside a transaction a call borrows a
pooled connection straight from the session's engine instead of opening a session
transaction, and rows become tasks without re-validation (``backend/bench`` measures
both against raw psycopg2).

The rules, statements and execution policy live in :mod:`todo_backend.repository_core`,
shared with the async face (:mod:`todo_backend.aio`); this module performs their I/O
on a synchronous :class:`Session`.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import CursorResult, Dialect, Engine, orm
from sqlmodel import Session

from todo_backend import repository_core as core
from todo_backend.direct import direct_statement
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository_core import MAX_PAGE_SIZE

__all__ = ["MAX_PAGE_SIZE", "TaskRepository", "run_statement"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class TaskRepository:
    """Create, read, update and delete one user's tasks, on an engine or a :class:`Session`.

    Every method takes the owner's ``user_id`` (validated like ``Task.user_id``),
    scopes its statement by it, and commits its own work, unless called inside
    :meth:`atomic`, where the block commits or rolls back as a whole. Tasks returned
    are detached snapshots: change them through :meth:`update`, not the session.

    Bound to an :class:`~sqlalchemy.Engine` (``TaskRepository(engine)``), a call
    borrows a pooled connection for its one statement, and an :meth:`atomic` block
    opens a session of its own for the block's duration: nothing to open or close
    around it, which is what an API request wants, and one such repository may be
    shared by threads (each block belongs to the thread that opened it). Bound to a
    session, it serves one thread at a time, like the session; a call made
    while the session has no transaction open runs on a connection of the session's
    engine and leaves the session itself untouched; if the caller has a session
    transaction open, calls join it: a write commits it (with the caller's own
    pending work), a read leaves it open.
    """

    def __init__(self, session_or_engine: Session | Engine) -> None:
        self._session: Session | None
        if isinstance(session_or_engine, Engine):
            self._session = None
            self._engine: Engine | None = session_or_engine
        else:
            self._session = session_or_engine
            # Single statements borrow a pooled connection from the engine directly; a
            # session bound to a Connection is always used through the session.
            bind = session_or_engine.bind
            self._engine = bind if isinstance(bind, Engine) else None
        self._pooled = self._engine is not None

    @contextmanager
    def atomic(self) -> Iterator[TaskRepository]:
        """Run the calls inside the block in one transaction: all apply, or none.

        Single calls outside a block autocommit and cost one round trip; inside, the
        connection opens a real transaction (BEGIN ... COMMIT). Nested blocks, and
        other repositories on the same session, join the outer block. A repository
        bound to an engine opens a session for its outermost block and closes it after;
        the block belongs to the thread (or asyncio task) that opened it, so a
        repository shared by threads keeps their calls apart.

        The block fails as a whole, never in part: when a call in it failed, whatever
        its error (a refused argument as much as a database error), when a call was
        cut short by a BaseException such as ``KeyboardInterrupt``, or when a nested
        block exited with an exception, the whole block rolls back even if the caller
        caught the error; later calls in it, and its end, raise
        :class:`TodoBackendError`. There are no savepoints: a nested block is not
        undone alone while the outer one goes on (Django's choice), because a failed
        call already fails the whole block, a block that commits after a caught
        failure would store only part of what its caller meant, and a savepoint costs
        two more round trips per nested block.

        If the ROLLBACK itself fails (the connection was lost), the caller still gets
        its own exception, the failure added to it as a note: nothing of the block was
        committed either way. A block interrupted during its COMMIT re-raises the
        interruption and may or may not have been committed; the session stays usable.
        """
        session = self._current()
        if session is not None:
            with self._block(session):
                yield self
            return
        with (
            Session(self._engine, expire_on_commit=False) as session,
            core.in_block(self, session),
            self._block(session),
        ):
            yield self

    @contextmanager
    def _block(self, session: Session) -> Iterator[None]:
        block = core.Block(session)
        try:
            yield
        except BaseException as err:
            self._drive(block.end(err))
            raise
        self._drive(block.end(None))

    def create(self, user_id: str, data: TaskCreate) -> Task:
        """Insert a task for *user_id*; return it with id and both timestamps set."""
        return self._execute(core.create_call, user_id, data)

    def create_many(self, user_id: str, items: Sequence[TaskCreate]) -> builtins.list[Task]:
        """Insert all *items* for *user_id* atomically, in batches; return them in order.

        Batches hold the engine's ``insertmanyvalues_page_size`` tasks (1000 by
        default). On PostgreSQL each batch is one ``INSERT ... SELECT FROM unnest(...)
        RETURNING`` statement: a single batch is one autocommitted statement and one
        round trip; more run in one transaction. Elsewhere SQLAlchemy's batched
        multi-row ``INSERT ... RETURNING`` (insertmanyvalues) runs in a transaction.
        """
        dialect = self._dialect()
        plan = core.checked(self._state(), core.create_many_calls, user_id, items, dialect)
        batches = self._drive(plan)
        numbers = range(len(batches))
        if not batches.atomic:
            return batches.tasks([self._execute(batches.call, n) for n in numbers])
        with self.atomic():
            return batches.tasks([self._execute(batches.call, n) for n in numbers])

    def get(self, user_id: str, task_id: int) -> Task | None:
        """Return the task *task_id* if *user_id* owns it, else None."""
        return self._execute(core.get_call, user_id, task_id)

    def list(
        self,
        user_id: str,
        *,
        complete: bool | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> builtins.list[Task]:
        """Return up to *limit* of the user's tasks, newest (highest id) first.

        Filter by *complete* when given. Page with *before_id*: pass the id of the
        last task of one page to get the next (keyset pagination; no OFFSET scan).
        """
        return self._execute(core.list_call, user_id, complete, limit, before_id)

    def update(self, user_id: str, task_id: int, data: TaskUpdate) -> Task | None:
        """Apply the fields set explicitly in *data*; return the task, or None if not owned.

        ``updated_at`` moves forward on every successful update; ``created_at`` never
        changes.
        """
        return self._execute(core.update_call, user_id, task_id, data)

    def delete(self, user_id: str, task_id: int) -> bool:
        """Delete task *task_id* if *user_id* owns it; return whether a row was deleted."""
        return self._execute(core.delete_call, user_id, task_id)

    def count(self, user_id: str, *, complete: bool | None = None, limit: int | None = None) -> int:
        """Count the user's tasks, optionally only complete or only pending ones.

        With *limit*, the answer is at most *limit* ("*limit* or more" when it equals
        it), and the count reads at most *limit* index entries, whatever the user owns.
        """
        return self._execute(core.count_call, user_id, complete, limit)

    # -- execution: the I/O of repository_core's policy -------------------------------

    def _current(self) -> Session | None:
        """Return the session calls use now: the bound one, or this context's open block's."""
        session: Session | None = (
            self._session if self._session is not None else core.block_session(self)
        )
        return session

    def _state(self) -> core.SessionState:
        session = self._current()
        return core.NO_SESSION if session is None else session

    def _dialect(self) -> Dialect:
        if self._engine is not None:
            return self._engine.dialect
        return self._state_session().get_bind().dialect

    def _state_session(self) -> Session:
        session = self._current()
        if session is None:  # pragma: no cover - the policy commits only in a session
            raise RuntimeError("a commit or rollback needs a session")
        return session

    def _execute(self, plan: core.Plan[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with core.one_call_at_a_time(self):
            return self._drive(core.execute(self._state(), self._pooled, plan, *args, **kwargs))

    def _drive(self, steps: core.Steps[_T]) -> _T:
        driver = core.Driver(steps)
        for step in driver:
            try:
                driver.done(self._perform(step))
            except BaseException as err:  # noqa: BLE001 - the policy decides, cancellation too
                driver.failed(err)
        return driver.result

    def _perform(self, step: core.Step | core.Run) -> Any:
        if step is core.Step.COMMIT:
            return self._state_session().commit()
        if step is core.Step.ROLLBACK:
            return self._state_session().rollback()
        return run_statement(self._current(), step, self._engine)


def run_statement(session: orm.Session | None, step: core.Run, engine: Engine | None) -> Any:
    """Send a call's statement and return what the call makes of the result.

    On a pooled autocommit connection of *engine* when the policy asks for one (and
    the session is bound to an engine), else on the session's connection. A pooled
    call takes the engine's hot path (:mod:`todo_backend.direct`) where it is
    invisible, else SQLAlchemy's execution. The async repository runs this same
    function inside SQLAlchemy's greenlet bridge (``AsyncSession.run_sync``): one
    switch per statement.
    """
    call = step.call
    if step.pooled and engine is not None:
        direct = direct_statement(engine, call.stmt)
        if direct is not None and isinstance(call.params, dict):
            return call.consume(*direct.run(engine, call.params))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            return _consumed(call, conn.execute(call.stmt, call.params))
    if session is None:  # pragma: no cover - the policy pools every call made without a session
        raise RuntimeError("a call outside a pooled connection needs a session")
    return _consumed(call, session.connection().execute(call.stmt, call.params))


def _consumed(call: core.Call[_T], result: CursorResult[Any]) -> _T:
    rows = result.all() if result.returns_rows else ()
    return call.consume(rows, result.rowcount)
