"""The task repository's rules and statements, shared by its sync and async faces.

Everything a repository call decides lives here once: argument validation, the owner
condition, the statements (each shape built once, so SQLAlchemy compiles it once: at
import, or for an update's set of changed fields when first needed), how a result row
becomes a :class:`Task`, where a call runs (a pooled autocommit connection, the
session's transaction, an atomic block), when it commits, that a read is retried once
on a dropped connection and a write never is, and how a driver error becomes this
package's error. :class:`~todo_backend.repository.TaskRepository`
and :class:`~todo_backend.aio.AsyncTaskRepository` only carry out the I/O these
functions ask for: :func:`execute` is a generator that yields each :class:`Step`
(run the statement, commit, roll back) and receives its outcome, so the policy is
written once for both.

Which columns a call inserts, updates and returns follows from the models: the
content fields are those of ``TaskCreate`` (``TaskUpdate`` for updates), so nothing
here names one; only ``complete``, the filter of ``list`` and ``count``, is named.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum, auto
from operator import itemgetter
from types import MappingProxyType
from typing import (
    Annotated,
    Any,
    Final,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeVar,
)

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy import (
    ARRAY,
    BindParameter,
    Dialect,
    Executable,
    Select,
    String,
    Update,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy import Enum as EnumType
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstanceState, Session, configure_mappers
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from todo_backend.db import (
    IN_INDEX_ORDER,
    cannot_connect,
    error_reason,
    owned_by,
    role_error,
    timeout_error,
)
from todo_backend.errors import (
    DatabaseConflictError,
    DatabaseStatementError,
    DatabaseUnavailableError,
    SchemaMissingError,
    TodoBackendError,
)
from todo_backend.models import Task, TaskCreate, TaskUpdate, utc_now, validate_user_id

__all__ = [
    "MAX_PAGE_SIZE",
    "NO_SESSION",
    "Batches",
    "Block",
    "Call",
    "Driver",
    "Known",
    "Plan",
    "Run",
    "SessionState",
    "Step",
    "Steps",
    "block_session",
    "checked",
    "count_call",
    "create_call",
    "create_many_calls",
    "delete_call",
    "execute",
    "get_call",
    "in_block",
    "list_call",
    "one_call_at_a_time",
    "translate",
    "update_call",
]

MAX_PAGE_SIZE: Final = 100
_PAGE_SIZE: Final = TypeAdapter(
    Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)], config=ConfigDict(title="limit")
)
# count's limit: any int from 1 (None counts exactly); refused like list's, titled "limit".
_COUNT_LIMIT: Final = TypeAdapter(Annotated[int, Field(ge=1)], config=ConfigDict(title="limit"))
_MAX_ID: Final = 2**63 - 1  # BIGINT; a larger id cannot exist, so it matches nothing

_T = TypeVar("_T")
_R = TypeVar("_R")
# What a call can raise from the database side: the driver's errors and the pool's
# checkout timeout. translate() turns each into the package's own errors.
_DB_ERRORS: Final = (DBAPIError, PoolTimeoutError)
_P = ParamSpec("_P")

_table = Task.__table__  # type: ignore[attr-defined]
_c = _table.c
_ALL_COLUMNS: Final = tuple(_c)
_KEYS: Final = tuple(column.key for column in _ALL_COLUMNS)
_FIELDS: Final = frozenset(_KEYS)
_ID_POSITION: Final = _KEYS.index("id")
# The content fields, in column order: what a user writes, declared once in the models.
# The other columns (id, user_id, created_at, updated_at) are the repository's own.
_CONTENT: Final = tuple(key for key in _KEYS if key in TaskCreate.model_fields)
# The only fields an update may set; owner, id and created_at are never among them.
_UPDATABLE: Final = frozenset(TaskUpdate.model_fields)
# session.info key: present while an atomic() block runs; True once a call in it, or a
# nested block, failed.
_ATOMIC: Final = "todo_backend.atomic_block_failed"
_BLOCK_FAILED: Final = (
    "a call or a nested block inside this atomic() block failed, so the whole block is "
    "rolled back and nothing of it is stored"
)
_OWNED = (_c.user_id == bindparam("owner"), _c.id == bindparam("task_id"))

# Every statement is marked as the package's own, with the parameter that holds its
# owner: the engine bounds it even when it autocommits, and runs it as that user under
# row-level security (todo_backend.db.bound_every_statement).
_BY_OWNER: Final = owned_by("owner")
# The columns create writes: the owner, the content fields and both timestamps.
_INSERTED: Final = ("user_id", *_CONTENT, "created_at", "updated_at")
_INSERT: Final = (
    insert(_table)
    .values({key: bindparam(key) for key in _INSERTED})
    .returning(*_ALL_COLUMNS, sort_by_parameter_order=True)
    .execution_options(**owned_by("user_id"))
)
_GET: Final = select(*_ALL_COLUMNS).where(*_OWNED).execution_options(**_BY_OWNER)


def _array_of(column: Any) -> ARRAY[Any]:
    """Return the array type that carries *column*'s values of a batch into ``unnest``.

    A string column's array is unsized VARCHAR[], so that an over-long value fails on
    the column instead of being truncated by the cast (an enum keeps its own type).
    """
    element = column.type
    impl = getattr(element, "impl_instance", element)
    if isinstance(impl, String) and not isinstance(impl, EnumType):
        element = String()
    return ARRAY(element)


# create_many on PostgreSQL: one statement per batch, fed by one array per content
# column, instead of one parameter per value. unnest yields the rows in input order
# and ORDER BY the ordinality keeps that order, so the ids the sequence hands out
# follow the input: sorting a batch's RETURNING rows by id restores it (the guarantee
# SQLAlchemy's insertmanyvalues relies on for sort_by_parameter_order).
_BATCH = (
    func.unnest(*(bindparam(f"batch_{key}", type_=_array_of(_c[key])) for key in _CONTENT))
    .table_valued(*_CONTENT, with_ordinality="ordinal")
    .render_derived()
)
_NOW = bindparam("now", type_=_c.created_at.type)
_INSERT_BATCH: Final = (
    insert(_table)
    .from_select(
        ["user_id", *_CONTENT, "created_at", "updated_at"],
        select(
            bindparam("owner", type_=_c.user_id.type),
            *(_BATCH.c[key] for key in _CONTENT),
            _NOW,
            _NOW,
        ).order_by(_BATCH.c.ordinal),
    )
    .returning(*_ALL_COLUMNS)
    .execution_options(**_BY_OWNER)
)
_DELETE: Final = delete(_table).where(*_OWNED).execution_options(**_BY_OWNER)


class _Owner(FunctionElement[str]):
    """A page's owner, compared with ``=``: ``:owner``, on PostgreSQL ``ANY (ARRAY[:owner])``.

    An ``=`` puts user_id into an equivalence class with a constant, so the planner
    drops ``user_id`` from ``ORDER BY user_id DESC, id DESC`` and may then walk the
    primary key backward, filtering out every newer row of other owners (a user who
    owns the oldest tenth of a million rows: about 100 ms a page). A one-element
    ``= ANY`` is not an equality to the planner: the order keeps user_id, and only an
    index led by user_id provides it. test_plans_pg.py pins the plans.
    """

    name = "owner"
    type = String()
    inherit_cache = True


@compiles(_Owner)
def _owner(element: _Owner, compiler: SQLCompiler, **kw: Any) -> str:
    (owner,) = element.clauses
    return compiler.process(owner, **kw)


@compiles(_Owner, "postgresql")
def _owner_postgresql(element: _Owner, compiler: SQLCompiler, **kw: Any) -> str:
    (owner,) = element.clauses
    return compiler.process(any_(array([owner])), **kw)


def _list_statement(*, by_complete: bool, keyset: bool) -> Select[Any]:
    stmt = select(*_ALL_COLUMNS).where(_c.user_id == _Owner(bindparam("owner")))
    if by_complete:
        stmt = stmt.where(_c.complete == bindparam("complete"))
    if keyset:
        # id < :before_id bounds the user_id index's range. The row comparison over the
        # same index's columns says the same again: the planner's estimate of the rows
        # left drops, so it reads the few it needs from that index rather than a
        # primary-key range below the cursor plus a sort, which it prefers otherwise
        # for an owner of the oldest rows (it takes their rows for scattered pages).
        keys = (_c.user_id, _c.complete, _c.id) if by_complete else (_c.user_id, _c.id)
        bounds: list[BindParameter[Any]] = [
            bindparam(name) for name in ("owner", "complete", "before_id")
        ]
        stmt = stmt.where(
            _c.id < bindparam("before_id"),
            tuple_(*keys) < tuple_(*(bounds if by_complete else bounds[::2])),
        )
    # user_id first: with _Owner, only an index led by user_id gives this order.
    # Never sorted: a page is read from the index in order, whatever the planner's
    # estimate of the owner's rows (IN_INDEX_ORDER says why it may be wrong).
    return (
        stmt.order_by(_c.user_id.desc(), _c.id.desc())
        .limit(bindparam("limit"))
        .execution_options(**_BY_OWNER, **IN_INDEX_ORDER)
    )


def _count_statement(*, by_complete: bool, bounded: bool) -> Select[Any]:
    stmt = select(func.count()).select_from(_table).where(_c.user_id == bindparam("owner"))
    if by_complete:
        stmt = stmt.where(_c.complete == bindparam("complete"))
    if not bounded:
        return stmt.execution_options(**_BY_OWNER)
    # At most :limit rows are read from the index: the cost of a count stops growing
    # with the owner's tasks.
    capped = stmt.with_only_columns(_c.id).limit(bindparam("limit")).subquery("capped")
    return select(func.count()).select_from(capped).execution_options(**_BY_OWNER)


# Every list shape, built once: (filter on complete?, after a cursor?).
_LISTS: Final = {
    (by_complete, keyset): _list_statement(by_complete=by_complete, keyset=keyset)
    for by_complete in (False, True)
    for keyset in (False, True)
}
# Every count shape: (filter on complete?, bounded by a limit?).
_COUNTS: Final = {
    (by_complete, bounded): _count_statement(by_complete=by_complete, bounded=bounded)
    for by_complete in (False, True)
    for bounded in (False, True)
}


class _Updates(dict[frozenset[str], Update]):
    """One ``UPDATE ... RETURNING`` per set of changed fields, built when first needed.

    Building every subset at import would double the statements with each field; an
    application uses few shapes. Two threads building the same shape at once both
    store an equal statement, which is harmless.
    """

    def __missing__(self, fields: frozenset[str]) -> Update:
        values: dict[str, Any] = {key: bindparam(f"new_{key}") for key in _KEYS if key in fields}
        stmt = (
            update(_table)
            .where(*_OWNED)
            .values(**values, updated_at=bindparam("new_updated_at"))
            .returning(*_ALL_COLUMNS)
            .execution_options(**_BY_OWNER)
        )
        self[fields] = stmt
        return stmt


_UPDATES: Final = _Updates()


# _to_task bypasses Task.__init__, which is what normally triggers mapper configuration.
configure_mappers()
_mapper = sa_inspect(Task)
_manager = _mapper.class_manager
# The identity key the mapper gives a row: (class, (id,), identity token None).
_IDENTITY_CLASS: Final = _mapper.identity_key_from_primary_key((0,))[0]
_STATE_ATTR: Final = _manager.STATE_ATTR
_by_id = itemgetter(_ID_POSITION)
_object_new = object.__new__
# pydantic's BaseModel slots, set through their own descriptors (no attribute lookup).
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _to_task(row: Sequence[Any]) -> Task:
    # Rows come back through the table's own types, so they are valid already: build
    # the object the way the ORM loads one (no re-validation), then mark it detached,
    # like a task loaded and expunged, so it is never mistaken for a new row. This is
    # ClassManager.new_instance() with SQLModel.__new__ inlined, about 2 µs cheaper
    # per row, which a 50-task page feels; test_task_rows.py pins the equivalence.
    task: Task = _object_new(Task)
    _set_fields_set(task, set(_FIELDS))
    _set_extra(task, None)
    _set_private(task, None)
    values = task.__dict__
    values.update(zip(_KEYS, row, strict=True))
    state = InstanceState(task, _manager)
    state.key = (_IDENTITY_CLASS, (row[_ID_POSITION],), None)
    values[_STATE_ATTR] = state
    return task


# What a call makes of its statement's result: its rows and the driver's row count.
# The rows come from SQLAlchemy's result or from the hot path (todo_backend.direct).


def _all_tasks(rows: Sequence[Sequence[Any]], _rowcount: int) -> builtins.list[Task]:
    return [_to_task(row) for row in rows]


def _one_task(rows: Sequence[Sequence[Any]], _rowcount: int) -> Task | None:
    # The owner and id select at most one row (the primary key).
    return _to_task(rows[0]) if rows else None


def _new_row(rows: Sequence[Sequence[Any]], _rowcount: int) -> Task:
    (row,) = rows  # INSERT ... RETURNING returns exactly the new row
    return _to_task(row)


def _all_rows(rows: Sequence[Sequence[Any]], _rowcount: int) -> Sequence[Sequence[Any]]:
    return rows


def _rows_by_id(rows: Sequence[Sequence[Any]], _rowcount: int) -> Sequence[Sequence[Any]]:
    return sorted(rows, key=_by_id)


def _count(rows: Sequence[Sequence[Any]], _rowcount: int) -> int:
    ((value,),) = rows
    return int(value)


def _deleted(_rows: Sequence[Sequence[Any]], rowcount: int) -> bool:
    return bool(rowcount)


def _checked_content(data: TaskCreate) -> dict[str, Any]:
    # Validated again as a plain TaskCreate: neither a subclass with looser rules nor
    # model_copy(update=...) (which skips validation) can get a bad value into SQL.
    # A TaskCreate's __dict__ holds exactly its fields, validated.
    return TaskCreate.model_validate(data.model_dump(include=set(_CONTENT))).__dict__


def _names(keys: Iterable[str]) -> str:
    """Return *keys* in column order as ``a, b and c``."""
    ordered = [key for key in _KEYS if key in keys]
    return " and ".join(filter(None, (", ".join(ordered[:-1]), ordered[-1])))


_ONLY_UPDATABLE: Final = f"an update may change only {_names(_UPDATABLE)}"


def _checked_changes(data: TaskUpdate) -> dict[str, Any]:
    unknown = data.model_fields_set - _UPDATABLE
    if unknown:
        raise ValueError(f"{_ONLY_UPDATABLE}, not {', '.join(sorted(unknown))}")
    return TaskUpdate.model_validate(data.model_dump(exclude_unset=True)).changes()


def _check_complete(complete: bool | None) -> None:
    if complete is not None and not isinstance(complete, bool):
        raise TypeError(f"complete must be a bool or None, got {type(complete).__name__}")


def _valid_id(task_id: int) -> bool:
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {type(task_id).__name__}")
    return 0 < task_id <= _MAX_ID


def _insert_params(user_id: str, content: dict[str, Any], now: Any) -> dict[str, Any]:
    # user_id is validated once by the caller, not once per row.
    return {"user_id": user_id, **content, "created_at": now, "updated_at": now}


# -- calls: each public method's arguments checked and turned into one statement ------


# Call and Run are made on every call: not frozen, which would cost 1 µs more a call
# (a frozen dataclass sets each field through object.__setattr__). Never changed.
@dataclass(slots=True)
class Call(Generic[_T]):
    """One statement of a repository call: what to send and how to read its result."""

    stmt: Executable
    params: Any
    # Makes the call's answer from the statement's rows and row count.
    consume: Callable[[Sequence[Sequence[Any]], int], _T]
    write: bool


@dataclass(frozen=True, slots=True)
class Known(Generic[_T]):
    """A call whose answer is known without asking the database (an id that cannot exist)."""

    value: _T


_NO_TASK: Final[Known[Task | None]] = Known(None)
_NOT_DELETED: Final = Known(False)


def create_call(user_id: str, data: TaskCreate) -> Call[Task]:
    """Check ``create``'s arguments; return its one ``INSERT ... RETURNING``."""
    params = _insert_params(validate_user_id(user_id), _checked_content(data), utc_now())
    return Call(_INSERT, params, _new_row, write=True)


