"""User-scoped access to tasks: the only way the application reads or writes them.

Every statement carries the owner condition, so no call can read, change or delete
another user's task. Each single-task operation is ONE statement and, on a warm
connection, ONE network round trip: it runs in autocommit (no BEGIN/COMMIT round
trips), writes use ``RETURNING`` instead of a refresh, and the statements are built
once at import so SQLAlchemy compiles each shape only once. Work that must be atomic
goes through :meth:`TaskRepository.atomic`.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NoReturn, TypeVar

from sqlalchemy import (
    Connection,
    Delete,
    Select,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Result, RowMapping
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.attributes import instance_state
from sqlmodel import Session

from todo_backend.errors import DatabaseUnavailableError
from todo_backend.models import Task, TaskCreate, TaskUpdate, utc_now, validate_user_id

__all__ = ["MAX_PAGE_SIZE", "TaskRepository"]

T = TypeVar("T")

MAX_PAGE_SIZE: Final = 100
_MAX_ID: Final = 2**63 - 1  # BIGINT; a larger id cannot exist, so it matches nothing

_table = Task.__table__  # type: ignore[attr-defined]
_c = _table.c
_ALL_COLUMNS: Final = tuple(_c)
_AUTOCOMMIT: Final = {"isolation_level": "AUTOCOMMIT"}
_OWNED = (_c.user_id == bindparam("owner"), _c.id == bindparam("task_id"))

_INSERT: Final = insert(_table).returning(*_ALL_COLUMNS, sort_by_parameter_order=True)
_GET: Final = select(*_ALL_COLUMNS).where(*_OWNED)
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
_new_task = _mapper.class_manager.new_instance


def _to_task(row: RowMapping) -> Task:
    # Rows come back through the table's own types, so they are valid already: build
    # the object the way the ORM loads one (no re-validation), then mark it detached,
    # like a task loaded and expunged, so it is never mistaken for a new row.
    task: Task = _new_task()
    task.__dict__.update(row)
    object.__setattr__(task, "__pydantic_fields_set__", set(row))
    instance_state(task).key = _mapper.identity_key_from_primary_key((row["id"],))
    return task


def _one_or_none(result: Result[Any]) -> RowMapping | None:
    return result.mappings().one_or_none()


def _all(result: Result[Any]) -> Sequence[RowMapping]:
    return result.mappings().all()


def _scalar(result: Result[Any]) -> Any:
    return result.scalar_one()


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
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._atomic = False

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
        row = self._write(_INSERT, self._insert_params(user_id, data, utc_now()))
        if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
            raise RuntimeError("INSERT ... RETURNING returned no row")
        return _to_task(row)

    def create_many(self, user_id: str, items: Sequence[TaskCreate]) -> builtins.list[Task]:
        """Insert all *items* for *user_id* atomically, in batches; return them in order.

        Uses SQLAlchemy's batched multi-row ``INSERT ... RETURNING`` (insertmanyvalues):
        a few statements for thousands of rows, all in one transaction.
        """
        user_id = validate_user_id(user_id)
        if not items:
            return []
        now = utc_now()
        params = [self._insert_params(user_id, item, now) for item in items]
        with self.atomic():
            try:
                rows = self._connection().execute(_INSERT, params).mappings().all()
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
        row = self._read(_GET, {"owner": user_id, "task_id": task_id}, _one_or_none)
        return None if row is None else _to_task(row)

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
        return [_to_task(row) for row in self._read(stmt, params, _all)]

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
        row = self._write(_update_statement(frozenset(changes)), params)
        return None if row is None else _to_task(row)

    def delete(self, user_id: str, task_id: int) -> bool:
        """Delete task *task_id* if *user_id* owns it; return whether a row was deleted."""
        user_id = validate_user_id(user_id)
        if not _valid_id(task_id):
            return False
        return self._delete(_DELETE, {"owner": user_id, "task_id": task_id})

    def count(self, user_id: str, *, complete: bool | None = None) -> int:
        """Count the user's tasks, optionally only complete or only pending ones."""
        user_id = validate_user_id(user_id)
        params: dict[str, Any] = {"owner": user_id}
        if complete is not None:
            params["complete"] = complete
        return int(self._read(_COUNTS[complete is not None], params, _scalar))

    # -- execution ---------------------------------------------------------------

    @staticmethod
    def _insert_params(user_id: str, data: TaskCreate, now: Any) -> dict[str, Any]:
        return {
            "user_id": validate_user_id(user_id),
            "title": data.title,
            "description": data.description,
            "complete": data.complete,
            "created_at": now,
            "updated_at": now,
        }

    def _connection(self) -> Connection:
        if self._atomic or self._session.in_transaction():
            return self._session.connection()
        # One statement, one round trip: no BEGIN before it, no COMMIT after it.
        return self._session.connection(execution_options=_AUTOCOMMIT)

    def _finish(self) -> None:
        if not self._atomic:
            self._session.commit()

    def _read(
        self, stmt: Select[Any], params: dict[str, Any], fetch: Callable[[Result[Any]], T]
    ) -> T:
        """Run a SELECT and *fetch* its rows; retry once on a connection dropped mid-call.

        Reads are safe to repeat. Writes are not retried after being sent (the server
        may have applied them); dead idle connections are replaced before sending.
        """
        for attempt in (1, 2):
            try:
                value = fetch(self._connection().execute(stmt, params))
                self._finish()
            except DBAPIError as err:
                if not (err.connection_invalidated and attempt == 1 and not self._atomic):
                    _raise_translated(err, self._session)
                self._session.rollback()
            else:
                return value
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(self, stmt: Any, params: dict[str, Any]) -> RowMapping | None:
        try:
            row = self._connection().execute(stmt, params).mappings().one_or_none()
            self._finish()
        except DBAPIError as err:
            _raise_translated(err, self._session)
        return row

    def _delete(self, stmt: Delete, params: dict[str, Any]) -> bool:
        try:
            deleted = self._connection().execute(stmt, params).rowcount
            self._finish()
        except DBAPIError as err:
            _raise_translated(err, self._session)
        return bool(deleted)


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
