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
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import combinations
from operator import itemgetter
from typing import Any, Concatenate, Final, NoReturn, ParamSpec, TypeVar

from sqlalchemy import (
    ARRAY,
    Boolean,
    CursorResult,
    Engine,
    Executable,
    Row,
    Select,
    String,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import InstanceState, configure_mappers
from sqlmodel import Session

from todo_backend.db import cannot_connect, timeout_error
from todo_backend.errors import DatabaseUnavailableError, TodoBackendError
from todo_backend.models import Task, TaskCreate, TaskUpdate, utc_now, validate_user_id

__all__ = ["MAX_PAGE_SIZE", "TaskRepository"]

MAX_PAGE_SIZE: Final = 100
_MAX_ID: Final = 2**63 - 1  # BIGINT; a larger id cannot exist, so it matches nothing

_T = TypeVar("_T")
_P = ParamSpec("_P")
# What a call can raise from the database side: the driver's errors and the pool's
# checkout timeout. _raise_translated turns each into the package's own errors.
_DB_ERRORS: Final = (DBAPIError, PoolTimeoutError)

_table = Task.__table__  # type: ignore[attr-defined]
_c = _table.c
_ALL_COLUMNS: Final = tuple(_c)
_KEYS: Final = tuple(column.key for column in _ALL_COLUMNS)
_FIELDS: Final = frozenset(_KEYS)
# session.info key: present while an atomic() block runs; True once a call in it failed.
_ATOMIC: Final = "todo_backend.atomic_block_failed"
_BLOCK_FAILED: Final = (
    "a call inside this atomic() block failed, so the whole block is rolled back "
    "and nothing of it is stored"
)
_OWNED = (_c.user_id == bindparam("owner"), _c.id == bindparam("task_id"))

_INSERT: Final = insert(_table).returning(*_ALL_COLUMNS, sort_by_parameter_order=True)
_GET: Final = select(*_ALL_COLUMNS).where(*_OWNED)

# create_many on PostgreSQL: one statement per batch, fed by three arrays, instead of
# six parameters per row. unnest yields the rows in input order and ORDER BY n keeps
# that order, so the ids the sequence hands out follow the input: sorting a batch's
# RETURNING rows by id restores it (the guarantee SQLAlchemy's insertmanyvalues relies
# on for sort_by_parameter_order). Unsized VARCHAR[] so that an over-long value fails
# on the column instead of being truncated by the cast.
_BATCH = (
    func.unnest(
        bindparam("titles", type_=ARRAY(String())),
        bindparam("descriptions", type_=ARRAY(String())),
        bindparam("completes", type_=ARRAY(Boolean())),
    )
    .table_valued("title", "description", "complete", with_ordinality="n")
    .render_derived()
)
_NOW = bindparam("now", type_=_c.created_at.type)
_INSERT_BATCH: Final = (
    insert(_table)
    .from_select(
        ["user_id", "title", "description", "complete", "created_at", "updated_at"],
        select(
            bindparam("owner", type_=_c.user_id.type),
            _BATCH.c.title,
            _BATCH.c.description,
            _BATCH.c.complete,
            _NOW,
            _NOW,
        ).order_by(_BATCH.c.n),
    )
    .returning(*_ALL_COLUMNS)
)
_DELETE: Final = delete(_table).where(*_OWNED)


def _list_statement(*, by_complete: bool, keyset: bool) -> Select[Any]:
    stmt = select(*_ALL_COLUMNS).where(_c.user_id == bindparam("owner"))
    if by_complete:
        stmt = stmt.where(_c.complete == bindparam("complete"))
    if keyset:
        stmt = stmt.where(_c.id < bindparam("before_id"))
    return stmt.order_by(_c.id.desc()).limit(bindparam("limit"))


def _count_statement(*, by_complete: bool) -> Select[Any]:
    stmt = select(func.count()).select_from(_table).where(_c.user_id == bindparam("owner"))
    if by_complete:
        stmt = stmt.where(_c.complete == bindparam("complete"))
    return stmt


# Every list/count shape, built once: (filter on complete?, after a cursor?).
_LISTS: Final = {
    (by_complete, keyset): _list_statement(by_complete=by_complete, keyset=keyset)
    for by_complete in (False, True)
    for keyset in (False, True)
}
_COUNTS: Final = {flag: _count_statement(by_complete=flag) for flag in (False, True)}

# The only columns an update may set; owner, id and created_at are never among them.
_UPDATABLE: Final = frozenset({"title", "description", "complete"})
_CONTENT: Final = {"title", "description", "complete"}


def _update_statement(fields: Sequence[str]) -> Update:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    return (
        update(_table)
        .where(*_OWNED)
        .values(**values, updated_at=bindparam("new_updated_at"))
        .returning(*_ALL_COLUMNS)
    )


# One statement per set of changed fields, all eight built here.
_UPDATES: Final = {
    frozenset(fields): _update_statement(fields)
    for size in range(len(_UPDATABLE) + 1)
    for fields in combinations(sorted(_UPDATABLE), size)
}


# _to_task bypasses Task.__init__, which is what normally triggers mapper configuration.
configure_mappers()
_mapper = sa_inspect(Task)
_manager = _mapper.class_manager
_identity_key = _mapper.identity_key_from_primary_key
_STATE_ATTR: Final = _manager.STATE_ATTR
_first = itemgetter(0)
_object_new = object.__new__
_set_slot = object.__setattr__


def _to_task(row: Sequence[Any]) -> Task:
    # Rows come back through the table's own types, so they are valid already: build
    # the object the way the ORM loads one (no re-validation), then mark it detached,
    # like a task loaded and expunged, so it is never mistaken for a new row. This is
    # ClassManager.new_instance() with SQLModel.__new__ inlined, about 2 µs cheaper
    # per row, which a 50-task page feels; test_task_rows.py pins the equivalence.
    task: Task = _object_new(Task)
    _set_slot(task, "__pydantic_fields_set__", set(_FIELDS))
    _set_slot(task, "__pydantic_extra__", None)
    _set_slot(task, "__pydantic_private__", None)
    values = task.__dict__
    values.update(zip(_KEYS, row, strict=True))
    state = InstanceState(task, _manager)
    state.key = _identity_key((row[0],))
    values[_STATE_ATTR] = state
    return task


def _all_tasks(result: CursorResult[Any]) -> builtins.list[Task]:
    return [_to_task(row) for row in result.all()]


def _one_task(result: CursorResult[Any]) -> Task | None:
    row = result.one_or_none()
    return None if row is None else _to_task(row)


def _new_row(result: CursorResult[Any]) -> Task:
    return _to_task(result.one())  # INSERT ... RETURNING returns exactly the new row


def _all_rows(result: CursorResult[Any]) -> Sequence[Row[Any]]:
    return result.all()


def _rows_by_id(result: CursorResult[Any]) -> builtins.list[Row[Any]]:
    return sorted(result.all(), key=_first)


def _count(result: CursorResult[Any]) -> int:
    return int(result.scalar_one())


def _deleted(result: CursorResult[Any]) -> bool:
    return bool(result.rowcount)


def _checked_content(data: TaskCreate) -> TaskCreate:
    # Validated again as a plain TaskCreate: neither a subclass with looser rules nor
    # model_copy(update=...) (which skips validation) can get a bad value into SQL.
    return TaskCreate.model_validate(data.model_dump(include=_CONTENT))


def _checked_changes(data: TaskUpdate) -> dict[str, Any]:
    unknown = data.model_fields_set - _UPDATABLE
    if unknown:
        raise ValueError(
            "an update may change only title, description and complete, "
            f"not {', '.join(sorted(unknown))}"
        )
    return TaskUpdate.model_validate(data.model_dump(exclude_unset=True)).changes()


def _check_complete(complete: bool | None) -> None:
    if complete is not None and not isinstance(complete, bool):
        raise TypeError(f"complete must be a bool or None, got {type(complete).__name__}")


def _valid_id(task_id: int) -> bool:
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {type(task_id).__name__}")
    return 0 < task_id <= _MAX_ID


def _fails_the_block(
    method: Callable[Concatenate[TaskRepository, _P], _T],
) -> Callable[Concatenate[TaskRepository, _P], _T]:
    """Mark the enclosing atomic() block failed when *method* raises, whatever the error.

    A refused argument (``ValidationError``, ``TypeError``, ``ValueError``) fails the
    block as surely as a database error, even if the caller catches it.
    """

    @functools.wraps(method)
    def call(self: TaskRepository, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            info = self._session.info
            if _ATOMIC in info:
                info[_ATOMIC] = True
            raise

    return call


class TaskRepository:
    """Create, read, update and delete one user's tasks through a :class:`Session`.

    Every method takes the owner's ``user_id`` (validated like ``Task.user_id``),
    scopes its statement by it, and commits its own work, unless called inside
    :meth:`atomic`, where the block commits or rolls back as a whole. Tasks returned
    are detached snapshots: change them through :meth:`update`, not the session.

    A call made while the session has no transaction open runs on a connection of
    the session's engine and leaves the session itself untouched. If the caller has a
    session transaction open, calls join it: a write commits it (with the caller's
    own pending work), a read leaves it open.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        # Single statements borrow a pooled connection from the engine directly; a
        # session bound to a Connection is always used through the session.
        bind = session.bind
        self._engine = bind if isinstance(bind, Engine) else None

    @property
    def _atomic(self) -> bool:
        # Kept on the session, not the repository: every repository sharing the
        # session must see the block.
        return _ATOMIC in self._session.info

    @contextmanager
    def atomic(self) -> Iterator[TaskRepository]:
        """Run the calls inside the block in one transaction: all apply, or none.

        Single calls outside a block autocommit and cost one round trip; inside, the
        connection opens a real transaction (BEGIN ... COMMIT). Nested blocks, and
        other repositories on the same session, join the outer block. If any call in
        the block failed, whatever its error (a refused argument as much as a database
        error), the block rolls back even when the caller caught the error, and raises
        :class:`TodoBackendError` at its end.
        """
        info = self._session.info
        if _ATOMIC in info:
            yield self
            return
        info[_ATOMIC] = False  # becomes True when a call inside the block fails
        try:
            yield self
            if info[_ATOMIC]:
                raise TodoBackendError(_BLOCK_FAILED)
        except BaseException:
            del info[_ATOMIC]
            self._session.rollback()
            raise
        del info[_ATOMIC]
        try:
            self._session.commit()
        except _DB_ERRORS as err:
            self._raise_translated(err)

    @_fails_the_block
    def create(self, user_id: str, data: TaskCreate) -> Task:
        """Insert a task for *user_id*; return it with id and both timestamps set."""
        params = _insert_params(validate_user_id(user_id), _checked_content(data), utc_now())
        return self._write(_INSERT, params, _new_row)

    @_fails_the_block
    def create_many(self, user_id: str, items: Sequence[TaskCreate]) -> builtins.list[Task]:
        """Insert all *items* for *user_id* atomically, in batches; return them in order.

        Batches hold the engine's ``insertmanyvalues_page_size`` tasks (1000 by
        default). On PostgreSQL each batch is one ``INSERT ... SELECT FROM unnest(...)
        RETURNING`` statement: a single batch is one autocommitted statement and one
        round trip; more run in one transaction. Elsewhere SQLAlchemy's batched
        multi-row ``INSERT ... RETURNING`` (insertmanyvalues) runs in a transaction.
        """
        user_id = validate_user_id(user_id)
        if not items:
            return []
        items = [_checked_content(item) for item in items]
        now = utc_now()
        dialect = self._session.get_bind().dialect
        if dialect.name == "postgresql":
            return self._create_batches(user_id, items, now, dialect.insertmanyvalues_page_size)
        params = [_insert_params(user_id, item, now) for item in items]
        with self.atomic():
            rows = self._write(_INSERT, params, _all_rows)
        return [_to_task(row) for row in rows]

    @_fails_the_block
    def get(self, user_id: str, task_id: int) -> Task | None:
        """Return the task *task_id* if *user_id* owns it, else None."""
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return None
        return self._read(_GET, {"owner": user_id, "task_id": task_id}, _one_task)

    @_fails_the_block
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
        user_id = validate_user_id(user_id)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, got {type(limit).__name__}")
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        _check_complete(complete)
        params: dict[str, Any] = {"owner": user_id, "limit": limit}
        if complete is not None:
            params["complete"] = complete
        if before_id is not None:
            _valid_id(before_id)
            params["before_id"] = min(before_id, _MAX_ID)
        stmt = _LISTS[complete is not None, before_id is not None]
        return self._read(stmt, params, _all_tasks)

    @_fails_the_block
    def update(self, user_id: str, task_id: int, data: TaskUpdate) -> Task | None:
        """Apply the fields set explicitly in *data*; return the task, or None if not owned.

        ``updated_at`` moves forward on every successful update; ``created_at`` never
        changes.
        """
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return None
        changes = _checked_changes(data)
        params = {f"new_{name}": value for name, value in changes.items()}
        params.update(owner=user_id, task_id=task_id, new_updated_at=utc_now())
        return self._write(_UPDATES[frozenset(changes)], params, _one_task)

    @_fails_the_block
    def delete(self, user_id: str, task_id: int) -> bool:
        """Delete task *task_id* if *user_id* owns it; return whether a row was deleted."""
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return False
        return self._write(_DELETE, {"owner": user_id, "task_id": task_id}, _deleted)

    @_fails_the_block
    def count(self, user_id: str, *, complete: bool | None = None) -> int:
        """Count the user's tasks, optionally only complete or only pending ones."""
        user_id = validate_user_id(user_id)
        _check_complete(complete)
        params: dict[str, Any] = {"owner": user_id}
        if complete is not None:
            params["complete"] = complete
        return self._read(_COUNTS[complete is not None], params, _count)

    def _create_batches(
        self, user_id: str, items: Sequence[TaskCreate], now: Any, size: int
    ) -> builtins.list[Task]:
        params = [
            {
                "owner": user_id,
                "now": now,
                "titles": [item.title for item in batch],
                "descriptions": [item.description for item in batch],
                "completes": [item.complete for item in batch],
            }
            for batch in (items[start : start + size] for start in range(0, len(items), size))
        ]
        if len(params) == 1:
            rows = self._write(_INSERT_BATCH, params[0], _rows_by_id)
        else:
            rows = []
            with self.atomic():
                for batch_params in params:
                    rows += self._write(_INSERT_BATCH, batch_params, _rows_by_id)
        return [_to_task(row) for row in rows]

    # -- execution ---------------------------------------------------------------

    def _run(
        self,
        stmt: Executable,
        params: Any,
        consume: Callable[[CursorResult[Any]], _T],
        *,
        write: bool,
    ) -> _T:
        """Execute *stmt* as one statement; return what *consume* makes of its result."""
        session = self._session
        if self._atomic:
            if session.info[_ATOMIC]:
                # PostgreSQL would refuse it anyway ("transaction is aborted").
                raise TodoBackendError(_BLOCK_FAILED)
            return consume(session.connection().execute(stmt, params))
        joined = session.in_transaction()
        if not joined and self._engine is not None:
            # The common case: no session transaction, no commit, one round trip.
            with self._engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                return consume(conn.execute(stmt, params))
        value = consume(session.connection().execute(stmt, params))
        if write or not joined:
            session.commit()
        return value

    def _read(
        self,
        stmt: Select[Any],
        params: dict[str, Any],
        consume: Callable[[CursorResult[Any]], _T],
    ) -> _T:
        """Run a SELECT; retry once on a connection the server dropped mid-call.

        Reads are safe to repeat, unless they ran inside a transaction that the
        failure ended (an atomic block, or the caller's own): that is reported, never
        papered over. Writes are not retried after being sent (the server may have
        applied them); dead idle connections are replaced before sending.
        """
        retryable = not self._atomic and not self._session.in_transaction()
        try:
            return self._run(stmt, params, consume, write=False)
        except _DB_ERRORS as err:
            if not (retryable and getattr(err, "connection_invalidated", False)):
                self._raise_translated(err)
            if self._session.in_transaction():
                self._session.rollback()
        try:
            return self._run(stmt, params, consume, write=False)
        except _DB_ERRORS as err:
            self._raise_translated(err)

    def _write(
        self, stmt: Executable, params: Any, consume: Callable[[CursorResult[Any]], _T]
    ) -> _T:
        try:
            return self._run(stmt, params, consume, write=True)
        except _DB_ERRORS as err:
            self._raise_translated(err)

    def _raise_translated(self, err: DBAPIError | PoolTimeoutError) -> NoReturn:
        """Map a driver error to this package's errors: the one translation boundary.

        Inside an atomic block the block is marked failed (it rolls back at its end);
        otherwise a transaction left open by the failure is rolled back here. A bound
        that ran out (pool, statement, lock, idle block) is a DatabaseTimeoutError.
        """
        if self._atomic:
            self._session.info[_ATOMIC] = True
        elif self._session.in_transaction():
            self._session.rollback()
        timeout = timeout_error(err)
        if timeout is not None:
            raise timeout from err
        if not isinstance(err, DBAPIError):  # pragma: no cover - every pool timeout is named
            raise err
        if err.connection_invalidated:
            # Checked first: a COMMIT lost mid-flight also carries no statement.
            raise DatabaseUnavailableError(
                "the database connection was lost while the statement was in flight; "
                "it was not retried because it may already have been applied. "
                "Check the task's state and repeat the call if needed."
            ) from err
        if err.statement is None:
            # Raised while opening a connection: nothing was sent.
            raise cannot_connect(err) from err
        raise err


def _insert_params(user_id: str, data: TaskCreate, now: Any) -> dict[str, Any]:
    # user_id is validated once by the caller, not once per row.
    return {
        "user_id": user_id,
        "title": data.title,
        "description": data.description,
        "complete": data.complete,
        "created_at": now,
        "updated_at": now,
    }