def get_call(user_id: str, task_id: int) -> Call[Task | None] | Known[Task | None]:
    """Check ``get``'s arguments; return its one owner-scoped ``SELECT``."""
    user_id = validate_user_id(user_id)
    if not _valid_id(task_id):
        return _NO_TASK
    return Call(_GET, {"owner": user_id, "task_id": task_id}, _one_task, write=False)


def list_call(
    user_id: str, complete: bool | None, limit: int, before_id: int | None
) -> Call[builtins.list[Task]]:
    """Check ``list``'s arguments; return the ``SELECT`` of one page, newest first."""
    user_id = validate_user_id(user_id)
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, got {type(limit).__name__}")
    _PAGE_SIZE.validate_python(limit)  # 1..MAX_PAGE_SIZE, else a ValidationError
    _check_complete(complete)
    params: dict[str, Any] = {"owner": user_id, "limit": limit}
    if complete is not None:
        params["complete"] = complete
    if before_id is not None:
        _valid_id(before_id)
        params["before_id"] = min(before_id, _MAX_ID)
    stmt = _LISTS[complete is not None, before_id is not None]
    return Call(stmt, params, _all_tasks, write=False)


def update_call(
    user_id: str, task_id: int, data: TaskUpdate
) -> Call[Task | None] | Known[Task | None]:
    """Check ``update``'s arguments; return the ``UPDATE ... RETURNING`` of *data*'s fields."""
    user_id = validate_user_id(user_id)
    if not _valid_id(task_id):
        return _NO_TASK
    changes = _checked_changes(data)
    params = {f"new_{name}": value for name, value in changes.items()}
    params.update(owner=user_id, task_id=task_id, new_updated_at=utc_now())
    return Call(_UPDATES[frozenset(changes)], params, _one_task, write=True)


