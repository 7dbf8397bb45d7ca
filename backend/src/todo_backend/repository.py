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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any, Final, NoReturn, TypeVar

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
from sqlalchemy.orm import InstanceState, configure_mappers
from sqlmodel import Session

from todo_backend.errors import DatabaseUnavailableError
from todo_backend.models import Task, TaskCreate, TaskUpdate, utc_now, validate_user_id

__all__ = ["MAX_PAGE_SIZE", "TaskRepository"]

MAX_PAGE_SIZE: Final = 100
_MAX_ID: Final = 2**63 - 1  # BIGINT; a larger id cannot exist, so it matches nothing

_T = TypeVar("_T")

_table = Task.__table__  # type: ignore[attr-defined]
_c = _table.c
_ALL_COLUMNS: Final = tuple(_c)
_KEYS: Final = tuple(column.key for column in _ALL_COLUMNS)
_FIELDS: Final = frozenset(_KEYS)
_AUTOCOMMIT: Final = {"isolation_level": "AUTOCOMMIT"}
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
_UPDATES: dict[frozenset[str], Update] = {}


def _update_statement(fields: frozenset[str]) -> Update:
    # One statement per set of changed fields (at most 8); built on first use.
    stmt = _UPDATES.get(fields)
    if stmt is None:
        values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in sorted(fields)}
        stmt = (
            update(_table)
            .where(*_OWNED)
            .values(**values, updated_at=bindparam("new_updated_at"))
            .returning(*_ALL_COLUMNS)
        )
        _UPDATES[fields] = stmt
    return stmt


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


def _rows_by_id(result: CursorResult[Any]) -> builtins.list[Row[Any]]:
    return sorted(result.all(), key=_first)


def _count(result: CursorResult[Any]) -> int:
    return int(result.scalar_one())


def _deleted(result: CursorResult[Any]) -> bool:
    return bool(result.rowcount)


def _valid_id(task_id: int) -> bool:
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {type(task_id).__name__}")
    return 0 < task_id <= _MAX_ID