def delete_call(user_id: str, task_id: int) -> Call[bool] | Known[bool]:
    """Check ``delete``'s arguments; return its one owner-scoped ``DELETE``."""
    user_id = validate_user_id(user_id)
    if not _valid_id(task_id):
        return _NOT_DELETED
    return Call(_DELETE, {"owner": user_id, "task_id": task_id}, _deleted, write=True)


def count_call(user_id: str, complete: bool | None, limit: int | None = None) -> Call[int]:
    """Check ``count``'s arguments; return its one ``SELECT count(*)``, capped at *limit*."""
    user_id = validate_user_id(user_id)
    _check_complete(complete)
    params: dict[str, Any] = {"owner": user_id}
    if complete is not None:
        params["complete"] = complete
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
        _COUNT_LIMIT.validate_python(limit)  # at least 1, else a ValidationError like list's
        params["limit"] = min(limit, _MAX_ID)
    return Call(_COUNTS[complete is not None, limit is not None], params, _count, write=False)


@dataclass(frozen=True, slots=True)
class Batches:
    """The statements of ``create_many`` and whether they must share one transaction."""

    calls: Sequence[Call[Sequence[Sequence[Any]]]]
    atomic: bool

    def __len__(self) -> int:
        return len(self.calls)

    def call(self, number: int) -> Call[Sequence[Sequence[Any]]]:
        """Return the statement of batch *number*."""
        return self.calls[number]

    @staticmethod
    def tasks(results: Sequence[Sequence[Sequence[Any]]]) -> builtins.list[Task]:
        """Build the created tasks, in input order, from the rows each call returned."""
        return [_to_task(row) for rows in results for row in rows]


def create_many_calls(user_id: str, items: Sequence[TaskCreate], dialect: Dialect) -> Batches:
    """Check ``create_many``'s arguments; return batches of ``insertmanyvalues_page_size``.

    On PostgreSQL each batch is one ``INSERT ... SELECT FROM unnest(...) RETURNING``
    and a single batch needs no transaction of its own. Elsewhere SQLAlchemy's
    batched multi-row ``INSERT ... RETURNING`` (insertmanyvalues) runs in a block.
    """
    user_id = validate_user_id(user_id)
    contents = [_checked_content(item) for item in items]
    if not contents:
        return Batches((), atomic=False)
    now = utc_now()
    if dialect.name != "postgresql":
        params = [_insert_params(user_id, content, now) for content in contents]
        return Batches((Call(_INSERT, params, _all_rows, write=True),), atomic=True)
    size = dialect.insertmanyvalues_page_size
    calls = [
        Call(
            _INSERT_BATCH,
            {
                "owner": user_id,
                "now": now,
                **{f"batch_{key}": [content[key] for content in batch] for key in _CONTENT},
            },
            _rows_by_id,
            write=True,
        )
        for batch in (contents[start : start + size] for start in range(0, len(contents), size))
    ]
    return Batches(calls, atomic=len(calls) > 1)