class TaskRepository:
    """Create, read, update and delete one user's tasks through a :class:`Session`.

    Every method takes the owner's ``user_id`` (validated like ``Task.user_id``),
    scopes its statement by it, and commits its own work, unless called inside
    :meth:`atomic`, where the block commits or rolls back as a whole. Tasks returned
    are detached snapshots: change them through :meth:`update`, not the session.
    A call made while the session has no transaction open runs on a connection of
    the session's engine and leaves the session itself untouched.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._atomic = False
        # Single statements borrow a pooled connection from the engine directly; a
        # session bound to a Connection (an outer transaction) is always used as is.
        bind = session.bind
        self._engine = bind if isinstance(bind, Engine) else None

    @contextmanager
    def atomic(self) -> Iterator[TaskRepository]:
        """Run the calls inside the block in one transaction: all apply, or none.

        Single calls outside a block autocommit and cost one round trip; inside, the
        connection opens a real transaction (BEGIN ... COMMIT). Nested blocks join
        the outer one.
        """
        if self._atomic:
            yield self
            return
        self._atomic = True
        try:
            yield self
        except BaseException:
            self._session.rollback()
            raise
        else:
            self._session.commit()
        finally:
            self._atomic = False

    def create(self, user_id: str, data: TaskCreate) -> Task:
        """Insert a task for *user_id*; return it with id and both timestamps set."""
        params = _insert_params(validate_user_id(user_id), data, utc_now())
        return self._write(_INSERT, params, _new_row)

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
        now = utc_now()
        dialect = self._session.get_bind().dialect
        if dialect.name == "postgresql":
            return self._create_batches(user_id, items, now, dialect.insertmanyvalues_page_size)
        params = [_insert_params(user_id, item, now) for item in items]
        with self.atomic():
            try:
                rows = self._session.connection().execute(_INSERT, params).all()
            except DBAPIError as err:
                # Like every other method: a connection that cannot be opened, or is lost
                # mid-batch, is a DatabaseUnavailableError, not a raw driver error.
                _raise_translated(err, self._session)
        return [_to_task(row) for row in rows]

    def get(self, user_id: str, task_id: int) -> Task | None:
        """Return the task *task_id* if *user_id* owns it, else None."""
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return None
        return self._read(_GET, {"owner": user_id, "task_id": task_id}, _one_task)

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
        if complete is not None and not isinstance(complete, bool):
            raise TypeError(f"complete must be a bool or None, got {type(complete).__name__}")
        params: dict[str, Any] = {"owner": user_id, "limit": limit}
        if complete is not None:
            params["complete"] = complete
        if before_id is not None:
            _valid_id(before_id)
            params["before_id"] = min(before_id, _MAX_ID)
        stmt = _LISTS[complete is not None, before_id is not None]
        return self._read(stmt, params, _all_tasks)

    def update(self, user_id: str, task_id: int, data: TaskUpdate) -> Task | None:
        """Apply the fields set explicitly in *data*; return the task, or None if not owned.

        ``updated_at`` moves forward on every successful update; ``created_at`` never
        changes.
        """
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return None
        changes = data.changes()
        params = {f"new_{name}": value for name, value in changes.items()}
        params.update(owner=user_id, task_id=task_id, new_updated_at=utc_now())
        return self._write(_update_statement(frozenset(changes)), params, _one_task)

    def delete(self, user_id: str, task_id: int) -> bool:
        """Delete task *task_id* if *user_id* owns it; return whether a row was deleted."""
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return False
        return self._write(_DELETE, {"owner": user_id, "task_id": task_id}, _deleted)

    def count(self, user_id: str, *, complete: bool | None = None) -> int:
        """Count the user's tasks, optionally only complete or only pending ones."""
        user_id = validate_user_id(user_id)
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
        self, stmt: Executable, params: dict[str, Any], consume: Callable[[CursorResult[Any]], _T]
    ) -> _T:
        """Execute *stmt* as one statement; return what *consume* makes of its result."""
        if self._atomic:
            return consume(self._session.connection().execute(stmt, params))
        if self._engine is not None and not self._session.in_transaction():
            # The common case: no session transaction, no commit, one round trip.
            with self._engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                return consume(conn.execute(stmt, params))
        if self._session.in_transaction():
            conn = self._session.connection()
        else:
            # One statement, one round trip: no BEGIN before it, no COMMIT after it.
            conn = self._session.connection(execution_options=_AUTOCOMMIT)
        value = consume(conn.execute(stmt, params))
        self._session.commit()
        return value

    def _read(
        self,
        stmt: Select[Any],
        params: dict[str, Any],
        consume: Callable[[CursorResult[Any]], _T],
    ) -> _T:
        """Run a SELECT; retry once on a connection the server dropped mid-call.

        Reads are safe to repeat. Writes are not retried after being sent (the server
        may have applied them); dead idle connections are replaced before sending.
        """
        for attempt in (1, 2):
            try:
                return self._run(stmt, params, consume)
            except DBAPIError as err:
                if not (err.connection_invalidated and attempt == 1 and not self._atomic):
                    _raise_translated(err, self._session)
                if self._session.in_transaction():
                    self._session.rollback()
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(
        self, stmt: Executable, params: dict[str, Any], consume: Callable[[CursorResult[Any]], _T]
    ) -> _T:
        try:
            return self._run(stmt, params, consume)
        except DBAPIError as err:
            _raise_translated(err, self._session)


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


def _raise_translated(err: DBAPIError, session: Session) -> NoReturn:
    """Map a driver error to this package's errors: the one translation boundary."""
    if session.in_transaction():
        session.rollback()
    if err.statement is None:
        # Raised while opening a connection: nothing was sent.
        raise DatabaseUnavailableError(
            f"cannot connect to the database: {_first_line(err)}. "
            "Run `todo-db check` to see what is wrong."
        ) from err
    if err.connection_invalidated:
        raise DatabaseUnavailableError(
            "the database connection was lost while the statement was in flight; "
            "it was not retried because it may already have been applied. "
            "Check the task's state and repeat the call if needed."
        ) from err
    raise err


def _first_line(err: DBAPIError) -> str:
    lines = str(err.orig).strip().splitlines()
    return lines[0] if lines else type(err.orig).__name__