# -- execution policy: the same decisions for the sync and the async executor -------


class Step(Enum):
    """A session request of the execution policy, besides running a statement."""

    COMMIT = auto()
    ROLLBACK = auto()


@dataclass(slots=True)
class Run:
    """The request to run *call*: on a pooled autocommit connection, or in the session."""

    call: Call[Any]
    pooled: bool


Steps: TypeAlias = Generator[Step | Run, Any, _T]


class Driver(Generic[_T]):
    """Feeds an executor the :class:`Step` s of a policy generator, one at a time.

    Iterate over it, perform each step, and report its value with :meth:`done` or its
    exception with :meth:`failed`; once the policy has finished, :attr:`result` holds
    its answer (an error the policy raises comes out of the iteration).
    """

    __slots__ = ("_failure", "_outcome", "_steps", "result")

    def __init__(self, steps: Steps[_T]) -> None:
        self._steps = steps
        self._outcome: Any = None
        self._failure: BaseException | None = None
        self.result: _T

    def __iter__(self) -> Driver[_T]:
        return self

    def __next__(self) -> Step | Run:
        outcome, failure = self._outcome, self._failure
        self._outcome = self._failure = None
        try:
            if failure is None:
                return self._steps.send(outcome)
            return self._steps.throw(failure)
        except StopIteration as finished:
            self.result = finished.value
            raise StopIteration from None

    def done(self, outcome: Any) -> None:
        """Report the value of the step just performed."""
        self._outcome = outcome

    def failed(self, err: BaseException) -> None:
        """Report the exception the step just performed raised, whatever it is.

        A BaseException too: a cancelled await (``asyncio.CancelledError``) or a
        ``KeyboardInterrupt`` cuts a call short, and the policy must see it to fail
        the atomic block around the call; it reaches the caller unchanged.
        """
        self._failure = err


class SessionState(Protocol):
    """What the execution policy reads of a session: its ``info`` and its transaction state."""

    @property
    def info(self) -> dict[Any, Any]:
        """The session's ``info`` dict: an open atomic() block is recorded there."""
        ...

    def in_transaction(self) -> bool:
        """Whether the session has a transaction open."""
        ...


class _NoSession:
    """The state of a repository bound to an engine, outside an atomic() block.

    There is no session: no block, no transaction, so every call goes to a pooled
    connection, and the policy never writes to ``info`` (a new empty dict each time).
    """

    __slots__ = ()

    @property
    def info(self) -> dict[Any, Any]:
        """Nothing recorded: no atomic() block is open."""
        return {}

    def in_transaction(self) -> bool:
        """No transaction: there is no session."""
        return False


NO_SESSION: Final[SessionState] = _NoSession()

# The atomic() blocks that engine-bound repositories opened in the current context
# (thread, or asyncio task and what it starts), by repository: a block belongs to the
# context that opened it, so calls from elsewhere on a shared repository stay single
# autocommitted statements, never part of another's block.
_BLOCK_SESSIONS: Final[ContextVar[Mapping[object, _OpenBlock]]] = ContextVar(
    "todo_backend_block_sessions", default=MappingProxyType({})
)
_CONCURRENT: Final = (
    "a call was made while another call of the same atomic() block was still running "
    "(tasks that asyncio.gather or a TaskGroup starts inside a block inherit it): a "
    "block's calls share one session and must run one at a time. Await them in turn "
    "inside the block, or give each concurrent task its own block."
)


class _OpenBlock:
    """An engine-bound repository's open atomic() block: its session, and a call in flight."""

    __slots__ = ("busy", "session")

    def __init__(self, session: object) -> None:
        self.session = session
        self.busy = False


def block_session(repository: object) -> Any:
    """Return the session of *repository*'s atomic() block open in this context, or None."""
    block = _BLOCK_SESSIONS.get().get(repository)
    return None if block is None else block.session


@contextmanager
def in_block(repository: object, session: object) -> Iterator[None]:
    """Record *session* as *repository*'s open atomic() block for this context, for the block."""
    before = _BLOCK_SESSIONS.get()
    token = _BLOCK_SESSIONS.set({**before, repository: _OpenBlock(session)})
    try:
        yield
    finally:
        try:
            _BLOCK_SESSIONS.reset(token)
        except ValueError:
            # Left in another context than it was entered (a block handed between
            # tasks): whatever the block's outcome, it must not be reported as an error.
            _BLOCK_SESSIONS.set(before)


def one_call_at_a_time(repository: object) -> AbstractContextManager[None]:
    """Run one call of *repository*'s open block, refusing one that overlaps another.

    Tasks started inside a block (``asyncio.gather``) inherit it; their calls would
    share its one session at once, which SQLAlchemy refuses with an error of its own.
    The overlapping call is refused first with :class:`TodoBackendError`, and, like
    any failed call inside a block, fails the whole block. Outside a block this does
    nothing.
    """
    block = _BLOCK_SESSIONS.get().get(repository)
    return _NO_BLOCK if block is None else _one_call(block)


# Outside a block: nothing to guard (the common case, so no generator per call).
_NO_BLOCK: Final = nullcontext()


@contextmanager
def _one_call(block: _OpenBlock) -> Iterator[None]:
    if block.busy:
        # A failed call of the block, like any other: the whole block fails.
        info = block.session.info  # type: ignore[attr-defined]
        if _ATOMIC in info:
            info[_ATOMIC] = True
        raise TodoBackendError(_CONCURRENT)
    block.busy = True
    try:
        yield
    finally:
        block.busy = False


# What builds one call from a public method's arguments: create_call, get_call, ...
Plan: TypeAlias = Callable[_P, Call[_T] | Known[_T]]


def checked(
    session: SessionState, plan: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
) -> Generator[Step | Run, Any, _R]:
    """Check a call's arguments with *plan*; a failure there is a failed call like any other."""
    try:
        return plan(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - _fail decides and re-raises
        return (yield from _fail(session, err))


def execute(
    session: SessionState,
    pooled: bool,
    plan: Plan[_P, _T],
    /,
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> Steps[_T]:
    """Make the call *plan* builds from the arguments, and run it: the policy of every call.

    The statement runs once, or twice for a read the server dropped mid-call; errors
    are translated. *session* is only inspected (its ``info`` and transaction state;
    for an async session, its ``sync_session``), never used for I/O. *pooled* says
    whether the session is bound to an engine, whose connections a call may borrow.

    Reads are safe to repeat, unless they ran inside a transaction that the failure
    ended (an atomic block, or the caller's own): that is reported, never papered
    over. Writes are not retried after being sent (the server may have applied them);
    dead idle connections are replaced before sending, at pool checkout. A call cut
    short by a BaseException (cancelled, interrupted) is never retried either.
    """
    call = yield from checked(session, plan, *args, **kwargs)
    if isinstance(call, Known):
        return call.value
    retry = not call.write and _ATOMIC not in session.info and not session.in_transaction()
    while True:
        try:
            return (yield from _attempt(call, session, pooled=pooled))
        except BaseException as err:  # noqa: BLE001 - _fail decides and re-raises
            if not (retry and _connection_lost(err)):
                yield from _fail(session, err)
            retry = False
            if session.in_transaction():
                yield Step.ROLLBACK


def _attempt(call: Call[_T], session: SessionState, *, pooled: bool) -> Steps[_T]:
    info = session.info
    if _ATOMIC in info:
        if info[_ATOMIC]:
            # PostgreSQL would refuse it anyway ("transaction is aborted").
            raise TodoBackendError(_BLOCK_FAILED)
        value: _T = yield Run(call, pooled=False)
        return value
    joined = session.in_transaction()
    if pooled and not joined:
        # The common case: no session transaction, no commit, one round trip.
        value = yield Run(call, pooled=True)
        return value
    value = yield Run(call, pooled=False)
    if call.write or not joined:
        yield Step.COMMIT
    return value


def _connection_lost(err: BaseException) -> bool:
    return isinstance(err, DBAPIError) and err.connection_invalidated


def _fail(session: SessionState, err: BaseException) -> Generator[Step | Run, Any, NoReturn]:
    """Settle the session after a failed call, then raise the call's error, translated.

    The one place where a failed call marks the session, in both faces: whatever a
    call raises (its argument checks, sending the statement, reading the result,
    committing) comes here. Inside an atomic block any error marks the block failed
    (a refused argument as much as a database error; it rolls back at its end), and
    so does a call cut short by a BaseException (``asyncio.CancelledError``,
    ``KeyboardInterrupt``): its statement's fate is unknown, and SQLAlchemy drops a
    connection interrupted mid-statement. Otherwise a transaction a database error
    left open is rolled back here. A BaseException is raised as it is, with no I/O
    after it; an error as :func:`translate` maps it.
    """
    if _ATOMIC in session.info:
        session.info[_ATOMIC] = True
    elif isinstance(err, _DB_ERRORS) and session.in_transaction():
        yield Step.ROLLBACK
    if not isinstance(err, Exception):
        raise err
    translated = translate(err)
    if translated is err:
        raise err
    raise translated from err


def translate(err: Exception) -> Exception:  # noqa: PLR0911 - one return per kind
    """Map a driver error to this package's errors: the one translation boundary.

    Returns *err* itself when it is not a database error (a BaseException, a bug's
    own exception). A bound that ran out (pool, statement, lock, idle block) is a
    DatabaseTimeoutError; a lost connection or one that could not be opened, a
    read-only server or one out of resources, a DatabaseUnavailableError; a database
    without the tasks table, or without a column the models declare (the code is
    ahead of the schema), a SchemaMissingError that says to run ``todo-db migrate``;
    a deadlock or serialization failure, a DatabaseConflictError; any other driver
    error, a DatabaseStatementError carrying its SQLSTATE; a login role that cannot
    switch to the row-level security role, a ConfigurationError. No DBAPIError is
    returned as is.
    """
    known = timeout_error(err) or role_error(err)
    if known is not None:
        return known
    if not isinstance(err, DBAPIError):
        return err
    if err.connection_invalidated:
        # Checked first: a COMMIT lost mid-flight also carries no statement.
        return DatabaseUnavailableError(
            "the database connection was lost while the statement was in flight; "
            "it was not retried because it may already have been applied. "
            "Check the task's state and repeat the call if needed."
        )
    if err.statement is None:
        # Raised while opening a connection: nothing was sent.
        return cannot_connect(err)
    if _no_such_table(err):
        return SchemaMissingError(
            "the database has no tasks table: its schema was never created. Run "
            "`todo-db migrate` against it (with the same DATABASE_URL), then repeat the call."
        )
    if _no_such_column(err):
        return SchemaMissingError(
            f"the database is behind the code: a column the models declare is missing "
            f"({error_reason(err)}). Run `todo-db migrate` against it (with the same "
            "DATABASE_URL) before this code serves it, then repeat the call."
        )
    return _refused(err)


# SQLSTATEs: the transaction was rolled back to resolve a conflict, and the server
# refuses writes; class 53 is "insufficient resources" (Neon's storage limit: 53100).
_CONFLICTS: Final = frozenset({"40P01", "40001"})
_READ_ONLY: Final = "25006"
_NO_RESOURCES: Final = "53"


def _sqlstate(err: DBAPIError) -> str:
    # psycopg2 names the SQLSTATE pgcode, psycopg 3 (the async engine) sqlstate.
    orig = err.orig
    return str(getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None) or "")


def _refused(err: DBAPIError) -> TodoBackendError:
    """Map an error the server returned for a statement it received (a connection was open).

    The message carries the SQLSTATE and the first line of the server's message
    only: the rest of a SQLAlchemy error repeats the SQL and a DETAIL line may
    repeat row values.
    """
    code = _sqlstate(err)
    reason = error_reason(err)
    if code in _CONFLICTS:
        return DatabaseConflictError(
            f"the server aborted the transaction to resolve a conflict with a concurrent one "
            f"(SQLSTATE {code}: {reason}); nothing of it was stored. Repeat the call, or the "
            "whole atomic() block; if it keeps happening, make concurrent blocks change tasks "
            "in the same order.",
            sqlstate=code,
        )
    if code == _READ_ONLY:
        return DatabaseUnavailableError(
            f"the database is read-only (SQLSTATE {code}: {reason}); nothing was stored. "
            "Point DATABASE_URL at a read-write server (on Neon: the branch's read-write "
            "compute, not a read replica), or check default_transaction_read_only."
        )
    if code.startswith(_NO_RESOURCES):
        return DatabaseUnavailableError(
            f"the database server ran out of a resource (SQLSTATE {code}: {reason}); "
            "nothing was stored. Free disk space or raise the limit (on Neon: the "
            "project's storage or compute size), or close connections, then retry."
        )
    where = f" (SQLSTATE {code})" if code else ""
    return DatabaseStatementError(
        f"the database refused the statement: {reason}{where}. If the database's schema "
        "is behind the package's, run `todo-db migrate`; otherwise report it as a bug.",
        sqlstate=code,
    )


def _no_such_table(err: DBAPIError) -> bool:
    # PostgreSQL's undefined_table (psycopg2 names the SQLSTATE pgcode, psycopg 3
    # sqlstate); SQLite only says it in the message.
    orig = err.orig
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code == "42P01" or str(orig).startswith("no such table")


def _no_such_column(err: DBAPIError) -> bool:
    # PostgreSQL's undefined_column; SQLite says it in the message, reading or writing.
    # The package's statements name only the models' columns, so one missing means a
    # schema older than the code.
    message = str(err.orig)
    return (
        _sqlstate(err) == "42703"
        or message.startswith("no such column")
        or " has no column named " in message
    )


# -- atomic blocks --------------------------------------------------------------------


class Block:
    """One ``atomic()`` block on a session: the outermost opens it, nested ones join it.

    The block is kept on the session, not the repository: every repository sharing
    the session must see it. It fails as a whole: a failed call inside it, or a nested
    block that exits with an exception, fails the outermost block even when the caller
    catches the error (no savepoints; research D17).
    """

    __slots__ = ("_outermost", "_session")

    def __init__(self, session: Session) -> None:
        self._session = session
        self._outermost = _ATOMIC not in session.info
        if self._outermost:
            session.info[_ATOMIC] = False  # becomes True when a call inside the block fails

    def end(self, error: BaseException | None) -> Steps[None]:
        """End the block: commit it, or roll all of it back.

        It rolls back when the block raised *error*, and also when a call or a nested
        block inside it failed even though the caller caught that: then it raises
        :class:`TodoBackendError`. A nested block only marks the outermost one failed
        when it exits with *error*. A failed ROLLBACK never replaces the caller's
        error: it is added to that error as a note (the transaction was never
        committed, so nothing of it is stored either way). A failed COMMIT is
        translated like any call.
        """
        if not self._outermost:
            if error is not None:
                self._session.info[_ATOMIC] = True
            return
        failed = self._session.info.pop(_ATOMIC)
        if error is not None or failed:
            raised = TodoBackendError(_BLOCK_FAILED) if error is None else error
            lost = yield from _roll_back(raised, _NOTHING_STORED)
            if error is None:
                raise raised from lost
            return
        try:
            yield Step.COMMIT
        except GeneratorExit:
            raise
        except Exception as err:  # noqa: BLE001 - _fail decides and re-raises
            yield from _fail(self._session, err)
        except BaseException as err:
            # Cancelled or interrupted while committing: the outcome is unknown, and the
            # session would refuse every later statement. This rollback only resets the
            # session: SQLAlchemy has already dropped or ended the connection's transaction.
            if self._session.in_transaction():
                yield from _roll_back(err, _COMMIT_UNKNOWN)
            raise


_NOTHING_STORED: Final = (
    "Nothing of the block was stored: the server discards a transaction that is never committed."
)
_COMMIT_UNKNOWN: Final = (
    "The block was cut short during its COMMIT, which may or may not have been applied: "
    "check before repeating it."
)


def _roll_back(error: BaseException, outcome: str) -> Steps[Exception | None]:
    """Roll the block back; a failed ROLLBACK is noted on *error*, never raised in its place.

    The note names the failure (never the driver's text) and *outcome*, what the
    caller can know of the block. Returns the ROLLBACK's own error, if any.
    """
    try:
        yield Step.ROLLBACK
    except Exception as err:  # noqa: BLE001 - noted on *error*, never raised in its place
        reason = "the database connection was lost" if _connection_lost(err) else type(err).__name__
        error.add_note(f"The atomic() block's ROLLBACK failed too ({reason}). {outcome}")
        return err
    return None
